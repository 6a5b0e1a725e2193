"""Skew KL divergences (DistiLLM, Ko et al., ICML 2024).

skl:  D = KL(p ‖ m), m = α p + (1−α) q.
      ∂D/∂q_v = −(1−α) p_v / m_v           → h = ∂D/∂log q = −(1−α) p ⊙ q / m.
srkl: D = KL(q ‖ m), m = (1−α) p + α q.
      ∂D/∂q_v = log q_v − log m_v + 1 − α q_v / m_v
                                           → h = q ⊙ (log q − log m + 1 − α q / m).
α = 0 gives fkl / rkl. The ratio q/m is bounded (by 1/(1−α) resp. 1/α), so m is clamped to the smallest normal
number before dividing: where m = 0 the numerator q is 0 too and the term is an exact 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .kernel import Buckets, ChunkedDivergence, KernelOut, check_float, rowdot, safe_log


class _Skew(ChunkedDivergence):
    param_names: ClassVar[tuple[str, ...]] = ("alpha",)

    def __init__(self, *, alpha: float, temperature: float, chunk_size: int | None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        self.alpha = check_float(self.name, "alpha", alpha, 0.0, 1.0, lo_open=False, hi_open=True)


class SkewForwardKL(_Skew):
    """KL(p ‖ αp + (1−α)q)."""

    name: ClassVar[str] = "skl"

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        a = self.alpha
        m = torch.add(b.q, b.p, alpha=a / (1.0 - a)).mul_(1.0 - a)
        d = b.logp.sub_(safe_log(m))
        loss = rowdot(b.p, d)
        if not need_grad:
            return KernelOut(loss, None)
        ratio = torch.div(b.q, m.clamp_min_(torch.finfo(m.dtype).tiny), out=m)
        return KernelOut(loss, ratio.mul_(b.p).mul_(-(1.0 - a)))


class SkewReverseKL(_Skew):
    """KL(q ‖ (1−α)p + αq)."""

    name: ClassVar[str] = "srkl"

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        a = self.alpha
        m = torch.add(b.p, b.q, alpha=a / (1.0 - a)).mul_(1.0 - a)
        d = b.logq.sub_(safe_log(m))
        loss = rowdot(b.q, d)
        if not need_grad:
            return KernelOut(loss, None)
        ratio = torch.div(b.q, m.clamp_min_(torch.finfo(m.dtype).tiny), out=m)
        return KernelOut(loss, d.add_(1.0).sub_(ratio, alpha=a).mul_(b.q))
