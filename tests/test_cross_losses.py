"""`uld` and `hybrid` (teacher and student of different tokenizers) against a float64 reference: values and
gradients, plain and fused, chunked or not, with unpaired positions, top-k truncation and shared tokens.

The reference is the definition in docs/methods.md written the slow, obvious way: full sorts, a loop over rows,
autograd through softmax and sort."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kdcli.losses import AlignedTeacher, SparseTeacher, get_cross_tokenizer, get_loss
from kdcli.losses.fused import fused_objective
from kdcli.losses.kernel import LossConfigError
from kdcli.losses.projection import OutputLayer, ProjectedLogits

F64 = torch.float64


def ref_row(q: Tensor, p: Tensor, shared: Tensor, k: int, hybrid: bool) -> Tensor:
    """D of one position: q [Vs] (differentiable), p [Vt], shared [Vt] student id or −1 (docs/methods.md)."""
    vals, ids = p.sort(descending=True)
    vals, ids = vals[:k], ids[:k]
    r = p.sum() - vals.sum()
    sid = shared[ids] if hybrid else torch.full_like(ids, -1)
    on = sid >= 0
    d = q.new_zeros(())
    star = torch.ones_like(q, dtype=torch.bool)
    if hybrid:
        star[sid[on]] = False
        p_a, q_a = vals[on], q[sid[on]]
        p_star, q_star = p.sum() - p_a.sum(), q[star].sum()
        d = d + (p_a * (p_a.log() - q_a.log())).sum()
        if p_star > 0:
            d = d + p_star * (p_star.log() - q_star.log())
    teacher_rest = vals[~on]  # the teacher's non-shared top-k entries, in order
    m = int(teacher_rest.numel())
    student_rest = q[star].sort(descending=True).values
    top = student_rest[:m]
    if top.numel() < m:
        top = torch.cat([top, q.new_zeros(m - top.numel())])
    d = d + (teacher_rest - top).abs().sum() + (r - student_rest[m:].sum()).abs()
    return d


def reference(
    z: Tensor,
    zt: Tensor,
    pair: Tensor,
    labels: Tensor,
    shared: Tensor,
    k: int,
    hybrid: bool,
    t: float,
    count: int | None = None,
) -> tuple[Tensor, Tensor]:
    z = z.detach().clone().requires_grad_(True)
    q_all = torch.softmax(z / t, dim=-1)
    p_all = torch.softmax(zt / t, dim=-1)
    total = z.new_zeros(())
    valid = labels != -100
    for b, i in valid.nonzero().tolist():
        if pair[b, i] >= 0:
            total = total + ref_row(q_all[b, i], p_all.view(-1, zt.shape[-1])[pair[b, i]], shared, k, hybrid)
    loss = total / (count if count is not None else int(valid.sum()))
    loss.backward()
    return loss.detach(), z.grad


def make(seed: int = 0, *, b: int = 3, t: int = 7, vs: int = 23, vt: int = 31, share: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, vs, generator=g, dtype=F64) * 2
    zt = torch.randn(b, t + 2, vt, generator=g, dtype=F64) * 2  # the teacher's own positions: another length
    labels = torch.randint(0, vs, (b, t), generator=g)
    if t > 2:
        labels[0, :2] = -100
        labels[-1, -1] = -100
    # Each student position paired with some teacher row, a few not at all.
    pair = torch.randperm(b * (t + 2), generator=g)[: b * t].view(b, t)
    if b > 2 and t > 3:
        pair[1, 3] = pair[2, 0] = -1
    # A one-to-one map of part of the teacher's vocabulary into the student's.
    shared = torch.full((vt,), -1, dtype=torch.long)
    chosen = torch.randperm(vt, generator=g)[: int(share * min(vs, vt))]
    shared[chosen] = torch.randperm(vs, generator=g)[: chosen.numel()]
    return z, zt, pair, labels, shared


def aligned(zt: Tensor, pair: Tensor, shared: Tensor, k: int, t: float, big_k: int | None = None) -> AlignedTeacher:
    flat = zt.reshape(-1, zt.shape[-1])
    records = SparseTeacher.from_logits(flat, torch.zeros(flat.shape[0], dtype=torch.long), big_k or k, t)
    return AlignedTeacher.from_records(records, pair, shared, k, t)


def close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a.to(F64), b.to(F64), rtol=tol, atol=tol)


CASES = [
    # (method, k, temperature, chunk_size, share)
    ("uld", 5, 1.0, None, 0.5),
    ("uld", 1, 2.0, 2, 0.5),
    ("uld", 31, 1.0, 4, 0.5),  # k = V_t > V_s: the student's sorted vector is zero-padded, no tail
    ("hybrid", 5, 1.0, None, 0.5),
    ("hybrid", 12, 0.7, 3, 0.8),
    ("hybrid", 31, 1.0, None, 0.9),  # the teacher's full vocabulary, all but 3 student tokens shared
    ("hybrid", 8, 1.0, 5, 0.0),  # nothing shared: hybrid is uld
]


@pytest.mark.parametrize("method,k,temp,chunk,share", CASES)
def test_value_and_gradient_equal_the_float64_definition(method, k, temp, chunk, share) -> None:
    z, zt, pair, labels, shared = make(share=share)
    ref_loss, ref_grad = reference(z, zt, pair, labels, shared, k, method == "hybrid", temp)
    div = get_cross_tokenizer(method, top_k=k, temperature=temp, chunk_size=chunk)
    student = z.clone().requires_grad_(True)
    out = div.compute(student, aligned(zt, pair, shared, k, temp), labels)
    out.loss.backward()
    close(out.loss, ref_loss)
    close(student.grad, ref_grad)
    assert out.stats["aligned_fraction"] == pytest.approx(float((pair >= 0)[labels != -100].double().mean()))


def test_records_with_more_entries_are_cut_to_top_k() -> None:
    """A cache or server's K = 16 records used at top_k = 6 give exactly the top-6 definition (the tail grows)."""
    z, zt, pair, labels, shared = make(seed=3)
    ref_loss, ref_grad = reference(z, zt, pair, labels, shared, 6, True, 1.0)
    student = z.clone().requires_grad_(True)
    loss = get_cross_tokenizer("hybrid", top_k=6)(student, aligned(zt, pair, shared, 6, 1.0, big_k=16), labels)
    loss.backward()
    close(loss, ref_loss)
    close(student.grad, ref_grad)


def test_full_vocabulary_uld_is_the_papers_zero_padded_l1() -> None:
    """k ≥ both vocabularies: D = Σ |sorted p − sorted q|, zero-padded (Boizard et al. 2024, eq. of ULD)."""
    z, zt, _, _, shared = make(b=1, t=1)
    p = torch.softmax(zt[0, 0], -1).sort(descending=True).values
    q = torch.softmax(z[0, 0], -1).sort(descending=True).values
    q = torch.cat([q, q.new_zeros(p.numel() - q.numel())])
    teacher = aligned(zt[:, :1], torch.zeros(1, 1, dtype=torch.long), shared, 31, 1.0)
    loss = get_cross_tokenizer("uld", top_k=31)(z, teacher, torch.zeros(1, 1, dtype=torch.long))
    close(loss, (p - q).abs().sum())


def test_one_tokenizer_hybrid_is_forward_kl() -> None:
    """Same vocabulary, every token shared with itself, k = V: ★ is empty and hybrid is KL(p‖q), value and grad."""
    g = torch.Generator().manual_seed(5)
    z, zt = torch.randn(2, 6, 17, generator=g, dtype=F64), torch.randn(2, 6, 17, generator=g, dtype=F64)
    labels = torch.randint(0, 17, (2, 6), generator=g)
    pair = torch.arange(12).view(2, 6)
    a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    hybrid = get_cross_tokenizer("hybrid", top_k=17)(a, aligned(zt, pair, torch.arange(17), 17, 1.0), labels)
    fkl = get_loss("fkl")(b, zt, labels)
    hybrid.backward()
    fkl.backward()
    close(hybrid, fkl)
    close(a.grad, b.grad)


def test_unpaired_positions_add_nothing_but_count() -> None:
    """D = Σ over paired positions / the student's valid positions (`num_valid` of the window when given)."""
    z, zt, pair, labels, shared = make(seed=1)
    ref_loss, ref_grad = reference(z, zt, pair, labels, shared, 4, False, 1.0, count=50)
    student = z.clone().requires_grad_(True)
    loss = get_cross_tokenizer("uld", top_k=4)(student, aligned(zt, pair, shared, 4, 1.0), labels, num_valid=50)
    loss.backward()
    close(loss, ref_loss)
    close(student.grad, ref_grad)
    no_pairs = aligned(zt, torch.full_like(pair, -1), shared, 4, 1.0)
    empty = get_cross_tokenizer("uld", top_k=4).compute(z.clone().requires_grad_(True), no_pairs, labels)
    assert float(empty.loss.detach()) == 0.0 and empty.stats["aligned_fraction"] == 0.0


@pytest.mark.parametrize("method", ["uld", "hybrid"])
def test_fused_head_equals_the_plain_path(method: str) -> None:
    """From hidden states (the fused head) the same CE + D and the same gradients as from whole logits."""
    g = torch.Generator().manual_seed(2)
    _, zt, pair, labels, shared = make(seed=2)
    hidden = torch.randn(3, 7, 6, generator=g, dtype=F64)
    weight = torch.randn(23, 6, generator=g, dtype=F64)
    div = get_cross_tokenizer(method, top_k=5, chunk_size=4)
    teacher = aligned(zt, pair, shared, 5, 1.0)
    count = int((labels != -100).sum())
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        student = ProjectedLogits(h, OutputLayer(w, 23, F64))
        if fused:
            total = fused_objective(div, student, teacher, labels, ce_weight=0.4, kd_weight=0.6, num_valid=count).total
        else:
            z = student.materialise()
            ce = torch.nn.functional.cross_entropy(z[labels != -100], labels[labels != -100], reduction="sum") / count
            total = 0.4 * ce + 0.6 * div(z, teacher, labels, num_valid=count)
        total.backward()
        results.append((total.detach(), h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        close(a, b)


class LargestTensors(TorchDispatchMode):
    """Records, per dtype, the most elements of any tensor an operation returns while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


@pytest.mark.parametrize("method", ["uld", "hybrid"])
def test_memory_stays_bounded_by_the_chunk(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 student: no float64 tensor as long as one vocabulary row, on either path; on the fused head no tensor
    of more than two chunks of logits, forward and backward (the [tokens, V] logits never exist). The weight
    gradient's row buffer, bounded in bytes (64 MiB), is set to one chunk's rows here so that it cannot hide one,
    and the fused head's block (1,024 rows, more than this test's tokens) to two chunks."""
    from kdcli.losses import projection, sizing

    g = torch.Generator().manual_seed(6)
    n_tokens, vs, vt, hidden_size, chunk, k = 64, 1024, 1500, 8, 8, 16
    monkeypatch.setattr(projection, "WEIGHT_GRADIENT_GROUP_BYTES", chunk * vs * 4)
    monkeypatch.setattr(sizing, "FUSED_BLOCK_ROWS", 2 * chunk)
    zt = torch.randn(n_tokens + 5, vt, generator=g)
    records = SparseTeacher.from_logits(zt, torch.zeros(n_tokens + 5, dtype=torch.long), k, 1.0)
    pair = torch.randperm(n_tokens + 5, generator=g)[:n_tokens].view(2, -1)
    shared = torch.full((vt,), -1, dtype=torch.long)
    shared[:600] = torch.randperm(vs, generator=g)[:600]
    teacher = AlignedTeacher.from_records(records, pair, shared, k, 1.0)
    labels = torch.randint(0, vs, (2, n_tokens // 2), generator=g)
    div = get_cross_tokenizer(method, top_k=k, chunk_size=chunk)
    h = torch.randn(2, n_tokens // 2, hidden_size, generator=g, requires_grad=True)
    w = torch.randn(vs, hidden_size, generator=g, requires_grad=True)
    z = torch.randn(2, n_tokens // 2, vs, generator=g, requires_grad=True)
    with LargestTensors() as fused:
        terms = fused_objective(
            div, ProjectedLogits(h, OutputLayer(w, vs, torch.float32)), teacher, labels, ce_weight=0.5, kd_weight=0.5
        )
        terms.total.backward()
    with LargestTensors() as plain:
        div(z, teacher, labels).backward()
    assert h.grad is not None and z.grad is not None and float(terms.kd) > 0
    for seen in (fused.largest, plain.largest):
        assert seen.get(F64, 0) < vs, seen
    assert max(fused.largest.values()) <= 2 * chunk * vs, fused.largest


def test_float32_student_is_close_to_float64() -> None:
    z, zt, pair, labels, shared = make(seed=4)
    ref_loss, ref_grad = reference(z, zt, pair, labels, shared, 6, True, 1.0)
    student = z.float().requires_grad_(True)
    loss = get_cross_tokenizer("hybrid", top_k=6)(student, aligned(zt.float(), pair, shared, 6, 1.0), labels)
    loss.backward()
    assert loss.dtype == torch.float32
    close(loss, ref_loss, tol=1e-5)
    close(student.grad, ref_grad, tol=1e-5)


def test_a_divergence_and_a_teacher_of_the_wrong_kind_are_refused() -> None:
    z, zt, pair, labels, shared = make()
    with pytest.raises(LossConfigError, match="AlignedTeacher"):
        get_loss("fkl")(z, aligned(zt, pair, shared, 4, 1.0), labels)
    with pytest.raises(LossConfigError, match="'uld'"):
        get_cross_tokenizer("uld")(z, z, labels)
    with pytest.raises(LossConfigError, match="top_k=3"):
        get_cross_tokenizer("uld", top_k=3)(z, aligned(zt, pair, shared, 4, 1.0), labels)
    with pytest.raises(LossConfigError, match="unknown cross-tokenizer method 'uldd'; did you mean 'uld'"):
        get_cross_tokenizer("uldd")
    with pytest.raises(LossConfigError, match="top_k"):
        get_cross_tokenizer("hybrid", top_k=0)


def test_registry_lists_the_cross_tokenizer_methods_apart() -> None:
    """`kd losses` shows them in their own table; their defaults come from the registry, as every divergence's."""
    import inspect

    from kdcli.losses import CROSS_TOKENIZER, LOSSES

    assert list(CROSS_TOKENIZER) == ["uld", "hybrid"] and not set(CROSS_TOKENIZER) & set(LOSSES)
    for name, spec in CROSS_TOKENIZER.items():
        assert dict(spec.params) == {"top_k": 64, "temperature": 1.0, "chunk_size": None}
        assert "2402.12030" in spec.paper and spec.build().params == dict(spec.params)
        sig = inspect.signature(spec.cls.__init__)
        assert all(p.default is inspect.Parameter.empty for p in sig.parameters.values()), name
    with pytest.raises(LossConfigError, match="unknown divergence 'uld'"):
        get_loss("uld")  # loss.divergence takes one vocabulary's divergences only
