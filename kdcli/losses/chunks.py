"""The chunk functions: one chunk of valid rows through a divergence's kernel, with its closed-form gradient.

`dense_chunk` builds the buckets from dense teacher logits (the V tokens), `sparse_chunk` from a cached or served
teacher ({top-K tokens, label token, tail}); an aligned teacher of another tokenizer has its own in `cross.py`
(`aligned_chunk`). The driver (`driver.py`) owns which rows a chunk holds, the sums and autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .kernel import Buckets, ChunkedDivergence, clamp_log_, compute_dtype, logsumexp_rows, tempered_copy


class ChunkOut(NamedTuple):
    """A chunk function's per-row D, ∂/∂(z_s/T) (None without a gradient), stat sums and, asked for, per-row CE."""

    loss: Tensor
    grad: Tensor | None
    stats: dict[str, Tensor]
    ce: Tensor | None = None


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
    ce_coef: float | None = None,
) -> ChunkOut:
    """One chunk against dense teacher logits: (per-row D, ∂D/∂(z_s/T) or None, stat sums, None).

    With `ce_coef` (only at T = 1, where the student softmax is the cross-entropy's) the chunk also takes each row's
    cross-entropy −log q_y (the fourth item), and the gradient is that of D + ce_coef · CE: CE's q − onehot(y) folds
    into the softmax Jacobian's q term, so it costs no pass over the [rows, V] logits of its own."""
    cdtype = compute_dtype(s_rows.dtype)
    logq, q = _tempered_log_softmax(s_rows, cdtype, div.temperature)
    logp, p = _tempered_log_softmax(t_rows, cdtype, div.temperature)
    ce: Tensor | None = None
    if ce_coef is not None:
        y = y_rows.to(torch.int64).unsqueeze(1)
        ce = logq.gather(1, y).squeeze(1).neg_()  # before the kernel, which may overwrite logq
    target = y_rows.to(torch.int64) if div.needs_target else None
    out = div.kernel(Buckets(p=p, q=q, logp=logp, logq=logq, target=target, hard=hard), need_grad)
    if not need_grad:
        return ChunkOut(out.loss, None, out.stats, ce)
    assert out.h is not None
    h = out.h
    # Softmax Jacobian: ∂D/∂x = h − q Σh; with the cross-entropy, + ce_coef · (q − onehot(y)).
    coef = h.sum(dim=-1, keepdim=True).neg_()
    if ce_coef is not None:
        coef.add_(ce_coef)
    grad = h.addcmul_(q, coef)
    if ce_coef is not None:
        grad.scatter_add_(1, y, torch.full_like(y, -ce_coef, dtype=grad.dtype))
    return ChunkOut(out.loss, grad, out.stats, ce)


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
) -> ChunkOut:
    """One chunk against a cached teacher, on buckets [top-K..., label-if-outside, tail] (M = K + 2)."""
    cdtype = compute_dtype(s_rows.dtype)
    neg_inf = float("-inf")
    x = tempered_copy(s_rows, div.temperature)  # modified in place below
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
        return ChunkOut(out.loss, None, out.stats)
    assert out.h is not None
    h = out.h
    coef = h.addcmul_(q, h.sum(dim=-1, keepdim=True), value=-1.0)  # ∂D/∂x for singleton buckets
    # Tail tokens: ∂D/∂x_v = r_v · coef_tail with r_v = exp(x_v − lse_tail), the token's share of the tail.
    safe_tail = torch.where(torch.isfinite(lse_tail), lse_tail, torch.zeros_like(lse_tail))
    grad = x.sub_(safe_tail).exp_().mul_(coef[:, k + 1 : k + 2])
    grad.scatter_add_(1, ids, coef[:, :k])
    grad.scatter_add_(1, y, torch.where(has, 0.0, coef[:, k : k + 1]))
    return ChunkOut(out.loss, grad, out.stats)


ChunkFn = Callable[..., ChunkOut]
ChunkFns = tuple[ChunkFn, ChunkFn]  # (dense, sparse)


def compile_chunk_fns(**compile_kwargs: Any) -> ChunkFns:
    """`dense_chunk` and `sparse_chunk` wrapped in torch.compile (what `ChunkedDivergence.compile` installs)."""
    return torch.compile(dense_chunk, **compile_kwargs), torch.compile(sparse_chunk, **compile_kwargs)
