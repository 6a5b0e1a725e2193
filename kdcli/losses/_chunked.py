"""The engine every divergence shares: row chunking, a hand-written backward, and sparse-teacher bucketing.

Why this exists: a naive distillation loss upcasts the whole [B·T, V] student and teacher logits to float32 and
keeps several such tensors (softmaxes, log-softmaxes, products) alive for autograd. At V = 128k that is gigabytes
per tensor. Here the valid rows are processed a chunk at a time; each chunk computes its loss contribution *and*
its closed-form gradient with respect to the student logits, which is written straight into a buffer of the
student's dtype. Backward then only scales that buffer. Peak extra memory is the gradient buffer (which autograd
would allocate anyway) plus one chunk's working set.

How a divergence plugs in: it implements `kernel(b, need_grad)` on *bucket distributions* — for a dense teacher the
buckets are the V tokens, for a cached teacher they are {top-K tokens, label token, tail}. The kernel returns the
per-row divergence D and h = ∂D/∂log q (q: the student's bucket probabilities, treated as free variables). The
engine turns h into the gradient with respect to the tempered student logits x = z/T through the softmax Jacobian:

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
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcli.errors import KdError

from .sparse import IGNORE_INDEX, SparseTeacher

# Working-set budget per chunk. CPU: small enough to stay cache- and page-friendly; CUDA: big enough that kernel
# launch overhead per chunk is amortised, still far below one full [B·T, V] float32 tensor at LLM vocabularies.
CPU_CHUNK_BUDGET_BYTES = 128 * 2**20
CUDA_CHUNK_BUDGET_BYTES = 1024 * 2**20


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

    Kernels may overwrite `p`, `logp` and `logq` in place (the engine does not read them afterwards) but must
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
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-chunk *sums* over rows; the engine averages


@dataclass
class RowPlan:
    """How rows are weighted in the reduction: loss = Σ_rows weight · D_row."""

    weight: float | Tensor  # scalar, or [N] in compute dtype aligned with the valid rows
    hard: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a_v b_v per row without materialising a ⊙ b (vecdot is ~2× faster than (a*b).sum on CPU)."""
    return torch.linalg.vecdot(a, b)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests); every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class _Rows:
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


# ------------------------------------------------------------------------------------------- chunk functions


def _tempered_log_softmax(x: Tensor, cdtype: torch.dtype, temperature: float) -> tuple[Tensor, Tensor]:
    """(clamped log-softmax, softmax) of x / T in the compute dtype.

    One upcast per chunk (passing dtype= to both softmaxes would cast twice). The softmax is its own kernel on CPU,
    where it is cheaper than exp(log-softmax); on GPUs, where every pass costs memory bandwidth, exp is cheaper.
    """
    y = x.to(cdtype)
    if temperature != 1.0:
        y = y.div_(temperature) if y is not x else y / temperature
    logp = torch.log_softmax(y, dim=-1)
    p = torch.softmax(y, dim=-1) if y.device.type == "cpu" else torch.exp(logp)
    return clamp_log_(logp), p


def dense_chunk(
    div: ChunkedDivergence,
    s_rows: Tensor,
    t_rows: Tensor,
    y_rows: Tensor,
    hard: Tensor | None,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """One chunk against dense teacher logits: (per-row D, ∂D/∂(z_s/T) or None, stat sums)."""
    cdtype = compute_dtype(s_rows.dtype)
    logq, q = _tempered_log_softmax(s_rows, cdtype, div.temperature)
    logp, p = _tempered_log_softmax(t_rows, cdtype, div.temperature)
    target = y_rows.to(torch.int64) if div.needs_target else None
    out = div.kernel(Buckets(p=p, q=q, logp=logp, logq=logq, target=target, hard=hard), need_grad)
    if not need_grad:
        return out.loss, None, out.stats
    assert out.h is not None
    h = out.h
    # Softmax Jacobian: ∂D/∂x = h − q Σh.
    grad = h.addcmul_(q, h.sum(dim=-1, keepdim=True), value=-1.0)
    return out.loss, grad, out.stats


def sparse_chunk(
    div: ChunkedDivergence,
    s_rows: Tensor,
    ids: Tensor,
    topk_lp: Tensor,
    label_lp: Tensor,
    tail_mass: Tensor,
    y_rows: Tensor,
    hard: Tensor | None,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """One chunk against a cached teacher, on buckets [top-K..., label-if-outside, tail] (M = K + 2)."""
    cdtype = compute_dtype(s_rows.dtype)
    neg_inf = float("-inf")
    x = s_rows.to(cdtype)
    if x is s_rows:  # x is modified in place below; never write into the caller's logits
        x = x.clone()
    if div.temperature != 1.0:
        x.div_(div.temperature)
    k = int(ids.shape[1])
    ids = ids.to(torch.int64)
    y = y_rows.to(torch.int64).unsqueeze(1)

    lse = logsumexp_rows(x).unsqueeze(1)
    x_top = x.gather(1, ids)
    x_lab = x.gather(1, y)
    in_top = ids == y
    has = in_top.any(dim=1, keepdim=True)
    pos = in_top.to(torch.uint8).argmax(dim=1)
    # The tail is everything but the top K and the label; its log-mass via logsumexp keeps a tiny tail precise.
    x.scatter_(1, ids, neg_inf)
    x.scatter_(1, y, neg_inf)
    lse_tail = logsumexp_rows(x).unsqueeze(1)

    logq = torch.cat([x_top - lse, torch.where(has, neg_inf, x_lab - lse), lse_tail - lse], dim=1)
    q = torch.exp(logq)
    clamp_log_(logq)

    lab = label_lp.to(cdtype).unsqueeze(1)
    p_lab = torch.where(has, 0.0, lab.exp())
    p_tail = (tail_mass.to(cdtype).unsqueeze(1) - p_lab).clamp_min_(0.0)
    logp = torch.cat([topk_lp.to(cdtype), torch.where(has, neg_inf, lab), torch.log(p_tail)], dim=1)
    p = torch.exp(logp)
    clamp_log_(logp)

    target = torch.where(has.squeeze(1), pos, k) if div.needs_target else None
    out = div.kernel(Buckets(p=p, q=q, logp=logp, logq=logq, target=target, hard=hard, ranked=k), need_grad)
    if not need_grad:
        return out.loss, None, out.stats
    assert out.h is not None
    h = out.h
    coef = h.addcmul_(q, h.sum(dim=-1, keepdim=True), value=-1.0)  # ∂D/∂x for singleton buckets
    # Tail tokens: ∂D/∂x_v = r_v · coef_tail with r_v = exp(x_v − lse_tail), the token's share of the tail.
    safe_tail = torch.where(torch.isfinite(lse_tail), lse_tail, torch.zeros_like(lse_tail))
    grad = x.sub_(safe_tail).exp_().mul_(coef[:, k + 1 : k + 2])
    grad.scatter_add_(1, ids, coef[:, :k])
    grad.scatter_add_(1, y, torch.where(has, 0.0, coef[:, k : k + 1]))
    return out.loss, grad, out.stats


ChunkFn = Callable[..., tuple[Tensor, Tensor | None, dict[str, Tensor]]]


# ------------------------------------------------------------------------------------------------ the engine


@dataclass
class _Job:
    div: ChunkedDivergence
    teacher: Tensor | SparseTeacher
    labels: Tensor
    num_valid: float | None
    stats: dict[str, float] = field(default_factory=dict)


def _run(job: _Job, student: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    div = job.div
    vocab = int(student.shape[-1])
    cdtype = compute_dtype(student.dtype)
    out_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
    rows = _Rows(job.labels)
    n = rows.n
    sparse = isinstance(job.teacher, SparseTeacher)
    stats: dict[str, float] = {"valid_positions": float(n)}
    job.stats = stats

    grad: Tensor | None = None
    if need_grad:
        # Every valid row is overwritten, so zero-filling is only needed when some rows are masked.
        alloc = torch.empty if n == rows.total else torch.zeros
        grad = alloc((rows.total, vocab), dtype=student.dtype, device=student.device)
    if n == 0:
        stats.update(dict.fromkeys(div.stat_names, 0.0))
        if sparse:
            stats["teacher_mass_covered"] = 0.0
        return torch.zeros((), dtype=out_dtype, device=student.device), grad

    denom = float(job.num_valid) if job.num_valid is not None else float(n)
    chunk = div.chunk_rows(n, vocab, student.device, cdtype, sparse)
    plan = div.plan(rows, job.teacher, job.labels, vocab, cdtype, denom, chunk)
    stats.update(plan.stats)

    take_s = rows.source(student.detach())
    take_y = rows.source(job.labels)
    if sparse:
        teacher = job.teacher
        assert isinstance(teacher, SparseTeacher)
        take_ids = rows.source(teacher.topk_ids)
        take_lps = rows.source(teacher.topk_logprobs)
        take_lab = rows.source(teacher.label_logprob)
        take_tail = rows.source(teacher.tail_mass)
        covered = 1.0 - take_tail(rows.whole()).to(torch.float64)
        stats["teacher_mass_covered"] = float(covered.mean())
    else:
        assert isinstance(job.teacher, Tensor)
        take_t = rows.source(job.teacher.detach())

    total = torch.zeros((), dtype=torch.float64, device=student.device)
    sums: dict[str, Tensor] = {}
    for c in rows.chunks(chunk):
        hard = plan.hard[c.lo : c.hi] if plan.hard is not None else None
        if sparse:
            loss_rows, g, st = div._sparse_chunk(
                div,
                take_s(c),
                take_ids(c),
                take_lps(c),
                take_lab(c),
                take_tail(c),
                take_y(c),
                hard,
                need_grad,
            )
        else:
            loss_rows, g, st = div._dense_chunk(div, take_s(c), take_t(c), take_y(c), hard, need_grad)
        scale: float | Tensor
        if isinstance(plan.weight, Tensor):
            w = plan.weight[c.lo : c.hi]
            total += rowdot(loss_rows.to(torch.float64), w.to(torch.float64))
            scale = (w / div.temperature).unsqueeze(1)
        else:
            total += loss_rows.sum(dtype=torch.float64) * plan.weight
            scale = plan.weight / div.temperature
        if g is not None:
            assert grad is not None
            rows.put(grad, c, g, scale)
        for key, val in st.items():
            sums[key] = sums[key] + val.to(torch.float64) if key in sums else val.to(torch.float64)
    if sums:
        names = list(sums)
        for key, val in zip(names, torch.stack([sums[k] for k in names]).div_(n).tolist(), strict=True):
            stats[key] = float(val)
    return total.to(out_dtype), grad


class _ChunkedLossFunction(torch.autograd.Function):
    """Forward computes loss and gradient chunk by chunk; backward hands the stored gradient to autograd."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, job: _Job) -> Tensor:  # type: ignore[override]
        loss, grad = _run(job, student, need_grad=True)
        assert grad is not None
        ctx.grad = grad.view(student.shape)  # a contiguous gradient, whatever the student's strides
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "kd losses hand their gradient buffer to autograd on the first backward; "
                "backward through the same loss twice (retain_graph=True) is not supported — recompute the loss"
            )
        # Drop our reference so autograd can take the buffer as .grad without a copy.
        ctx.grad = None
        # In place: a second [B·T, V] tensor here would undo the memory saving (the trainer scales by kd_ratio·T²).
        if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None


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
    `last_stats` then holds plain-float diagnostics of this call (`valid_positions` and divergence-specific ones).
    """

    name: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ()  # divergence-specific, besides temperature and chunk_size
    stat_names: ClassVar[tuple[str, ...]] = ()
    needs_target: ClassVar[bool] = False
    # Live [rows, V] compute-dtype tensors at a chunk's peak, for automatic chunk sizing (a slight overestimate).
    dense_work: ClassVar[int] = 8
    sparse_work: ClassVar[int] = 4

    def __init__(self, *, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        self.temperature = check_float(self.name, "temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
        self.chunk_size = check_chunk_size(self.name, chunk_size)
        self.last_stats: dict[str, float] = {}
        self._dense_chunk: ChunkFn = dense_chunk
        self._sparse_chunk: ChunkFn = sparse_chunk

    # --- hooks for subclasses

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        raise NotImplementedError

    def plan(
        self,
        rows: _Rows,
        teacher: Tensor | SparseTeacher,
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

    def chunk_rows(self, n: int, vocab: int, device: torch.device, cdtype: torch.dtype, sparse: bool) -> int:
        """Rows per chunk: `chunk_size` if given, else as many as fit the device's working-set budget."""
        if self.chunk_size is not None:
            return max(1, min(n, self.chunk_size))
        budget = CUDA_CHUNK_BUDGET_BYTES if device.type == "cuda" else CPU_CHUNK_BUDGET_BYTES
        elem = torch.finfo(cdtype).bits // 8
        per_row = vocab * elem * (self.sparse_work if sparse else self.dense_work)
        return max(1, min(n, budget // per_row))

    def compile(self, **compile_kwargs: Any) -> ChunkedDivergence:
        """Wrap the per-chunk dense and sparse functions in torch.compile (meant for CUDA); returns self."""
        self._dense_chunk = torch.compile(dense_chunk, **compile_kwargs)
        self._sparse_chunk = torch.compile(sparse_chunk, **compile_kwargs)
        return self

    def __call__(
        self,
        student_logits: Tensor,
        teacher: Tensor | SparseTeacher,
        labels: Tensor,
        *,
        num_valid: int | float | Tensor | None = None,
    ) -> Tensor:
        self._check_inputs(student_logits, teacher, labels)
        nv: float | None = None
        if num_valid is not None:
            nv = float(num_valid.item()) if isinstance(num_valid, Tensor) else float(num_valid)
            if not nv > 0 or not math.isfinite(nv):
                raise LossConfigError(f"num_valid must be a positive number, got {num_valid!r}")
        job = _Job(self, teacher, labels, nv)
        need_grad = torch.is_grad_enabled() and student_logits.requires_grad
        if need_grad:
            loss = _ChunkedLossFunction.apply(student_logits, job)
        else:
            with torch.no_grad():
                loss, _ = _run(job, student_logits, need_grad=False)
        self.last_stats = job.stats
        return loss

    def _check_inputs(self, student: Tensor, teacher: Tensor | SparseTeacher, labels: Tensor) -> None:
        if not isinstance(student, Tensor) or not student.is_floating_point() or student.dim() < 2:
            raise LossConfigError("student_logits must be a floating-point tensor of shape [..., V]")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
            raise LossConfigError("labels must be an integer tensor (−100 = ignored)")
        lead = tuple(student.shape[:-1])
        if tuple(labels.shape) != lead:
            raise LossConfigError(f"labels shape {tuple(labels.shape)} != student_logits leading shape {lead}")
        if isinstance(teacher, SparseTeacher):
            if teacher.shape != lead:
                raise LossConfigError(f"SparseTeacher leading shape {teacher.shape} != student_logits {lead}")
            t = teacher.temperature
            if t is not None and not math.isclose(t, self.temperature, rel_tol=1e-6):
                raise LossConfigError(
                    f"SparseTeacher log-probs were taken at temperature {t:g} but '{self.name}' uses "
                    f"temperature {self.temperature:g}; the cache must be written at the loss temperature"
                )
        elif isinstance(teacher, Tensor):
            if tuple(teacher.shape) != tuple(student.shape):
                raise LossConfigError(
                    f"teacher logits shape {tuple(teacher.shape)} != student_logits shape {tuple(student.shape)}"
                )
            if not teacher.is_floating_point():
                raise LossConfigError("teacher logits must be a floating-point tensor")
            if teacher.device != student.device:
                raise LossConfigError(f"teacher logits are on {teacher.device}, student logits on {student.device}")
        else:
            raise LossConfigError(f"teacher must be a logits tensor or a SparseTeacher, got {type(teacher).__name__}")


def teacher_label_logprobs(
    div: ChunkedDivergence,
    rows: _Rows,
    teacher: Tensor | SparseTeacher,
    labels: Tensor,
    vocab: int,
    cdtype: torch.dtype,
    chunk: int,
) -> Tensor:
    """log p_g (teacher, tempered) of the label token for every valid row, [N]: one chunked pass for dense."""
    if isinstance(teacher, SparseTeacher):
        return rows.source(teacher.label_logprob)(rows.whole()).to(cdtype)
    take_t = rows.source(teacher.detach())
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
