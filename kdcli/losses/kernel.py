"""What a divergence author reads: the kernel contract, its data types and helpers, and the base class.

A divergence is only its math. It subclasses `ChunkedDivergence` and implements `kernel(b, need_grad)` on *bucket
distributions* — for a dense teacher the buckets are the V tokens, for a cached teacher they are {top-K tokens,
label token, tail}. The kernel returns the per-row divergence D and h = ∂D/∂log q (q: the student's bucket
probabilities, treated as free variables), plus per-row stat sums. Optionally it overrides `plan` to weight rows in
the reduction (ATKD's easy/hard split). Everything else — taking the valid rows a chunk at a time, the softmaxes,
the sparse bucketing, the reduction and autograd — is the driver's (`kdcli.losses.driver`), which turns h into the
gradient with respect to the tempered student logits x = z/T through the softmax Jacobian:

    ∂D/∂x_v = h_b(v) · q_v / Q_b(v) − q_v · Σ_b h_b

which for singleton buckets is h_v − q_v Σh and for the tail bucket spreads h_tail over the tail tokens in
proportion to their share of the tail. Finally ∂/∂z = (1/T) ∂/∂x.

Numerics: log-probabilities are clamped to the compute dtype's finite minimum (finfo.min), so masked (−inf) logits
give probability 0, every "0 · log 0" term is an exact 0 and no −inf − (−inf) = NaN appears. A genuinely infinite
divergence (e.g. teacher mass p_v on a token where the student has probability 0) therefore contributes about
p_v · |finfo.min| per position instead of inf: ≈ p_v · 3.4e38 in float32 (the compute dtype of fp32, bf16 and fp16
inputs), whose mean over positions stays finite; ≈ p_v · 1.8e308 in float64, where the float64 sum over positions
overflows to inf as soon as those values add up past 1.8e308 (e.g. six positions with p_v = 0.2). The gradient
stays finite in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from kdcli.errors import KdError

from . import sizing
from .aligned import AlignedTeacher
from .projection import ProjectedLogits
from .sparse import IGNORE_INDEX, SparseTeacher

# What a divergence takes as the teacher: dense logits, logits still to be projected from hidden states (the fused
# head), a top-K cache, or (across tokenizers) top-k records laid out on the student's positions.
Teacher = Tensor | ProjectedLogits | SparseTeacher | AlignedTeacher

if TYPE_CHECKING:
    from .chunks import ChunkFns


class LossConfigError(KdError, ValueError):
    """Bad divergence name, parameter or input: a ValueError that the CLI also shows as a one-line KdError."""


# --------------------------------------------------------------------------------------------------- parameters


def check_float(
    loss: str,
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool,
    hi_open: bool,
) -> float:
    """Validate a real parameter against an interval and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise LossConfigError(f"parameter '{name}' of '{loss}' must be a finite number, got {value!r}")
    v = float(value)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (ok_lo and ok_hi):
        lo_s = f"({lo:g}" if lo_open else f"[{lo:g}"
        hi_s = "∞)" if math.isinf(hi) else (f"{hi:g})" if hi_open else f"{hi:g}]")
        raise LossConfigError(f"parameter '{name}' of '{loss}' must be in {lo_s}, {hi_s}, got {value!r}")
    return v


def check_chunk_size(loss: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LossConfigError(f"parameter 'chunk_size' of '{loss}' must be a positive int or None, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------- kernel interface


@dataclass
class Buckets:
    """Per-row teacher/student distributions over M buckets (M = V dense, K + 2 sparse), compute dtype.

    Kernels may overwrite `p`, `logp` and `logq` in place (the driver does not read them afterwards) but must
    leave `q` as it was on return and must not return an `h` that aliases `q`.
    """

    p: Tensor  # [n, M]
    q: Tensor  # [n, M]
    logp: Tensor  # [n, M], clamped to finfo.min
    logq: Tensor  # [n, M], clamped to finfo.min
    target: Tensor | None = None  # [n] int64 bucket of the label token (only for divergences that need it)
    hard: Tensor | None = None  # [n] 0/1 in compute dtype (ATKD's hard-position indicator)
    # How many leading buckets are single tokens whose rank by p is known (AKL's head is chosen among them); None:
    # all M (dense). A cached teacher has K: its label and tail buckets hold tokens ranked below every top-K token,
    # in an order the cache does not know.
    ranked: int | None = None


@dataclass
class KernelOut:
    loss: Tensor  # [n] per-row divergence
    h: Tensor | None  # [n, M] ∂loss/∂log q, None when no gradient was asked for
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-chunk *sums* over rows; the driver averages


@dataclass
class RowPlan:
    """How rows are weighted in the reduction: loss = Σ_rows weight · D_row."""

    weight: float | Tensor  # scalar, or [N] in compute dtype aligned with the valid rows
    hard: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class LossOutput(NamedTuple):
    """What a divergence returns: the loss and plain-float diagnostics of the call (`valid_positions` and
    divergence-specific ones)."""

    loss: Tensor
    stats: dict[str, float]


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a_v b_v per row without materialising a ⊙ b (vecdot is ~2× faster than (a*b).sum on CPU)."""
    return torch.linalg.vecdot(a, b)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests); every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tempered_copy(rows: Tensor, temperature: float) -> Tensor:
    """rows / T in the compute dtype, as a fresh tensor the caller may overwrite (never the caller's logits)."""
    x = rows.to(compute_dtype(rows.dtype))
    if x is rows:
        x = x.clone()
    if temperature != 1.0:
        x.div_(temperature)
    return x


def clamp_log_(x: Tensor) -> Tensor:
    return x.clamp_(min=torch.finfo(x.dtype).min)


def safe_log(x: Tensor) -> Tensor:
    return clamp_log_(torch.log(x))


def logsumexp_rows(x: Tensor) -> Tensor:
    """Row logsumexp; −inf for an all −inf row (no NaN). Faster than torch.logsumexp on CPU."""
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))


# -------------------------------------------------------------------------------------------------- rows


class Chunk(NamedTuple):
    """Valid rows lo:hi (positions in the list of valid rows); `start` is the flat row of `lo` when the chunk is
    one run of consecutive rows (so it can be sliced instead of gathered), else None."""

    lo: int
    hi: int
    start: int | None


class Rows:
    """The valid (label != −100) rows of the batch, taken a chunk at a time without copying whole tensors.

    Fast paths: chunks are aligned to runs of consecutive valid rows (a masked prompt per sequence leaves one run per
    sequence), so they are sliced rather than gathered and the gradient is written with one fused scale-and-cast;
    a tensor that cannot be viewed as [rows, ...] (e.g. logits[:, :-1] sliced by the caller) is indexed by
    coordinates instead of being reshaped, which would copy all of it.
    """

    def __init__(self, labels: Tensor) -> None:
        self.lead = tuple(labels.shape)
        self.total = labels.numel()
        idx = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        self.idx = idx
        self.n = int(idx.numel())

    def chunks(self, size: int) -> list[Chunk]:
        n = self.n
        if n == 0:
            return []
        plain = [Chunk(lo, min(n, lo + size), None) for lo in range(0, n, size)]
        # Run boundaries: where consecutive valid rows are not consecutive flat rows (one host sync for all).
        breaks = ((self.idx[1:] - self.idx[:-1]) != 1).nonzero().squeeze(1).add_(1).tolist()
        starts = [0, *breaks]
        if len(starts) > len(plain):  # many short runs: run-aligned chunks would be too small
            return plain
        firsts = self.idx[torch.tensor(starts, device=self.idx.device)].tolist()
        aligned = [
            Chunk(lo, min(end, lo + size), first + lo - a)
            for a, end, first in zip(starts, [*breaks, n], firsts, strict=True)
            for lo in range(a, end, size)
        ]
        return aligned if len(aligned) <= len(plain) + len(plain) // 4 + 1 else plain

    @staticmethod
    def split(block: Chunk, size: int) -> list[Chunk]:
        """The chunks of `size` rows of a chunk `block` (the fused head's chunks of one projected block)."""
        return [
            Chunk(lo, min(block.hi, lo + size), None if block.start is None else block.start + lo - block.lo)
            for lo in range(block.lo, block.hi, size)
        ]

    def whole(self) -> Chunk:
        return Chunk(0, self.n, None)

    def source(self, x: Tensor) -> Callable[[Chunk], Tensor]:
        """A function chunk → the chunk's valid rows of x ([*lead, ...] → [hi − lo, ...])."""
        try:
            flat = x.view(self.total, *x.shape[len(self.lead) :])
        except RuntimeError:
            coords = torch.unravel_index(self.idx, self.lead)
            return lambda c: x[tuple(k[c.lo : c.hi] for k in coords)]

        def take(c: Chunk) -> Tensor:
            if c.start is not None:
                return flat[c.start : c.start + c.hi - c.lo]
            # Advanced indexing, not index_select: the latter is ~50× slower for wide rows on CPU (torch 2.13).
            return flat[self.idx[c.lo : c.hi]]

        return take

    def put(self, buf: Tensor, c: Chunk, val: Tensor, scale: float | Tensor) -> None:
        """Write scale · val into the chunk's rows of the flat [total, V] buffer (scale and cast in one pass)."""
        if c.start is not None:
            torch.mul(val, scale, out=buf[c.start : c.start + c.hi - c.lo])
        elif buf.dtype == val.dtype:
            buf.index_copy_(0, self.idx[c.lo : c.hi], val.mul_(scale))
        else:
            buf.index_copy_(0, self.idx[c.lo : c.hi], torch.mul(val, scale, out=torch.empty_like(val, dtype=buf.dtype)))


# ----------------------------------------------------------------------------------------------- base class


class ChunkedDivergence:
    """Base of every kd divergence. Call it as `loss_fn(student_logits, teacher, labels, num_valid=None)`.

    Args (call):
        student_logits: [..., V] float (fp32/bf16/fp16/fp64); gradients flow to it.
        teacher: dense logits [..., V] (no gradient) or a `SparseTeacher` (log-probs at this temperature).
        labels: [...] integer, −100 = ignored; already aligned (logits[..., t, :] predicts labels[..., t]).
        num_valid: optional denominator (valid positions of the whole accumulation window); default: N, the valid
            positions of this call.

    Returns the float32 scalar Σ_valid D / (num_valid or N) (float64 for float64 logits), not multiplied by T².
    `compute` takes the same arguments and returns a `LossOutput`: that loss and the call's plain-float stats.

    Parameters have no defaults here: `kdcli.losses.registry` (`get_loss`, `LOSSES`) is their one source.
    """

    name: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ()  # divergence-specific, besides temperature and chunk_size
    stat_names: ClassVar[tuple[str, ...]] = ()
    needs_target: ClassVar[bool] = False
    # Weighs the student's spread inside the teacher's tail heavily, which a top-K cache's tail bucket hides: from a
    # cache it trains differently from online unless K covers most of the student's mass (docs/cache.md).
    tail_sensitive: ClassVar[bool] = False

    def __init__(self, *, temperature: float, chunk_size: int | None) -> None:
        self.temperature = check_float(self.name, "temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
        self.chunk_size = check_chunk_size(self.name, chunk_size)
        self.chunk_fns: ChunkFns | None = None  # (dense, sparse) chunk functions set by `compile`; None: eager

    # --- hooks for subclasses

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        raise NotImplementedError

    def plan(
        self,
        rows: Rows,
        teacher: Teacher,
        labels: Tensor,
        vocab: int,
        cdtype: torch.dtype,
        denom: float,
        chunk: int,
    ) -> RowPlan:
        """Per-row weights for the reduction; default: every valid row weighs 1 / denom."""
        return RowPlan(weight=1.0 / denom)

    # --- public

    @property
    def params(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.param_names}
        out["temperature"] = self.temperature
        out["chunk_size"] = self.chunk_size
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def chunk_rows(
        self,
        n: int,
        vocab: int,
        device: torch.device,
        cdtype: torch.dtype,
        sparse: bool,
        *,
        fused: bool = False,
        kd: bool = True,
    ) -> int:
        """Rows per chunk: `chunk_size` if given, else as many as fit the device's working-set budget (`sizing`)."""
        return sizing.chunk_rows(
            n,
            vocab,
            self.name,
            device_type=device.type,
            sparse=sparse,
            fused=fused,
            kd=kd,
            chunk_size=self.chunk_size,
            elem_bytes=torch.finfo(cdtype).bits // 8,
        )

    def compile(self, **compile_kwargs: Any) -> ChunkedDivergence:
        """Wrap the per-chunk dense and sparse functions in torch.compile (meant for CUDA); returns self."""
        from .chunks import compile_chunk_fns  # the chunk functions import this module: import it at call time

        self.chunk_fns = compile_chunk_fns(**compile_kwargs)
        return self

    def compute(
        self,
        student_logits: Tensor,
        teacher: Teacher,
        labels: Tensor,
        *,
        num_valid: int | float | Tensor | None = None,
    ) -> LossOutput:
        """The loss (see the class docstring) and the call's stats."""
        from .driver import run  # the driver imports this module: import it at call time

        return run(self, student_logits, teacher, labels, num_valid)

    def __call__(
        self,
        student_logits: Tensor,
        teacher: Teacher,
        labels: Tensor,
        *,
        num_valid: int | float | Tensor | None = None,
    ) -> Tensor:
        return self.compute(student_logits, teacher, labels, num_valid=num_valid).loss


def logit_rows(rows: Rows, logits: Tensor | ProjectedLogits) -> Callable[[Chunk], Tensor]:
    """A function chunk → the chunk's rows of the logits (no gradient); projected logits are built per chunk."""
    if isinstance(logits, ProjectedLogits):
        take_h = rows.source(logits.hidden.detach())
        head, kept = logits.head, logits.head.kept_weight()
        return lambda c: head.logits(take_h(c), kept)
    return rows.source(logits.detach())


def teacher_label_logprobs(
    div: ChunkedDivergence,
    rows: Rows,
    teacher: Teacher,
    labels: Tensor,
    vocab: int,
    cdtype: torch.dtype,
    chunk: int,
) -> Tensor:
    """log p_g (teacher, tempered) of the label token for every valid row, [N]: one chunked pass for dense (and
    projected) logits."""
    if isinstance(teacher, SparseTeacher):
        return rows.source(teacher.label_logprob)(rows.whole()).to(cdtype)
    take_t = logit_rows(rows, teacher)
    take_y = rows.source(labels)
    out = torch.empty(rows.n, dtype=cdtype, device=teacher.device)
    for c in rows.chunks(chunk):
        t = raw = take_t(c)
        if div.temperature != 1.0:
            t = raw.to(cdtype)
            t = t.div_(div.temperature) if t is not raw else t / div.temperature
        y = take_y(c).to(torch.int64).unsqueeze(1)
        # log_softmax is one fused kernel (cheaper than a logsumexp); only the label column is kept.
        out[c.lo : c.hi] = torch.log_softmax(t, dim=-1, dtype=cdtype).gather(1, y).squeeze(1)
    return out
