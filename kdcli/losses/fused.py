"""The fused head: cross-entropy and a divergence taken from hidden states, so that no [B·T, V] tensor exists.

Why: the plain path (`driver.run`) already keeps the loss's workspace to one chunk, but the student's logits, their
gradient, the fp32 copy cross-entropy takes and the teacher's logits are still whole [B·T, V] tensors; at long
sequences or a 128k vocabulary they dominate a step's memory. Here, per block of valid rows, the student's (and an
online teacher's) hidden states are projected through their output layer (`projection.OutputLayer`); a chunk of the
block at a time, the cross-entropy and divergence are taken together from those logits and their gradient is
written over them; the block's gradient then goes back through the projection into the hidden states and the output
weight. Blocks are large for the products' sake, chunks small for the divergence's workspace
(`sizing.fused_block_rows`). What stays alive across blocks is ∂/∂h ([B·T, d]) and ∂/∂W ([V, d]), the gradients
autograd would hold anyway.

    total = ce_weight · CE + kd_weight · D,   CE = Σ_valid −log softmax(z)_y / count,   D as `driver.run`

with the weights given by the caller (the engine's objective decides them). The divergence's chunk functions, row
plan and reduction are the plain driver's (`driver.DivergencePass`), so both paths compute one thing; divergences
that need a statistic over all positions (ATKD's ranking) get it in the plan's first pass, which projects the
teacher block by block too. At temperature 1 the cross-entropy comes from the divergence's own student softmax
(`DivergencePass.ce_coef`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .driver import DivergencePass, _Job, check_inputs, check_num_valid
from .kernel import ChunkedDivergence, LossConfigError, Rows, Teacher, compute_dtype, logsumexp_rows
from .projection import OutputLayer, ProjectedLogits, WeightGradient
from .sizing import fused_block_rows


@dataclass
class FusedTerms:
    """The weighted total (differentiable) and its two parts (detached), as the objective reports them."""

    total: Tensor
    ce: Tensor
    kd: Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _FusedJob:
    div: ChunkedDivergence
    head: OutputLayer  # the student's
    teacher: Teacher
    labels: Tensor
    num_valid: float | None  # the denominator of CE and D (the window's valid positions); None: this call's
    ce_weight: float
    kd_weight: float
    ce: Tensor | None = None
    kd: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


def fused_objective(
    div: ChunkedDivergence,
    student: ProjectedLogits,
    teacher: Teacher,
    labels: Tensor,
    *,
    ce_weight: float,
    kd_weight: float,
    num_valid: int | float | Tensor | None = None,
) -> FusedTerms:
    """ce_weight · CE + kd_weight · D from the student's hidden states; gradients flow to them and to the output
    weight. `num_valid` is the denominator of both terms (default: this call's valid positions); with
    `kd_weight == 0` the teacher is not read, with `ce_weight == 0` no cross-entropy is taken while training (it is
    still measured without gradients)."""
    if not isinstance(student, ProjectedLogits):
        raise LossConfigError(f"the fused head takes ProjectedLogits, got {type(student).__name__}")
    check_inputs(div, student, teacher, labels)
    nv = check_num_valid(num_valid)
    job = _FusedJob(div, student.head, teacher, labels, nv, float(ce_weight), float(kd_weight))
    weight = student.head.weight
    need_grad = torch.is_grad_enabled() and (student.hidden.requires_grad or weight.requires_grad)
    if need_grad:
        total = _FusedFunction.apply(student.hidden, weight, job)
    else:
        with torch.no_grad():
            total, _, _ = _run_fused(job, student.hidden, need_grad=False)
    assert job.ce is not None and job.kd is not None
    return FusedTerms(total=total, ce=job.ce, kd=job.kd, stats=job.stats)


def _run_fused(
    job: _FusedJob, hidden: Tensor, need_grad: bool, weight_grad: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(total, ∂total/∂hidden, ∂total/∂weight or None without `weight_grad`); the parts and stats land on the job."""
    head = job.head
    width, device = head.width, hidden.device
    cdtype = compute_dtype(head.dtype)
    out_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
    rows = Rows(job.labels)
    grad_h = grad_w = None
    if need_grad:
        grad_h = torch.zeros((rows.total, head.hidden_size), dtype=hidden.dtype, device=device)
        if weight_grad:
            grad_w = torch.zeros(head.weight.shape, dtype=_grad_dtype(head.weight), device=device)
    ce_total = torch.zeros((), dtype=torch.float64, device=device)
    # Without gradients (eval) the cross-entropy is taken whatever its weight: it is the metric runs are compared
    # by, and a pure-KD objective (ce_weight 0) would otherwise report an eval CE of 0.
    with_kd, with_ce = job.kd_weight > 0.0, job.ce_weight > 0.0 or not need_grad
    count = job.num_valid if job.num_valid is not None else float(rows.n)
    div_job = _Job(job.div, job.teacher, job.labels, job.num_valid)
    chunked: DivergencePass | None = None
    if rows.n == 0:
        job.stats = DivergencePass.empty_stats(div_job) if with_kd else {}
    else:
        if with_kd:
            chunked = DivergencePass(div_job, rows, width, device, cdtype, fused=True)
            chunk, block = chunked.chunk, chunked.block
        else:
            chunk = job.div.chunk_rows(rows.n, width, device, cdtype, sparse=False, fused=True, kd=False)
            block = fused_block_rows(rows.n, chunk)
        take_h = rows.source(hidden.detach())
        take_y = rows.source(job.labels)
        kept = head.kept_weight()
        weight_sum = WeightGradient(head, grad_w, rows.n) if grad_w is not None else None
        ce_scale = job.ce_weight / count
        # The cross-entropy from the divergence's own softmax where it can (`DivergencePass.ce_coef`), else its own.
        ce_coef = chunked.ce_coef(ce_scale, job.kd_weight) if chunked is not None and with_ce else None
        # The products run in the head's dtype exactly as written here, whatever autocast state the caller is in.
        with torch.autocast(device.type, enabled=False):
            # A block's logits are projected at once (the products' speed); its chunks (the last one maybe short) are
            # taken one by one, and each chunk's ∂loss/∂u overwrites its logits, so that the block's products back
            # into ∂/∂h and ∂/∂W run on one tensor.
            for b in rows.chunks(block):
                h = take_h(b)
                zb = head.logits(h, kept)
                tb = chunked.teacher_rows(b) if chunked is not None else None
                has_grad = False
                for c in rows.split(b, chunk):
                    z = zb[c.lo - b.lo : c.hi - b.lo]
                    # ∂loss/∂z is factor · grad_z (the factor is applied as it is written over z)
                    t = tb[c.lo - b.lo : c.hi - b.lo] if tb is not None else None
                    grad_z: Tensor | None = None
                    factor: float | Tensor = 1.0
                    if chunked is not None:
                        g, scale, ce_rows = chunked.step(c, z, need_grad, t_rows=t, ce_coef=ce_coef)
                        if ce_rows is not None:
                            ce_total += ce_rows.sum(dtype=torch.float64)
                        if g is not None:
                            grad_z, factor = g, scale * job.kd_weight
                    if with_ce and ce_coef is None:
                        ce_rows, ce_grad = _cross_entropy_rows(z, take_y(c), cdtype, need_grad)
                        ce_total += ce_rows.sum(dtype=torch.float64)
                        if ce_grad is not None:
                            if grad_z is None:
                                grad_z, factor = ce_grad, ce_scale
                            else:
                                grad_z = grad_z.mul_(factor).add_(ce_grad, alpha=ce_scale)
                                factor = 1.0
                    if grad_z is not None:
                        head.backward_into(grad_z, z, factor)
                        has_grad = True
                    grad_z = g = ce_grad = None  # this chunk's workspace goes before the next chunk's is made
                if has_grad:
                    assert grad_h is not None
                    rows.put(grad_h, b, zb @ kept, 1.0)
                    if weight_sum is not None:
                        weight_sum.add(zb, h)
                # This block's logits (and the chunks' views of them) go before the next block is projected: the
                # loop's rebinding alone would hold two blocks of logits at that projection, the head's peak.
                del zb, tb, z, t
            if weight_sum is not None:
                weight_sum.flush()
        if chunked is not None:
            job.stats = chunked.finish()
    kd = chunked.total.to(out_dtype) if chunked is not None else torch.zeros((), dtype=out_dtype, device=device)
    ce = (ce_total / count).to(out_dtype) if rows.n else torch.zeros((), dtype=out_dtype, device=device)
    job.ce, job.kd = ce, kd
    total = job.ce_weight * ce + job.kd_weight * kd
    return total, grad_h, grad_w


def _cross_entropy_rows(z: Tensor, y: Tensor, cdtype: torch.dtype, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-row −log softmax(z)_y and, with a gradient, softmax(z) − onehot(y) (T = 1, in the compute dtype)."""
    x = z.to(cdtype)
    if x is z:
        x = x.clone()  # the divergence may still read z; x is overwritten below
    yi = y.to(torch.int64).unsqueeze(1)
    lse = logsumexp_rows(x).unsqueeze(1)
    loss = (lse - x.gather(1, yi)).squeeze(1)
    if not need_grad:
        return loss, None
    grad = x.sub_(lse).exp_()
    grad.scatter_add_(1, yi, torch.full_like(yi, -1.0, dtype=grad.dtype))
    return loss, grad


def _grad_dtype(weight: Tensor) -> torch.dtype:
    """∂/∂W accumulates over chunks in at least float32, whatever the weight's own dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class _FusedFunction(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward hands them to autograd."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, job: _FusedJob) -> Tensor:  # type: ignore[override]
        total, grad_h, grad_w = _run_fused(job, hidden, need_grad=True, weight_grad=ctx.needs_input_grad[1])
        assert grad_h is not None
        ctx.grads = (grad_h.view(hidden.shape), grad_w, weight.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor | None, None]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "the fused head hands its gradients to autograd on the first backward; backward through the same "
                "loss twice (retain_graph=True) is not supported — recompute the loss"
            )
        grad_h, grad_w, weight_dtype = ctx.grads
        ctx.grads = None
        if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
            grad_h.mul_(grad_output.to(grad_h.dtype))
            if grad_w is not None:
                grad_w.mul_(grad_output.to(grad_w.dtype))
        return grad_h, None if grad_w is None else grad_w.to(weight_dtype), None
