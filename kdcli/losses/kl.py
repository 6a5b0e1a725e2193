"""Forward and reverse KL.

fkl: D = KL(p‖q) = Σ_v p_v (log p_v − log q_v).          ∂D/∂log q = −p  → ∂D/∂z = (q − p) / T.
rkl: D = KL(q‖p) = Σ_v q_v (log q_v − log p_v).          ∂D/∂log q = q ⊙ (log q − log p + 1)
                                                          → ∂D/∂z = q ⊙ (log q − log p − D) / T.
p = softmax(z_t / T) (teacher), q = softmax(z_s / T) (student). kd reports the true KL, not the cross-entropy
−Σ p log q that DistiLLM/MiniLLM compute (same gradient, differs by the teacher entropy).
"""

from __future__ import annotations

from typing import ClassVar

from .kernel import Buckets, ChunkedDivergence, KernelOut, rowdot


class ForwardKL(ChunkedDivergence):
    """KL(p‖q): mean-seeking; the classic Hinton distillation loss."""

    name: ClassVar[str] = "fkl"

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        d = b.logp.sub_(b.logq)
        loss = rowdot(b.p, d)
        return KernelOut(loss, b.p.neg_() if need_grad else None)


class ReverseKL(ChunkedDivergence):
    """KL(q‖p): mode-seeking; MiniLLM's objective (token level)."""

    name: ClassVar[str] = "rkl"
    tail_sensitive: ClassVar[bool] = True

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        d = b.logq.sub_(b.logp)
        loss = rowdot(b.q, d)
        return KernelOut(loss, d.add_(1.0).mul_(b.q) if need_grad else None)
