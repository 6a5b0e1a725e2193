"""Logits that exist only as hidden states and the output layer that projects them (the fused head's input).

A model's logits are z = c · tanh(s · (h Wᵀ) / c) (c: logit soft-capping where a config has it, else no tanh;
s: a logit scale where a config has one, else 1), keeping the first `width` columns. `ProjectedLogits` holds h and
that recipe, so a loss can build z a chunk of rows at a time and never hold all of [B·T, V] (`kdcli.losses.fused`).
`OutputLayer.backward` is the chain rule back through it: from ∂/∂z of a chunk to ∂/∂h and ∂/∂W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OutputLayer:
    """How hidden states become logits: z = softcap(scale · h W[:width]ᵀ), the products taken in `dtype`.

    `dtype` is the one the model's own forward multiplies in: the autocast dtype under mixed precision (bf16),
    else the weight's, so that the fused logits are the model's logits, rounding included.
    """

    weight: Tensor  # [V_out, d], the output layer's (or the tied embedding's) parameter
    width: int  # columns kept: the vocabulary teacher and student share (V_out may be padded wider)
    dtype: torch.dtype
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"OutputLayer.weight must be [V, d], got shape {tuple(self.weight.shape)}")
        if not 0 < self.width <= self.weight.shape[0]:
            raise ValueError(f"OutputLayer.width {self.width} must be in [1, {self.weight.shape[0]}]")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"OutputLayer.softcap must be > 0 or None, got {self.softcap}")

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def kept_weight(self) -> Tensor:
        """W[:width] in the product dtype, detached: what every chunk multiplies by (cast once per call)."""
        return self.weight.detach()[: self.width].to(self.dtype)

    def logits(self, hidden_rows: Tensor, kept: Tensor) -> Tensor:
        """z for the rows [n, d] → [n, width] in the product dtype; `kept` is `kept_weight()`."""
        z = hidden_rows.to(self.dtype) @ kept.t()
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def backward_into(self, grad_z: Tensor, z: Tensor, factor: float | Tensor = 1.0) -> None:
        """∂loss/∂u of the rows before the product (u = h W[:width]ᵀ) written over their logits `z` (in the product
        dtype), from `factor` · `grad_z`, ∂loss/∂z in the compute dtype (overwritten): back through the soft-cap and
        the scale, the factor, the scale and the cast in one pass. ∂/∂h is then `u_grad @ kept`, and ∂/∂W[:width]
        the sum over rows of `u_grad[row]ᵀ h[row]` (`WeightGradient`)."""
        if self.softcap is not None:
            # d/du c·tanh(u/c) = 1 − tanh² = 1 − (z/c)², read from z before it is overwritten
            grad_z.mul_(1.0 - (z.to(grad_z.dtype) / self.softcap).square_())
        torch.mul(grad_z, factor * self.scale if self.scale != 1.0 else factor, out=z)


# Rows of ∂/∂u buffered before one product adds them into ∂/∂W: at most this many bytes of them.
WEIGHT_GRADIENT_GROUP_BYTES = 64 * 2**20


class WeightGradient:
    """∂/∂W[:width] = Σ_rows ∂u_rowᵀ h_row, accumulated in `grad` ([V_out, d], float32 or float64).

    Rows are buffered and multiplied a group at a time: one product per few dozen rows would be slow, and adding
    its [V, d] result into the float32 buffer each time costs more than the product itself. A group holds up to
    WEIGHT_GRADIENT_GROUP_BYTES of rows; rows given a group's worth at once (the fused head's blocks) go straight
    into one product; `flush` adds the rest.
    """

    def __init__(self, head: OutputLayer, grad: Tensor, rows: int) -> None:
        elem = torch.finfo(head.dtype).bits // 8
        size = max(1, min(rows, WEIGHT_GRADIENT_GROUP_BYTES // (head.width * elem)))
        self.head, self.grad = head, grad
        self.u = torch.empty((size, head.width), dtype=head.dtype, device=grad.device)
        self.h = torch.empty((size, head.hidden_size), dtype=head.dtype, device=grad.device)
        self.fill = 0

    def add(self, grad_u: Tensor, hidden_rows: Tensor) -> None:
        size, lo = self.u.shape[0], 0
        if not self.fill and grad_u.shape[0] >= size:  # a group's worth already: no copy into the buffer
            self._product(grad_u, hidden_rows)
            return
        while lo < grad_u.shape[0]:
            take = min(size - self.fill, grad_u.shape[0] - lo)
            self.u[self.fill : self.fill + take] = grad_u[lo : lo + take]
            self.h[self.fill : self.fill + take] = hidden_rows[lo : lo + take]
            self.fill += take
            lo += take
            if self.fill == size:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        self._product(self.u[: self.fill], self.h[: self.fill])
        self.fill = 0

    def _product(self, u: Tensor, h: Tensor) -> None:
        kept = self.grad[: self.head.width]
        if kept.dtype == u.dtype:
            kept.addmm_(u.t(), h.to(u.dtype))
        else:  # a 16-bit product, accumulated in the gradient's precision
            kept.add_(u.t() @ h.to(u.dtype))


@dataclass(frozen=True)
class ProjectedLogits:
    """The logits [..., width] of hidden states [..., d] under `head`, never materialised whole."""

    hidden: Tensor
    head: OutputLayer

    def __post_init__(self) -> None:
        if self.hidden.dim() < 2 or self.hidden.shape[-1] != self.head.hidden_size:
            raise ValueError(
                f"ProjectedLogits.hidden must be [..., {self.head.hidden_size}], got shape {tuple(self.hidden.shape)}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logits' shape: the hidden states' leading shape and the kept width."""
        return (*self.hidden.shape[:-1], self.head.width)

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def materialise(self) -> Tensor:
        """All the logits at once, differentiable: the reference the fused head is tested against (and what it
        avoids)."""
        head = self.head
        z = self.hidden.to(head.dtype) @ head.weight[: head.width].to(head.dtype).t()
        if head.scale != 1.0:
            z = z * head.scale
        if head.softcap is not None:
            z = torch.tanh(z / head.softcap) * head.softcap
        return z
