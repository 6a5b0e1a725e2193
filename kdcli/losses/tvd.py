"""Total variation distance: D = ½ Σ_v |p_v − q_v|.

Not differentiable where p_v = q_v; kd uses the subgradient sign(0) = 0, as autograd of abs does:
∂D/∂q_v = ½ sign(q_v − p_v), so h = ∂D/∂log q = ½ q ⊙ sign(q − p), projected through the softmax by the driver.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .kernel import Buckets, ChunkedDivergence, KernelOut


class TotalVariation(ChunkedDivergence):
    """½ ‖p − q‖₁."""

    name: ClassVar[str] = "tvd"

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        diff = torch.sub(b.q, b.p, out=b.p)
        loss = torch.linalg.vector_norm(diff, ord=1, dim=-1).mul_(0.5)
        return KernelOut(loss, diff.sign_().mul_(b.q).mul_(0.5) if need_grad else None)
