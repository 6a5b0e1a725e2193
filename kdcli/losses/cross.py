"""Cross-tokenizer divergences: their kernel contract and the chunk function that feeds it (`uld`, `hybrid`).

The teacher is an `AlignedTeacher` (its top-k log-probs at the paired position, which of those tokens the student
also has, the tail mass). Per row, with ★ the student's tokens other than the shared ones of the teacher's top k
(S_k), the chunk function builds two bucket layouts of k + 1 slots each, for teacher (p) and student (q):

- `ranked`: slot i < k holds the i-th largest ★ probability: the teacher's non-shared top-k entries in their order
  (m of them; slots m..k−1 are 0 for both), the student's m largest ★ tokens; slot k the rest of ★ (the teacher's
  tail r, the student's ★ mass beyond its m largest).
- `shared` (`hybrid` only): slot i < k the teacher's i-th token when it is shared, p_i and q of the student's token
  with that string (0 otherwise); slot k the ★ masses p★ = r + Σ_{i∉S_k} p_i and q★ = 1 − Σ_{S_k} q.

The kernel returns D and h = ∂D/∂log Q for each layout. Each layout is a partition of the student's vocabulary
(`ranked`'s tokens outside ★ form one more bucket with h = 0), so the gradient with respect to the tempered logits
x = z/T is the sum over both partitions of the softmax Jacobian the plain driver uses:

    ∂D/∂x_v = Σ_layouts [ h_b(v) · q_v / Q_b(v) − q_v · Σ_b h_b ]

(the student's order is a permutation of its tokens, so a ranked slot is a singleton bucket; ties are a subgradient).
Unpaired rows are weighed 0 by `plan`; the loss is still Σ over paired rows / the student's valid positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .aligned import AlignedTeacher
from .kernel import (
    Buckets,
    ChunkedDivergence,
    KernelOut,
    LossConfigError,
    RowPlan,
    Rows,
    Teacher,
    clamp_log_,
    compute_dtype,
    logsumexp_rows,
    tempered_copy,
)


@dataclass
class AlignedBuckets:
    """The two layouts of one chunk (module docstring), compute dtype, [n, k + 1] each."""

    ranked: Buckets
    shared: Buckets | None  # None: the divergence does not use shared tokens (`uld`)


@dataclass
class AlignedOut:
    loss: Tensor  # [n]
    h_ranked: Tensor | None  # [n, k + 1] ∂D/∂log Q over `ranked`; None without a gradient
    h_shared: Tensor | None  # [n, k + 1] over `shared`; None without a gradient or without shared tokens
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-chunk sums over rows


class AlignedDivergence(ChunkedDivergence):
    """A divergence between a student and a teacher of another tokenizer: it takes an `AlignedTeacher`."""

    param_names: ClassVar[tuple[str, ...]] = ("top_k",)
    stat_names: ClassVar[tuple[str, ...]] = ("aligned_fraction",)
    uses_shared: ClassVar[bool] = False  # whether the `shared` layout is built (`hybrid`)

    def __init__(self, *, top_k: int, temperature: float, chunk_size: int | None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise LossConfigError(f"parameter 'top_k' of '{self.name}' must be a positive int, got {top_k!r}")
        self.top_k = int(top_k)

    def aligned_kernel(self, b: AlignedBuckets, need_grad: bool) -> AlignedOut:
        raise NotImplementedError

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        raise LossConfigError(f"'{self.name}' compares vocabularies of two tokenizers: give it an AlignedTeacher")

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
        """Paired rows weigh 1 / denom, the others 0: D is summed over paired positions, divided by all of them."""
        assert isinstance(teacher, AlignedTeacher)
        paired = rows.source(teacher.paired)(rows.whole()).to(cdtype)
        fraction = float(paired.mean()) if rows.n else 0.0
        return RowPlan(weight=paired.div_(denom), stats={"aligned_fraction": fraction})


def aligned_chunk(
    div: AlignedDivergence,
    s_rows: Tensor,
    logprobs: Tensor,
    shared: Tensor,
    tail_mass: Tensor,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """One chunk against an aligned teacher: (per-row D, ∂D/∂(z_s/T) or None, stat sums)."""
    cdtype = compute_dtype(s_rows.dtype)
    neg_inf = float("-inf")
    x = tempered_copy(s_rows, div.temperature)  # modified in place below
    n, k = int(x.shape[0]), int(logprobs.shape[1])
    lse = logsumexp_rows(x).unsqueeze(1)
    q = torch.exp(x - lse)
    p_top = torch.exp(logprobs.to(cdtype))
    r = tail_mass.to(cdtype).unsqueeze(1)
    sid = shared.to(torch.long)
    is_sh = (sid >= 0) if div.uses_shared else torch.zeros_like(sid, dtype=torch.bool)
    sid = sid.clamp_min(0)  # placeholder index where not shared: every value written there below is neutral

    sh: Buckets | None = None
    if div.uses_shared:
        q_sh = torch.where(is_sh, q.gather(1, sid), 0.0)
        logq_sh = torch.where(is_sh, x.gather(1, sid) - lse, neg_inf)
        # ★: the shared tokens masked out (amin leaves the placeholder's logit as it was).
        x.scatter_reduce_(1, sid, torch.where(is_sh, neg_inf, float("inf")).to(cdtype), reduce="amin")
        log_q_star = logsumexp_rows(x).unsqueeze(1) - lse
        p_star = r + torch.where(is_sh, 0.0, p_top).sum(dim=1, keepdim=True)
        sh = Buckets(
            p=torch.cat([torch.where(is_sh, p_top, 0.0), p_star], dim=1),
            q=torch.cat([q_sh, log_q_star.exp()], dim=1),
            logp=clamp_log_(torch.cat([torch.where(is_sh, logprobs.to(cdtype), neg_inf), p_star.log()], dim=1)),
            logq=clamp_log_(torch.cat([logq_sh, log_q_star], dim=1)),
        )

    # ranked: the teacher's non-shared top-k entries first, in their order; the student's m largest ★ tokens.
    order = torch.sort(is_sh.to(torch.uint8), dim=1, stable=True).indices
    m = k - is_sh.sum(dim=1, keepdim=True)
    live = torch.arange(k, device=x.device).unsqueeze(0) < m
    p_rank = torch.where(live, p_top.gather(1, order), 0.0)
    kk = min(k, int(x.shape[1]))
    vals, idx = x.topk(kk, dim=1)
    if kk < k:  # fewer student tokens than k: its sorted vector is zero-padded (placeholder index 0, never live)
        vals = torch.cat([vals, vals.new_full((n, k - kk), neg_inf)], dim=1)
        idx = torch.cat([idx, idx.new_zeros((n, k - kk))], dim=1)
        live_s = live & (torch.arange(k, device=x.device).unsqueeze(0) < kk)
    else:
        live_s = live
    logq_rank = torch.where(live_s, vals - lse, neg_inf)
    x.scatter_reduce_(1, idx, torch.where(live_s, neg_inf, float("inf")).to(cdtype), reduce="amin")
    log_q_tail = logsumexp_rows(x).unsqueeze(1) - lse
    ranked = Buckets(
        p=torch.cat([p_rank, r], dim=1),
        q=torch.cat([logq_rank.exp(), log_q_tail.exp()], dim=1),
        logp=clamp_log_(torch.cat([torch.where(live, logprobs.to(cdtype).gather(1, order), neg_inf), r.log()], 1)),
        logq=clamp_log_(torch.cat([logq_rank, log_q_tail], dim=1)),
    )
    out = div.aligned_kernel(AlignedBuckets(ranked, sh), need_grad)
    if not need_grad:
        return out.loss, None, out.stats
    assert out.h_ranked is not None
    h_rank = out.h_ranked
    # Per unit of q_v: the ★-tail bucket's share and the ★ bucket's share (0 where the bucket is empty).
    q_tail = ranked.q[:, k:]
    coef_tail = torch.where(q_tail > 0, h_rank[:, k:] / q_tail, 0.0)
    total = h_rank.sum(dim=1, keepdim=True)
    coef_star = torch.zeros_like(coef_tail)
    if sh is not None:
        assert out.h_shared is not None
        q_star = sh.q[:, k:]
        coef_star = torch.where(q_star > 0, out.h_shared[:, k:] / q_star, 0.0)
        total = total + out.h_shared.sum(dim=1, keepdim=True)
    q_rank = ranked.q[:, :k]
    grad = q.mul_(coef_tail + coef_star - total)  # every token as a ★-tail token, then corrected:
    grad.scatter_add_(1, idx, torch.where(live_s, h_rank[:, :k] - q_rank * coef_tail, 0.0))  # ranked ★ tokens
    if sh is not None:
        assert out.h_shared is not None
        fix = out.h_shared[:, :k] - sh.q[:, :k] * (coef_tail + coef_star)  # shared tokens: in neither ★ bucket
        grad.scatter_add_(1, sid, torch.where(is_sh, fix, 0.0))
    return out.loss, grad, out.stats
