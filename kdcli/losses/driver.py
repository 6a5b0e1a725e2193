"""The driver every divergence shares: row chunking, a hand-written backward, and sparse-teacher bucketing.

Why this exists: a naive distillation loss upcasts the whole [B·T, V] student and teacher logits to float32 and
keeps several such tensors (softmaxes, log-softmaxes, products) alive for autograd. At V = 128k that is gigabytes
per tensor. Here the valid rows are processed a chunk at a time; each chunk computes its loss contribution *and*
its closed-form gradient with respect to the student logits, which is written straight into a buffer of the
student's dtype. Backward then only scales that buffer. Peak extra memory is the gradient buffer (which autograd
would allocate anyway) plus one chunk's working set (rows per chunk: `kdcli.losses.sizing`).

A divergence only supplies its kernel on bucket distributions (the contract, the softmax Jacobian that turns its
h = ∂D/∂log q into the logit gradient, and the numerics are in `kdcli.losses.kernel`). Per chunk, `dense_chunk`
builds the buckets from dense teacher logits (the V tokens) and `sparse_chunk` from a cached teacher ({top-K
tokens, label token, tail}), both in `chunks.py`; `run` validates the inputs, reduces the chunks and hands the
gradient to autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import sizing
from .aligned import AlignedTeacher
from .chunks import dense_chunk, sparse_chunk
from .cross import AlignedDivergence, aligned_chunk
from .kernel import (
    Chunk,
    ChunkedDivergence,
    LossConfigError,
    LossOutput,
    Rows,
    Teacher,
    compute_dtype,
    logit_rows,
    rowdot,
)
from .projection import ProjectedLogits
from .sparse import SparseTeacher

# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class _Job:
    div: ChunkedDivergence
    teacher: Teacher
    labels: Tensor
    num_valid: float | None
    stats: dict[str, float] = field(default_factory=dict)


class DivergencePass:
    """One pass of a divergence over the valid rows, a chunk at a time: the teacher's rows, the row plan, the
    per-chunk loss and gradient, and their reduction. The plain driver (`run`) feeds it slices of the student's
    logits; the fused head (`kdcli.losses.fused`) feeds it logits it projects per chunk.

    Only for a batch with valid rows (`rows.n > 0`); `empty_stats` gives the stats of one without.
    """

    def __init__(
        self,
        job: _Job,
        rows: Rows,
        vocab: int,
        device: torch.device,
        cdtype: torch.dtype,
        *,
        fused: bool = False,
    ) -> None:
        div = self.div = job.div
        self.dense_fn, self.sparse_fn = div.chunk_fns if div.chunk_fns is not None else (dense_chunk, sparse_chunk)
        self.rows = rows
        n = rows.n
        self.sparse = isinstance(job.teacher, SparseTeacher)
        self.stats: dict[str, float] = {"valid_positions": float(n)}
        denom = float(job.num_valid) if job.num_valid is not None else float(n)
        self.chunk = div.chunk_rows(n, vocab, device, cdtype, self.sparse, fused=fused)
        # The fused head projects a block of chunks at once (`sizing.fused_block_rows`); a plan that projects the
        # teacher (ATKD's first pass) takes a block at a time too.
        self.block = sizing.fused_block_rows(n, self.chunk) if fused else self.chunk
        self.plan = div.plan(rows, job.teacher, job.labels, vocab, cdtype, denom, self.block)
        self.stats.update(self.plan.stats)
        self.take_y = rows.source(job.labels)
        teacher = job.teacher
        if isinstance(teacher, SparseTeacher):
            self.take_sparse = [
                rows.source(t)
                for t in (teacher.topk_ids, teacher.topk_logprobs, teacher.label_logprob, teacher.tail_mass)
            ]
            covered = 1.0 - self.take_sparse[3](rows.whole()).to(torch.float64)
            self.stats["teacher_mass_covered"] = float(covered.mean())
        elif isinstance(teacher, AlignedTeacher):
            self.take_aligned = [rows.source(t) for t in (teacher.logprobs, teacher.shared, teacher.tail_mass)]
        else:
            self.take_t = logit_rows(rows, teacher)
        self.aligned = isinstance(teacher, AlignedTeacher)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.sums: dict[str, Tensor] = {}

    @staticmethod
    def empty_stats(job: _Job) -> dict[str, float]:
        stats = {"valid_positions": 0.0, **dict.fromkeys(job.div.stat_names, 0.0)}
        if isinstance(job.teacher, SparseTeacher):
            stats["teacher_mass_covered"] = 0.0
        return stats

    def chunks(self) -> list[Chunk]:
        return self.rows.chunks(self.chunk)

    def teacher_rows(self, c: Chunk) -> Tensor | None:
        """The dense (or projected) teacher's logits of a chunk or block; None for a cache or an aligned teacher,
        whose chunks read their own records."""
        return None if self.sparse or self.aligned else self.take_t(c)

    def ce_coef(self, ce_weight: float, kd_weight: float) -> float | None:
        """Where the cross-entropy can come from this pass's student softmax (T = 1, a dense teacher, one weight for
        every row): the `ce_coef` that makes a chunk's gradient, scaled by its scale and `kd_weight`, that of
        kd_weight · D + ce_weight · CE (`ce_weight` per row); else None."""
        weight = self.plan.weight
        dense = not (self.sparse or self.aligned)
        if not dense or self.div.temperature != 1.0 or isinstance(weight, Tensor) or not weight * kd_weight > 0:
            return None
        return ce_weight / (weight * kd_weight)

    def step(
        self,
        c: Chunk,
        s_rows: Tensor,
        need_grad: bool,
        *,
        t_rows: Tensor | None = None,
        ce_coef: float | None = None,
    ) -> tuple[Tensor | None, float | Tensor, Tensor | None]:
        """Add the chunk's share of the loss; return ∂D/∂(z/T) of its rows (None without a gradient), the scale that
        turns it into ∂loss/∂z (the row weight over T), and the rows' CE with `ce_coef` (`ce_coef`), else None.
        `t_rows`: the teacher's rows when the caller has them (a projected block's)."""
        div, plan = self.div, self.plan
        hard = plan.hard[c.lo : c.hi] if plan.hard is not None else None
        y = self.take_y(c)
        if self.sparse:
            ids, lps, lab, tail = (take(c) for take in self.take_sparse)
            loss_rows, g, st, ce = self.sparse_fn(div, s_rows, ids, lps, lab, tail, y, hard, need_grad)
        elif self.aligned:
            assert isinstance(div, AlignedDivergence)
            loss_rows, g, st = aligned_chunk(div, s_rows, *(take(c) for take in self.take_aligned), need_grad)
            ce = None  # ce_coef is None for an aligned teacher: the fused head takes the CE in a pass of its own
        else:
            t = self.take_t(c) if t_rows is None else t_rows
            extra = () if ce_coef is None else (ce_coef,)  # the eager and compiled functions alike without it
            loss_rows, g, st, ce = self.dense_fn(div, s_rows, t, y, hard, need_grad, *extra)
        scale: float | Tensor
        if isinstance(plan.weight, Tensor):
            w = plan.weight[c.lo : c.hi]
            self.total += rowdot(loss_rows.to(torch.float64), w.to(torch.float64))
            scale = (w / div.temperature).unsqueeze(1)
        else:
            self.total += loss_rows.sum(dtype=torch.float64) * plan.weight
            scale = plan.weight / div.temperature
        for key, val in st.items():
            self.sums[key] = self.sums[key] + val.to(torch.float64) if key in self.sums else val.to(torch.float64)
        return g, scale, ce

    def finish(self) -> dict[str, float]:
        """The call's stats, the per-chunk sums averaged over the valid rows."""
        if self.sums:
            names = list(self.sums)
            means = torch.stack([self.sums[k] for k in names]).div_(self.rows.n).tolist()
            self.stats.update(zip(names, (float(v) for v in means), strict=True))
        return self.stats


def _run(job: _Job, student: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    vocab = int(student.shape[-1])
    cdtype = compute_dtype(student.dtype)
    out_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
    rows = Rows(job.labels)
    grad: Tensor | None = None
    if need_grad:
        # Every valid row is overwritten, so zero-filling is only needed when some rows are masked.
        alloc = torch.empty if rows.n == rows.total else torch.zeros
        grad = alloc((rows.total, vocab), dtype=student.dtype, device=student.device)
    if rows.n == 0:
        job.stats = DivergencePass.empty_stats(job)
        return torch.zeros((), dtype=out_dtype, device=student.device), grad

    chunked = DivergencePass(job, rows, vocab, student.device, cdtype)
    take_s = rows.source(student.detach())
    for c in chunked.chunks():
        g, scale, _ = chunked.step(c, take_s(c), need_grad)
        if g is not None:
            assert grad is not None
            rows.put(grad, c, g, scale)
        del g  # this chunk's workspace goes before the next chunk's is made
    job.stats = chunked.finish()
    return chunked.total.to(out_dtype), grad


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


# ------------------------------------------------------------------------------------------------ entry point


def run(
    div: ChunkedDivergence,
    student_logits: Tensor,
    teacher: Teacher,
    labels: Tensor,
    num_valid: int | float | Tensor | None = None,
) -> LossOutput:
    """`div.compute(...)`: check the inputs, run the chunks (through autograd when the student needs a gradient)."""
    check_inputs(div, student_logits, teacher, labels)
    job = _Job(div, teacher, labels, check_num_valid(num_valid))
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if need_grad:
        loss = _ChunkedLossFunction.apply(student_logits, job)
    else:
        with torch.no_grad():
            loss, _ = _run(job, student_logits, need_grad=False)
    return LossOutput(loss, job.stats)


def check_num_valid(num_valid: int | float | Tensor | None) -> float | None:
    if num_valid is None:
        return None
    nv = float(num_valid.item()) if isinstance(num_valid, Tensor) else float(num_valid)
    if not nv > 0 or not math.isfinite(nv):
        raise LossConfigError(f"num_valid must be a positive number, got {num_valid!r}")
    return nv


def check_inputs(div: ChunkedDivergence, student: Tensor | ProjectedLogits, teacher: Teacher, labels: Tensor) -> None:
    """Shapes, dtypes, devices and the cache's temperature; `student` is the logits or, fused, their projection."""
    if isinstance(student, ProjectedLogits):
        if not student.hidden.is_floating_point():
            raise LossConfigError("the student's hidden states must be a floating-point tensor")
    elif not isinstance(student, Tensor) or not student.is_floating_point() or student.dim() < 2:
        raise LossConfigError("student_logits must be a floating-point tensor of shape [..., V]")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise LossConfigError("labels must be an integer tensor (−100 = ignored)")
    shape = tuple(student.shape)
    lead = shape[:-1]
    if tuple(labels.shape) != lead:
        raise LossConfigError(f"labels shape {tuple(labels.shape)} != student_logits leading shape {lead}")
    if isinstance(teacher, AlignedTeacher) != isinstance(div, AlignedDivergence):
        raise LossConfigError(
            f"'{div.name}' takes a teacher of another tokenizer as an AlignedTeacher, and only 'uld' and 'hybrid' do"
            if isinstance(div, AlignedDivergence)
            else f"'{div.name}' compares one vocabulary; an AlignedTeacher (another tokenizer) needs 'uld' or 'hybrid'"
        )
    if isinstance(teacher, (SparseTeacher, AlignedTeacher)):
        if teacher.shape != lead:
            raise LossConfigError(f"{type(teacher).__name__} leading shape {teacher.shape} != student_logits {lead}")
        if isinstance(teacher, AlignedTeacher) and isinstance(div, AlignedDivergence) and teacher.k != div.top_k:
            raise LossConfigError(
                f"the AlignedTeacher holds {teacher.k} entries per position but '{div.name}' has "
                f"top_k={div.top_k}; build it with k = top_k"
            )
        t = teacher.temperature
        if t is not None and not math.isclose(t, div.temperature, rel_tol=1e-6):
            raise LossConfigError(
                f"{type(teacher).__name__} log-probs were taken at temperature {t:g} but '{div.name}' uses "
                f"temperature {div.temperature:g}; the cache must be written at the loss temperature"
            )
    elif isinstance(teacher, (Tensor, ProjectedLogits)):
        if tuple(teacher.shape) != shape:
            raise LossConfigError(f"teacher logits shape {tuple(teacher.shape)} != student_logits shape {shape}")
        if isinstance(teacher, Tensor) and not teacher.is_floating_point():
            raise LossConfigError("teacher logits must be a floating-point tensor")
        if teacher.device != student.device:
            raise LossConfigError(f"teacher logits are on {teacher.device}, student logits on {student.device}")
    else:
        raise LossConfigError(f"teacher must be a logits tensor or a SparseTeacher, got {type(teacher).__name__}")
