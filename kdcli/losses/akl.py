"""Adaptive KL (Wu et al., COLING 2025, arXiv 2404.02657; code: wutaiqiang/LLM_KD_AKL).

Per valid position, with μ ∈ (0, 1]:
1. Sort the teacher probabilities descending, p_(1) ≥ p_(2) ≥ …, cumulative sums c_(i).
2. Head H = sorted entries with c_(i) ≤ μ, plus the top-1 entry always; the entry whose cumulative sum first
   exceeds μ belongs to the tail. For μ = 1 the head is every entry (so rounding in Σp cannot move the last one).
3. With q̄ = stopgrad(q): g_head = Σ_{v∈H} |p_v − q̄_v|, g_tail = Σ_{v∉H} |p_v − q̄_v|.
4. w_head = g_head / (g_head + g_tail), w_tail = 1 − w_head, no gradient through the weights; when
   g_head + g_tail = 0 (p = q, so D = 0) kd uses w_head = ½.
5. D = w_head · KL(p‖q) + w_tail · KL(q‖p);  ∂D/∂log q = −w_head p + w_tail q ⊙ (1 − (log p − log q)).

Speed: a full sort of V entries per position is what makes naive AKL slow. The head is found from torch.topk over
the first AKL_TOPK entries; only rows whose head may extend past them (c_(k) ≤ μ: a flat teacher) retry with an 8×
longer shortlist, and a shortlist longer than V/4 becomes a full stable sort. Ties at the μ boundary follow
torch.topk / stable-sort order.

Cached teacher (buckets [top-K..., label-if-outside, tail]): steps 1–2 run over the K top-K buckets only
(`Buckets.ranked`); the label bucket and the tail bucket are always in the tail. They hold tokens ranked below every
top-K token, in an order the cache does not know, so a large tail bucket must not sort first and become "the head".
Whenever the top-K mass exceeds μ the dense head lies inside the top K, so this head is exactly the dense one and
g_head the dense value; g_tail, taken over buckets, satisfies Σ_b |P_b − Q_b| ≤ Σ_{v∉H} |p_v − q̄_v|, with equality
when p − q̄ has one sign within each bucket, so w_head is then the dense value or larger. Otherwise the head is the
whole top K (the dense head would continue into tokens the cache cannot rank). For μ = 1 every bucket is in the
head, as in the dense case.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .kernel import Buckets, ChunkedDivergence, KernelOut, check_float, rowdot

AKL_TOPK = 32


def _head_gap_sorted(vals: Tensor, idx: Tensor, absdiff: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """(g_head, head-may-continue) from the first k sorted teacher entries of each row."""
    head = vals.cumsum(dim=-1) <= mu
    head[:, 0] = True
    return rowdot(absdiff.gather(1, idx), head.to(absdiff.dtype)), head[:, -1]


def head_gap(p: Tensor, absdiff: Tensor, mu: float) -> Tensor:
    """g_head = Σ_{v∈H} |p_v − q_v| per row, H the teacher head at mass μ (see module docstring).

    Shortlists of growing size (AKL_TOPK, ×8, ×8, …) are tried only on the rows whose head may extend past the
    current one (its last entry is still inside the head); a shortlist beyond a quarter of the row becomes a
    stable full sort, which is then exact by definition.
    """
    m = p.shape[-1]
    if mu >= 1.0:
        return absdiff.sum(dim=-1)
    k = min(m, AKL_TOPK)
    if k * 4 > m:
        k = m
    gap = p.new_zeros(p.shape[0])
    pending: Tensor | None = None  # None: all rows
    while True:
        p_rows = p if pending is None else p[pending]
        d_rows = absdiff if pending is None else absdiff[pending]
        if k >= m:
            vals, idx = torch.sort(p_rows, dim=-1, descending=True, stable=True)
        else:
            vals, idx = p_rows.topk(k, dim=-1)
        g, more = _head_gap_sorted(vals, idx, d_rows, mu)
        if pending is None:
            gap = g
        else:
            gap.index_copy_(0, pending, g)
        if k >= m:
            return gap
        # The head may continue beyond the k-th entry only where the top-k mass is still ≤ μ.
        nxt = more.nonzero().squeeze(1)
        if nxt.numel() == 0:
            return gap
        pending = nxt if pending is None else pending[nxt]
        k = m if k * 8 * 4 > m else k * 8


class AdaptiveKL(ChunkedDivergence):
    """w_head · KL(p‖q) + w_tail · KL(q‖p), weights from where the student is wrong (head vs tail)."""

    name: ClassVar[str] = "akl"
    param_names: ClassVar[tuple[str, ...]] = ("mu",)
    stat_names: ClassVar[tuple[str, ...]] = ("akl_head_weight",)
    tail_sensitive: ClassVar[bool] = True

    def __init__(self, *, mu: float, temperature: float, chunk_size: int | None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        self.mu = check_float(self.name, "mu", mu, 0.0, 1.0, lo_open=True, hi_open=False)

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        absdiff = torch.sub(b.p, b.q).abs_()
        g_total = absdiff.sum(dim=-1)
        # μ = 1 puts every bucket in the head without ranking anything, so lumped buckets are eligible then.
        m = b.p.shape[-1] if b.ranked is None or self.mu >= 1.0 else b.ranked
        g_head = head_gap(b.p[:, :m], absdiff[:, :m], self.mu)
        del absdiff
        w_head = torch.where(g_total > 0, g_head / g_total.clamp_min(torch.finfo(g_total.dtype).tiny), 0.5)
        w_head = w_head.clamp_(0.0, 1.0)
        w_tail = 1.0 - w_head
        d = b.logp.sub_(b.logq)  # log p − log q
        fkl = rowdot(b.p, d)
        rkl = rowdot(b.q, d).neg_()
        loss = w_head * fkl + w_tail * rkl
        stats = {"akl_head_weight": w_head.sum()}
        if not need_grad:
            return KernelOut(loss, None, stats)
        h = d.neg_().add_(1.0).mul_(b.q).mul_(w_tail.unsqueeze(1))
        h.addcmul_(b.p, w_head.unsqueeze(1), value=-1.0)
        return KernelOut(loss, h, stats)
