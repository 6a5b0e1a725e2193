"""Universal Logit Distillation and its hybrid with KL on the tokens both tokenizers share.

uld (Boizard et al. 2024, arXiv 2402.12030): the L1 distance between the sorted probability vectors of teacher and
student, zero-padded to a common length; it is the Wasserstein-1 distance of the paper, and the least Σ_v |p_v −
q_π(v)| over all one-to-one matchings π of the two vocabularies (matching by rank is optimal). kd keeps the teacher's
k largest entries and one tail slot for the rest (`kdcli.losses.cross`, layout `ranked`):

    D = Σ_{i<k} |p_(i) − q_(i)| + |r − q_tail|,      ∂D/∂log Q_b = sign(Q_b − P_b) · Q_b   (sign(0) = 0).

hybrid: KL(p̂‖q̂) on the layout `shared` (each shared top-k token alone, the rest ★ in one bucket) plus the same L1
on the ranked ★ layout, whose teacher entries are then only its non-shared top-k tokens:

    D = Σ_{i∈S_k} p_i (log p_i − log q_s(i)) + p★ (log p★ − log q★) + Σ_{i<m} |p★_(i) − q★_(i)| + |r − q★_tail|,
    ∂D/∂log Q_b = −P_b on `shared`, as uld on `ranked`.

With every token shared (one tokenizer) ★ is empty and hybrid is KL(p‖q) on the top-k buckets; with none shared it
is uld. The definitions and their parameters are in docs/methods.md ("Across tokenizers").
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .cross import AlignedBuckets, AlignedDivergence, AlignedOut
from .kernel import rowdot


def _sorted_l1(p: Tensor, q: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    diff = q - p
    loss = diff.abs().sum(dim=-1)
    return loss, diff.sign_().mul_(q) if need_grad else None


class UniversalLogit(AlignedDivergence):
    """Σ |p_(i) − q_(i)| over the sorted probabilities, the teacher's tail in one slot."""

    name: ClassVar[str] = "uld"

    def aligned_kernel(self, b: AlignedBuckets, need_grad: bool) -> AlignedOut:
        loss, h = _sorted_l1(b.ranked.p, b.ranked.q, need_grad)
        return AlignedOut(loss, h, None)


class HybridULD(AlignedDivergence):
    """KL on the shared tokens (and ★ as one bucket) plus uld on the ★ tokens."""

    name: ClassVar[str] = "hybrid"
    stat_names: ClassVar[tuple[str, ...]] = ("aligned_fraction", "shared_mass")
    uses_shared: ClassVar[bool] = True

    def aligned_kernel(self, b: AlignedBuckets, need_grad: bool) -> AlignedOut:
        assert b.shared is not None
        sh = b.shared
        loss, h_ranked = _sorted_l1(b.ranked.p, b.ranked.q, need_grad)
        k = int(sh.p.shape[1]) - 1
        stats = {"shared_mass": sh.p[:, :k].sum()}  # the teacher's mass on shared top-k tokens, summed over rows
        loss = loss + rowdot(sh.p, sh.logp.sub_(sh.logq))
        return AlignedOut(loss, h_ranked, sh.p.neg() if need_grad else None, stats)
