"""Adaptive teaching modes, ATKD (Zhong et al., ACL 2024, arXiv 2402.11890; code: WHU-ZQH/ATKD).

For each valid position with label token g (the ground truth, not the teacher's argmax):
    u = 1 − p_g (teacher uncertainty),
    TKD = KL(p_b ‖ q_b) with p_b = [p_g, 1 − p_g], q_b = [q_g, 1 − q_g],
    DKD = KL(p̂ ‖ q̂) over v ≠ g with p̂_v = p_v / (1 − p_g), q̂_v = q_v / (1 − q_g);
    base 'rkl' swaps the arguments of both. Identity (fkl base): KL(p‖q) = TKD + (1 − p_g) · DKD.
Per micro-batch the hard set is the ⌈k·N⌉ valid positions with the largest u (ties: earlier position first), the
rest are easy, and
    L = λ · mean_easy(DKD) + (1 − λ) · mean_hard(TKD + DKD),  an empty group contributing 0.
Accumulation: with `num_valid` the micro-batch contributes (N_micro / num_valid) · L, so summing micro-batches of
one window gives the N-weighted mean of their L (the split itself stays per micro-batch, as in the paper).

Gradients (S_p = Σ_{v≠g} p_v, S_q = Σ_{v≠g} q_v computed as sums, not 1 − p_g, so a confident teacher keeps
precision; a = 1 on hard rows, 0 on easy ones), with respect to log q:
  fkl base: h_v = q_v (1 − a S_p)/S_q − p_v/S_p (v ≠ g),  h_g = −a p_g.
  rkl base: h_v = q_v [(log q_v − log p_v − log S_q + log S_p − DKD)/S_q + a (log S_q − log S_p + 1)] (v ≠ g),
            h_g = a q_g (log q_g − log p_g + 1).
Where S_p = 0 or S_q = 0 the non-target distribution is undefined and DKD is taken as 0.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .kernel import (
    Buckets,
    ChunkedDivergence,
    KernelOut,
    LossConfigError,
    RowPlan,
    Rows,
    Teacher,
    check_float,
    rowdot,
    safe_log,
    teacher_label_logprobs,
)


def hard_count(k: float, n: int) -> int:
    """⌈k·N⌉, immune to float noise such as 0.7 · 10 = 7.000000000000001."""
    return min(n, math.ceil(round(k * n, 9)))


class AdaptiveTeaching(ChunkedDivergence):
    """λ · mean_easy(DKD) + (1−λ) · mean_hard(TKD + DKD), split by teacher uncertainty of the label."""

    name: ClassVar[str] = "atkd"
    param_names: ClassVar[tuple[str, ...]] = ("k", "lam", "base")
    stat_names: ClassVar[tuple[str, ...]] = ("atkd_hard_fraction", "atkd_teacher_uncertainty")
    needs_target: ClassVar[bool] = True

    def __init__(
        self,
        *,
        k: float,
        lam: float,
        base: str,
        temperature: float,
        chunk_size: int | None,
    ) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size)
        self.k = check_float(self.name, "k", k, 0.0, 1.0, lo_open=False, hi_open=False)
        self.lam = check_float(self.name, "lam", lam, 0.0, 1.0, lo_open=False, hi_open=False)
        if base not in ("fkl", "rkl"):
            raise LossConfigError(f"parameter 'base' of 'atkd' must be 'fkl' or 'rkl', got {base!r}")
        self.base = base

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
        n = rows.n
        logp_g = teacher_label_logprobs(self, rows, teacher, labels, vocab, cdtype, chunk)
        n_hard = hard_count(self.k, n)
        # Ascending log p_g is descending u; the stable sort puts the earlier position first among ties.
        order = torch.sort(logp_g, stable=True).indices
        hard = torch.zeros(n, dtype=cdtype, device=logp_g.device)
        hard[order[:n_hard]] = 1.0
        n_easy = n - n_hard
        w_hard = (1.0 - self.lam) / n_hard if n_hard else 0.0
        w_easy = self.lam / n_easy if n_easy else 0.0
        scale = n / denom  # N_micro / num_valid (1 without num_valid)
        weight = torch.full_like(hard, w_easy * scale)
        weight[order[:n_hard]] = w_hard * scale
        u = -torch.expm1(logp_g.to(torch.float64))
        stats = {"atkd_hard_fraction": n_hard / n, "atkd_teacher_uncertainty": float(u.mean())}
        return RowPlan(weight=weight, hard=hard, stats=stats)

    def kernel(self, b: Buckets, need_grad: bool) -> KernelOut:
        assert b.target is not None and b.hard is not None
        g = b.target.unsqueeze(1)
        a = b.hard.unsqueeze(1)
        p, q = b.p, b.q
        p_g, q_g = p.gather(1, g), q.gather(1, g)
        lp_g, lq_g = b.logp.gather(1, g), b.logq.gather(1, g)
        # Zero the target so sums and dot products run over v ≠ g only; q is restored before returning.
        p.scatter_(1, g, 0.0)
        q.scatter_(1, g, 0.0)
        s_p = p.sum(dim=1, keepdim=True)
        s_q = q.sum(dim=1, keepdim=True)
        ok = (s_p > 0) & (s_q > 0)
        ls_p, ls_q = safe_log(s_p), safe_log(s_q)
        inv_p = torch.where(ok, 1.0 / s_p, 0.0)
        inv_q = torch.where(ok, 1.0 / s_q, 0.0)
        h: Tensor | None = None
        if self.base == "fkl":
            d = b.logp.sub_(b.logq)
            dkd = torch.where(ok, rowdot(p, d).unsqueeze(1) * inv_p - ls_p + ls_q, 0.0)
            tkd = p_g * (lp_g - lq_g) + s_p * (ls_p - ls_q)
            if need_grad:
                h = p.mul_(-inv_p).addcmul_(q, (1.0 - a * s_p) * inv_q)
                h.scatter_(1, g, -a * p_g)
        else:
            d = b.logq.sub_(b.logp)
            dkd = torch.where(ok, rowdot(q, d).unsqueeze(1) * inv_q - ls_q + ls_p, 0.0)
            tkd = q_g * (lq_g - lp_g) + s_q * (ls_q - ls_p)
            if need_grad:
                c0 = (ls_p - ls_q - dkd) * inv_q + a * (ls_q - ls_p + 1.0)
                h = d.mul_(inv_q).add_(c0).mul_(q)
                h.scatter_(1, g, a * q_g * (lq_g - lp_g + 1.0))
        q.scatter_(1, g, q_g)
        loss = (a * tkd + dkd).squeeze(1)
        return KernelOut(loss, h)
