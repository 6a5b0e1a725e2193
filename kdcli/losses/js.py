"""Generalised Jensen–Shannon divergence (GKD, Agarwal et al., ICLR 2024).

D = β KL(p‖m) + (1−β) KL(q‖m), m = β p + (1−β) q, β ∈ (0, 1); β = 0.5 is the symmetric JSD.
∂D/∂q_v = −β(1−β) p_v/m_v + (1−β)(log q_v − log m_v + 1 − (1−β) q_v/m_v) = (1−β)(log q_v − log m_v)
(the m terms cancel because β p + (1−β) q = m), so h = ∂D/∂log q = (1−β) q ⊙ (log q − log m).
DistiLLM's `js` with λ = 0.9 is β = 0.1.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .kernel import Buckets, ChunkedDivergence, KernelOut, check_float, rowdot, safe_log


class JensenShannon(ChunkedDivergence):
    """β KL(p‖m) + (1−β) KL(q‖m) with m = βp + (1−β)q."""

    name: ClassVar[str] = "js"
    param_names: ClassVar[tuple[str, ...]] = ("beta",)

    def __init__(self, *, beta: float, temperature: float, chunk_size: int | None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        self.beta = check_float(self.name, "beta", beta, 0.0, 1.0, lo_open=True, hi_open=True)

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        beta = self.beta
        logm = safe_log(torch.add(b.q, b.p, alpha=beta / (1.0 - beta)).mul_(1.0 - beta))
        dp = b.logp.sub_(logm)
        dq = b.logq.sub_(logm)
        loss = rowdot(b.p, dp).mul_(beta).add_(rowdot(b.q, dq), alpha=1.0 - beta)
        return KernelOut(loss, dq.mul_(b.q).mul_(1.0 - beta) if need_grad else None)
