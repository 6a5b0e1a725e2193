"""Golden tests for kdcli.losses against plain float64 autograd references written from the method definitions.

The references below are deliberately straightforward (full softmaxes, autograd, explicit sorting and masking):
they are the definitions, the library is the optimised implementation that must agree with them.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kdcli.losses import LOSSES, SparseTeacher, get_loss

F64 = torch.float64
NEG_INF = float("-inf")

# ------------------------------------------------------------------------------------------------ references


def ref_kl(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ a (log a − log b) with 0·log 0 = 0; the where-before-subtract keeps −inf out of autograd."""
    live = a > 0
    zero = torch.zeros_like(log_a)
    return torch.where(live, a * (torch.where(live, log_a, zero) - torch.where(live, log_b, zero)), zero).sum(-1)


def ref_log(x: Tensor) -> Tensor:
    """log x with log 0 = −inf and no NaN gradient leaking from the x = 0 entries."""
    live = x > 0
    return torch.where(live, torch.log(torch.where(live, x, torch.ones_like(x))), NEG_INF)


def ref_fkl(lp: Tensor, lq: Tensor) -> Tensor:
    return ref_kl(lp.exp(), lp, lq)


def ref_rkl(lp: Tensor, lq: Tensor) -> Tensor:
    return ref_kl(lq.exp(), lq, lp)


def ref_skl(lp: Tensor, lq: Tensor, alpha: float = 0.1) -> Tensor:
    p, q = lp.exp(), lq.exp()
    return ref_kl(p, lp, ref_log(alpha * p + (1 - alpha) * q))


def ref_srkl(lp: Tensor, lq: Tensor, alpha: float = 0.1) -> Tensor:
    p, q = lp.exp(), lq.exp()
    return ref_kl(q, lq, ref_log((1 - alpha) * p + alpha * q))


def ref_js(lp: Tensor, lq: Tensor, beta: float = 0.5) -> Tensor:
    p, q = lp.exp(), lq.exp()
    lm = ref_log(beta * p + (1 - beta) * q)
    return beta * ref_kl(p, lp, lm) + (1 - beta) * ref_kl(q, lq, lm)


def ref_tvd(lp: Tensor, lq: Tensor) -> Tensor:
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


def ref_akl_weight(lp: Tensor, lq: Tensor, mu: float = 0.5, detach: bool = True, ranked: int | None = None) -> Tensor:
    """w_head per position; with `ranked`, only the first `ranked` entries (a cache's top-K buckets) can be head."""
    p, q = lp.exp(), lq.exp()
    qw = q.detach() if detach else q
    m = p.shape[-1] if ranked is None else ranked
    ps, order = torch.sort(p[..., :m], dim=-1, descending=True, stable=True)
    head_sorted = ps.cumsum(-1) <= mu
    head_sorted[..., 0] = True
    head = torch.zeros_like(p, dtype=torch.bool)
    head[..., :m] = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
    if mu >= 1.0:
        head[:] = True
    gap = (p - qw).abs()
    g_head = (gap * head).sum(-1)
    g_tail = (gap * ~head).sum(-1)
    total = g_head + g_tail
    return torch.where(total > 0, g_head / torch.where(total > 0, total, torch.ones_like(total)), 0.5)


def ref_akl(lp: Tensor, lq: Tensor, mu: float = 0.5, detach: bool = True, ranked: int | None = None) -> Tensor:
    w = ref_akl_weight(lp, lq, mu, detach, ranked)
    return w * ref_fkl(lp, lq) + (1 - w) * ref_rkl(lp, lq)


def ref_atkd_parts(lp: Tensor, lq: Tensor, target: Tensor, base: str = "fkl") -> tuple[Tensor, Tensor]:
    """(TKD, DKD) per position, from the explicit binary and renormalised non-target distributions."""
    p, q = lp.exp(), lq.exp()
    g = target.unsqueeze(-1)
    pg, qg = p.gather(-1, g).squeeze(-1), q.gather(-1, g).squeeze(-1)
    pb = torch.stack([pg, 1 - pg], -1)
    qb = torch.stack([qg, 1 - qg], -1)
    onehot = torch.zeros_like(p, dtype=torch.bool).scatter(-1, g, True)
    p_hat = torch.where(onehot, 0.0, p) / (1 - pg).unsqueeze(-1)
    q_hat = torch.where(onehot, 0.0, q) / (1 - qg).unsqueeze(-1)
    if base == "fkl":
        return ref_kl(pb, ref_log(pb), ref_log(qb)), ref_kl(p_hat, ref_log(p_hat), ref_log(q_hat))
    return ref_kl(qb, ref_log(qb), ref_log(pb)), ref_kl(q_hat, ref_log(q_hat), ref_log(p_hat))


def ref_atkd(lp: Tensor, lq: Tensor, target: Tensor, k: float = 0.5, lam: float = 0.2, base: str = "fkl") -> Tensor:
    """ATKD on already-selected valid rows [N, M]."""
    tkd, dkd = ref_atkd_parts(lp, lq, target, base)
    u = 1 - lp.exp().gather(-1, target.unsqueeze(-1)).squeeze(-1)
    n = u.numel()
    n_hard = math.ceil(k * n - 1e-9)
    ranked = sorted(range(n), key=lambda i: (-u[i].item(), i))
    hard = torch.zeros(n, dtype=torch.bool)
    hard[ranked[:n_hard]] = True
    zero = lp.new_zeros(())
    l_easy = dkd[~hard].mean() if (~hard).any() else zero
    l_hard = (tkd + dkd)[hard].mean() if hard.any() else zero
    return lam * l_easy + (1 - lam) * l_hard


REFS = {"fkl": ref_fkl, "rkl": ref_rkl, "skl": ref_skl, "srkl": ref_srkl, "js": ref_js, "tvd": ref_tvd, "akl": ref_akl}


def ref_reduce(name: str, lp: Tensor, lq: Tensor, target: Tensor, labels: Tensor, **params) -> Tensor:
    valid = labels != -100
    if not valid.any():
        return (lq * 0).sum()
    if name == "atkd":
        return ref_atkd(lp[valid], lq[valid], target[valid], **params)
    return REFS[name](lp, lq, **params)[valid].sum() / valid.sum()


def ref_loss(s: Tensor, name: str, t: Tensor, y: Tensor, temperature: float = 1.0, **params) -> Tensor:
    lq = torch.log_softmax(s.to(F64) / temperature, -1)
    lp = torch.log_softmax(t.to(F64) / temperature, -1)
    return ref_reduce(name, lp, lq, y.clamp_min(0), y, **params)


def coarsen(lp: Tensor, lq: Tensor, ids: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bucket log-distributions [top-K..., label-if-outside, tail] and the label's bucket, from dense ones."""
    p, q = lp.exp(), lq.exp()
    yc = y.clamp_min(0).unsqueeze(-1)
    in_top = ids == yc
    has = in_top.any(-1)
    k = ids.shape[-1]

    def buckets(d: Tensor) -> Tensor:
        top = d.gather(-1, ids)
        lab = torch.where(has, 0.0, d.gather(-1, yc).squeeze(-1))
        tail = (1 - top.sum(-1) - lab).clamp_min(0)
        return torch.cat([top, lab.unsqueeze(-1), tail.unsqueeze(-1)], -1)

    target = torch.where(has, in_top.to(torch.int64).argmax(-1), k)
    return ref_log(buckets(p)), ref_log(buckets(q)), target


def ref_sparse_loss(s, name, t, y, ids, temperature=1.0, **params) -> Tensor:
    lq = torch.log_softmax(s.to(F64) / temperature, -1)
    lp = torch.log_softmax(t.to(F64) / temperature, -1)
    lP, lQ, target = coarsen(lp, lq, ids, y)
    if name == "akl":  # the head is chosen among the top-K buckets; the label and tail buckets are tail
        params = {**params, "ranked": ids.shape[-1]}
    return ref_reduce(name, lP, lQ, target, y, **params)


# ---------------------------------------------------------------------------------------------------- data

CONFIGS = [
    ("fkl", {}),
    ("rkl", {}),
    ("skl", {}),
    ("skl", {"alpha": 0.0}),
    ("srkl", {}),
    ("srkl", {"alpha": 0.5}),
    ("js", {}),
    ("js", {"beta": 0.1}),
    ("tvd", {}),
    ("akl", {}),
    ("akl", {"mu": 0.9}),
    ("akl", {"mu": 1.0}),
    ("atkd", {}),
    ("atkd", {"base": "rkl", "k": 0.3, "lam": 0.6}),
]
CONFIG_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CONFIGS]
NAMES = list(LOSSES)


def make_batch(case: str = "random", *, b: int = 3, t: int = 7, v: int = 23, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if case == "prefix":
        b = 1
    s = torch.randn(b, t, v, generator=g, dtype=F64) * 2
    te = torch.randn(b, t, v, generator=g, dtype=F64) * 3
    y = torch.randint(0, v, (b, t), generator=g)
    if case == "prefix":  # one contiguous run of valid rows that does not start at row 0
        y[0, :3] = -100
    elif case != "all_valid":
        y[0, :2] = -100
        y[min(1, b - 1), t // 2] = -100
        y[b - 1, -1] = -100
    if case == "neginf":  # masked vocabulary entries, same positions in teacher and student
        m = torch.rand(b, t, v, generator=g) < 0.3
        m[..., 0] = False  # keep every row normalisable
        s[m] = NEG_INF
        te[m] = NEG_INF
    if case == "identical":
        te = s.clone()
    return s, te, y


def lib_value_grad(name, params, s, teacher, y, **call):
    s = s.detach().clone().requires_grad_(True)
    loss, stats = get_loss(name, **params).compute(s, teacher, y, **call)
    loss.backward()
    return loss.detach(), s.grad, stats


def ref_value_grad(fn, s, *args, **kwargs):
    s = s.detach().clone().to(F64).requires_grad_(True)
    loss = fn(s, *args, **kwargs)
    loss.backward()
    return loss.detach(), s.grad


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a.to(F64), b.to(F64), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------- dense goldens


@pytest.mark.parametrize("case", ["random", "neginf", "prefix", "all_valid"])
@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_dense_matches_reference(name: str, params: dict, case: str) -> None:
    s, t, y = make_batch(case)
    val, grad, _ = lib_value_grad(name, params, s, t, y)
    rval, rgrad = ref_value_grad(ref_loss, s, name, t, y, **params)
    assert val.dtype == F64 and grad.dtype == F64
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    assert val.item() > 1e-3  # the case is not trivially zero
    assert_close(val, rval)
    assert_close(grad, rgrad)
    assert (grad[y == -100] == 0).all()
    if case == "neginf":
        assert (grad[torch.isinf(s)] == 0).all()


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_temperature(name: str, params: dict) -> None:
    s, t, y = make_batch(seed=3)
    val, grad, _ = lib_value_grad(name, {**params, "temperature": 2.5}, s, t, y)
    rval, rgrad = ref_value_grad(ref_loss, s, name, t, y, temperature=2.5, **params)
    assert_close(val, rval)
    assert_close(grad, rgrad)
    val1, _, _ = lib_value_grad(name, params, s, t, y)
    assert abs(val.item() - val1.item()) > 1e-4  # temperature is really applied (and not as a T² factor only)


@pytest.mark.parametrize("name", NAMES)
def test_float32_large_vocab(name: str) -> None:
    """The float32 path (the one training uses) agrees with the float64 reference at a realistic-ish vocab."""
    s, t, y = make_batch(b=2, t=5, v=3000, seed=5)
    val, grad, _ = lib_value_grad(name, {"chunk_size": 3}, s.float(), t.float(), y)
    rval, rgrad = ref_value_grad(ref_loss, s.float(), name, t.float(), y)
    assert val.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(val.double(), rval, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs(name: str, dtype: torch.dtype) -> None:
    s, t, y = make_batch("neginf", seed=7)
    s, t = s.to(dtype), t.to(dtype)
    val, grad, _ = lib_value_grad(name, {}, s, t, y)
    assert val.dtype == torch.float32 and grad.dtype == dtype
    rval, rgrad = ref_value_grad(ref_loss, s, name, t, y)  # reference on the same rounded inputs, in float64
    torch.testing.assert_close(val.double(), rval, rtol=1e-5, atol=1e-6)
    scale = rgrad.abs().max().item()
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_identical_teacher_and_student(name: str, params: dict, dtype: torch.dtype) -> None:
    s, t, y = make_batch("neginf", seed=11)
    s, t = s.to(dtype), s.clone().to(dtype)
    val, grad, _ = lib_value_grad(name, params, s, t, y)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    tol = 1e-12 if dtype == F64 else 1e-6
    assert abs(val.item()) < tol
    assert grad.abs().max().item() < tol


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_all_masked(name: str, params: dict) -> None:
    s, t, y = make_batch()
    y = torch.full_like(y, -100)
    val, grad, stats = lib_value_grad(name, params, s.float(), t.float(), y)
    assert val.item() == 0.0 and val.dtype == torch.float32
    assert (grad == 0).all()
    assert stats["valid_positions"] == 0.0
    assert all(math.isfinite(v) for v in stats.values())
    sparse = SparseTeacher.from_logits(t, y, k=4)
    val, grad, stats = lib_value_grad(name, params, s, sparse, y)
    assert val.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_chunk_size_independence(name: str, params: dict) -> None:
    s, t, y = make_batch("neginf", b=2, t=9, v=40, seed=13)
    sparse = SparseTeacher.from_logits(t, y, k=6)
    for teacher in (t, sparse):
        results = [lib_value_grad(name, {**params, "chunk_size": c}, s, teacher, y) for c in (1, 3, None)]
        for val, grad, _ in results[1:]:
            assert_close(val, results[0][0], 1e-12)
            assert_close(grad, results[0][1], 1e-12)


# --------------------------------------------------------------------------------------------- AKL / ATKD


def test_akl_weights_carry_no_gradient() -> None:
    s, t, y = make_batch(seed=17)
    _, grad, stats = lib_value_grad("akl", {}, s, t, y)

    def ref_undetached(s_, t_, y_):
        lq = torch.log_softmax(s_, -1)
        lp = torch.log_softmax(t_, -1)
        valid = y_ != -100
        return ref_akl(lp, lq, detach=False)[valid].mean()

    dval, dgrad = ref_value_grad(ref_loss, s, "akl", t, y)
    uval, ugrad = ref_value_grad(ref_undetached, s, t, y)
    assert_close(dval, uval)  # same value either way ...
    assert (dgrad - ugrad).abs().max().item() > 1e-4  # ... but the gradients differ,
    assert_close(grad, dgrad)  # and kd matches the detached one
    valid = y != -100
    w = ref_akl_weight(torch.log_softmax(t, -1), torch.log_softmax(s, -1))[valid].mean()
    assert stats["akl_head_weight"] == pytest.approx(w.item(), abs=1e-12)
    assert 0.0 < stats["akl_head_weight"] < 1.0


@pytest.mark.parametrize("mu", [0.2, 0.5, 0.95])
def test_akl_head_beyond_topk_fallback(mu: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat teachers put the μ boundary past the top-k shortlist; the full-sort fallback must give the same D."""
    import kdcli.losses.akl as akl

    monkeypatch.setattr(akl, "AKL_TOPK", 2)
    s, t, y = make_batch(v=64, seed=19)
    t = t * 0.1  # nearly uniform teacher: the head spans many tokens
    t[0, 3] *= 40  # and one peaked row: the head ends inside the shortlist
    val, grad, _ = lib_value_grad("akl", {"mu": mu}, s, t, y)
    rval, rgrad = ref_value_grad(ref_loss, s, "akl", t, y, mu=mu)
    assert_close(val, rval)
    assert_close(grad, rgrad)


def tail_heavy_batch(tail_sign: float, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Logits over V = 50 whose teacher top-5 mass 0.55 is just above μ = 0.5 while the lumped tail (0.45) outweighs
    every top-5 token (0.13 … 0.09). The student's q_v = c_v · p_v on the tail tokens, c_v all above 1
    (tail_sign < 0) or all below 1 (tail_sign > 0): p − q has one sign within the tail, so coarsening it leaves
    g_tail unchanged, while the c_v differ, so it still changes the KLs. Labels alternate inside / outside the top 5.
    """
    g = torch.Generator().manual_seed(seed)
    v, k, rows = 50, 5, 6
    top = torch.tensor([0.13, 0.12, 0.11, 0.10, 0.09], dtype=F64)
    p = torch.empty(rows, v, dtype=F64)
    q = torch.empty(rows, v, dtype=F64)
    y = torch.empty(rows, dtype=torch.int64)
    lo, hi = (1.2, 2.0) if tail_sign < 0 else (0.1, 0.8)
    for r in range(rows):
        perm = torch.randperm(v, generator=g)
        p_tail = 0.45 * torch.softmax(0.3 * torch.randn(v - k, generator=g, dtype=F64), -1)
        q_tail = p_tail * (lo + (hi - lo) * torch.rand(v - k, generator=g, dtype=F64))
        q_top = (1 - q_tail.sum()) * torch.softmax(torch.randn(k, generator=g, dtype=F64), -1)
        p[r, perm[:k]], p[r, perm[k:]] = top, p_tail
        q[r, perm[:k]], q[r, perm[k:]] = q_top, q_tail
        y[r] = perm[0] if r % 2 == 0 else perm[k + r]
    return q.log().unsqueeze(0), p.log().unsqueeze(0), y.unsqueeze(0)


@pytest.mark.parametrize("tail_sign", [1.0, -1.0])
def test_sparse_akl_head_is_the_dense_head(tail_sign: float) -> None:
    """Top-K mass just above μ: the sparse head is the dense head, so w_head agrees with the dense one, and the sparse
    loss is exactly the dense weights applied to the coarsened KLs. Ranking the tail bucket too makes it the head."""
    s, t, y = tail_heavy_batch(tail_sign)
    sparse = SparseTeacher.from_logits(t, y, k=5)
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    lP, lQ, _ = coarsen(lp, lq, sparse.topk_ids, y)
    # The case in point: the tail bucket is the largest bucket while the top-K mass exceeds μ.
    assert (lP[..., -1].exp() > lP[..., :5].exp().amax(-1)).all() and (sparse.tail_mass < 0.5).all()
    in_top = (sparse.topk_ids == y.unsqueeze(-1)).any(-1)
    assert in_top.any() and (~in_top).any()

    dval, _, dstats = lib_value_grad("akl", {}, s, t, y)
    sval, sgrad, sstats = lib_value_grad("akl", {}, s, sparse, y)
    w_dense = ref_akl_weight(lp, lq)
    assert dstats["akl_head_weight"] == pytest.approx(w_dense.mean().item(), abs=1e-12)
    assert sstats["akl_head_weight"] == pytest.approx(dstats["akl_head_weight"], abs=1e-12)

    def dense_weights_on_coarsened(s_: Tensor) -> Tensor:
        lq_ = torch.log_softmax(s_, -1)
        lP_, lQ_, _ = coarsen(lp, lq_, sparse.topk_ids, y)
        return (w_dense * ref_fkl(lP_, lQ_) + (1 - w_dense) * ref_rkl(lP_, lQ_)).mean()

    rval, rgrad = ref_value_grad(dense_weights_on_coarsened, s)
    assert_close(sval, rval)
    assert_close(sgrad, rgrad)
    # Coarsening can only lose divergence (data processing), and here it does: the loss is not trivially dense.
    assert sval.item() < dval.item() - 1e-4
    # Discriminating: with every bucket ranked, the tail bucket sorts first and becomes the head.
    w_all_buckets = ref_akl_weight(lP, lQ)
    assert abs(w_all_buckets.mean() - w_dense.mean()).item() > 0.03


def test_sparse_akl_full_k_on_tail_heavy_case() -> None:
    s, t, y = tail_heavy_batch(1.0, seed=1)
    dval, dgrad, dstats = lib_value_grad("akl", {}, s, t, y)
    sval, sgrad, sstats = lib_value_grad("akl", {}, s, SparseTeacher.from_logits(t, y, k=50), y)
    assert_close(sval, dval, 1e-12)
    assert_close(sgrad, dgrad, 1e-12)
    assert sstats["akl_head_weight"] == pytest.approx(dstats["akl_head_weight"], abs=1e-12)


def test_sparse_akl_head_weight_bounds() -> None:
    """Per position, for any student: top-K mass > μ gives w_head ≥ dense (g_tail shrinks under coarsening), and a
    teacher too flat for that gets the whole top K as its head."""
    s, t, y = make_batch("all_valid", b=1, t=12, v=31, seed=71)
    t[0, 6:] *= 0.1  # flat rows: the top-K mass stays below μ
    sparse = SparseTeacher.from_logits(t, y, k=5)
    covered = 1 - sparse.tail_mass[0]
    assert (covered > 0.5).any() and (covered <= 0.5).any()
    strict = 0
    for j in range(12):
        cut = (slice(None), slice(j, j + 1))
        one = SparseTeacher(
            *(x[cut] for x in (sparse.topk_ids, sparse.topk_logprobs, sparse.label_logprob)), sparse.tail_mass[cut]
        )
        _, _, dstats = lib_value_grad("akl", {}, s[cut], t[cut], y[cut])
        _, _, sstats = lib_value_grad("akl", {}, s[cut], one, y[cut])
        w_dense, w_sparse = dstats["akl_head_weight"], sstats["akl_head_weight"]
        if covered[j] > 0.5:
            assert w_sparse >= w_dense - 1e-12
            strict += w_sparse > w_dense + 1e-6
        else:  # the head is the whole top K: w_head = Σ_topK |p − q| / Σ_buckets |P − Q|
            lP, lQ, _ = coarsen(torch.log_softmax(t[cut], -1), torch.log_softmax(s[cut], -1), one.topk_ids, y[cut])
            gap = (lP.exp() - lQ.exp()).abs()
            assert w_sparse == pytest.approx((gap[..., :5].sum() / gap.sum()).item(), abs=1e-12)
    assert strict > 0  # the inequality is not trivially an equality


@pytest.mark.parametrize("base", ["fkl", "rkl"])
@pytest.mark.parametrize("k", [0.0, 1.0, 0.5])
def test_atkd_empty_groups(k: float, base: str) -> None:
    s, t, y = make_batch(seed=23)
    val, grad, stats = lib_value_grad("atkd", {"k": k, "base": base}, s, t, y)
    rval, rgrad = ref_value_grad(ref_loss, s, "atkd", t, y, k=k, base=base)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    assert_close(val, rval)
    assert_close(grad, rgrad)
    n = int((y != -100).sum())
    assert stats["atkd_hard_fraction"] == pytest.approx(math.ceil(k * n - 1e-9) / n)
    u = 1 - torch.softmax(t, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[y != -100]
    assert stats["atkd_teacher_uncertainty"] == pytest.approx(u.mean().item(), abs=1e-12)


def test_atkd_hard_set_ties_and_ceil() -> None:
    """⌈k·N⌉ with float noise (0.7 · 10) and tied uncertainties: earliest positions win the ties."""
    v = 5
    t = torch.zeros(1, 10, v, dtype=F64)  # every position has the same teacher distribution: all u tie
    s = torch.randn(1, 10, v, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.zeros(1, 10, dtype=torch.int64)
    val, grad, stats = lib_value_grad("atkd", {"k": 0.7}, s, t, y)
    assert stats["atkd_hard_fraction"] == pytest.approx(0.7)
    rval, rgrad = ref_value_grad(ref_loss, s, "atkd", t, y, k=0.7)
    assert_close(val, rval)
    assert_close(grad, rgrad)


def test_atkd_identity_kl_equals_tkd_plus_weighted_dkd() -> None:
    """KL(p‖q) = TKD + (1 − p_g)·DKD, for the reference and for the library (TKD, DKD recovered per position)."""
    s, t, y = make_batch("all_valid", seed=29)
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    tkd, dkd = ref_atkd_parts(lp, lq, y)
    pg = lp.exp().gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert_close(ref_fkl(lp, lq), tkd + (1 - pg) * dkd)
    for i in range(3):
        for j in range(0, 7, 3):
            si, ti, yi = s[i : i + 1, j : j + 1], t[i : i + 1, j : j + 1], y[i : i + 1, j : j + 1]
            with torch.no_grad():
                both = get_loss("atkd", k=1.0, lam=0.0)(si, ti, yi)  # hard only: TKD + DKD
                dkd_only = get_loss("atkd", k=0.0, lam=1.0)(si, ti, yi)  # easy only: DKD
                kl = get_loss("fkl")(si, ti, yi)
            assert_close(kl, (both - dkd_only) + (1 - pg[i, j]) * dkd_only, 1e-12)
            assert_close(dkd_only, dkd[i, j], 1e-12)


def test_atkd_confident_teacher_keeps_precision() -> None:
    """p_g within float32 rounding of 1: the non-target part must not blow up (S_p is a sum, not 1 − p_g)."""
    v = 50
    t = torch.zeros(1, 4, v)
    # p_g ≈ 1 − 49·e^-20 ≈ 1 − 1e-7: in float32, 1 − p_g would have ~50% relative error; float64 (the reference)
    # still has ~1e-9, which is why the teacher is not made even more confident here.
    t[..., 7] = 20.0
    s = torch.randn(1, 4, v, generator=torch.Generator().manual_seed(1))
    y = torch.full((1, 4), 7)
    val, grad, _ = lib_value_grad("atkd", {"k": 0.5}, s, t, y)
    rval, rgrad = ref_value_grad(ref_loss, s.double(), "atkd", t.double(), y, k=0.5)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    torch.testing.assert_close(val.double(), rval, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ reduction


@pytest.mark.parametrize(("name", "params"), [c for c in CONFIGS if c[0] != "atkd"], ids=CONFIG_IDS[:-2])
def test_num_valid_accumulation(name: str, params: dict) -> None:
    """Two micro-batches divided by the window's valid count sum to the whole batch's loss and gradient."""
    s, t, y = make_batch(b=4, seed=31)
    y[2:, :5] = -100  # micro-batches with different valid counts: plain per-micro-batch means would be wrong
    whole, gwhole, _ = lib_value_grad(name, params, s, t, y)
    n = int((y != -100).sum())
    a, ga, _ = lib_value_grad(name, params, s[:2], t[:2], y[:2], num_valid=n)
    b, gb, _ = lib_value_grad(name, params, s[2:], t[2:], y[2:], num_valid=torch.tensor(n))
    assert_close(a + b, whole, 1e-12)
    assert_close(torch.cat([ga, gb]), gwhole, 1e-12)
    a_mean, _, _ = lib_value_grad(name, params, s[:2], t[:2], y[:2])
    b_mean, _, _ = lib_value_grad(name, params, s[2:], t[2:], y[2:])
    assert abs((a_mean + b_mean) / 2 - whole).item() > 1e-6  # the naive average really differs here


@pytest.mark.parametrize("base", ["fkl", "rkl"])
def test_atkd_num_valid_scales_by_micro_share(base: str) -> None:
    s, t, y = make_batch(seed=37)
    n = int((y != -100).sum())
    plain, gplain, _ = lib_value_grad("atkd", {"base": base}, s, t, y)
    scaled, gscaled, _ = lib_value_grad("atkd", {"base": base}, s, t, y, num_valid=50)
    assert_close(scaled, plain * n / 50)
    assert_close(gscaled, gplain * n / 50)


def test_grad_output_scaling_and_shared_logits() -> None:
    """The loss composes with other terms on the same logits and with a scale (kd_ratio·T²)."""
    s, t, y = make_batch(seed=41)
    x = s.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(x.view(-1, x.shape[-1]), y.view(-1), ignore_index=-100)
    (0.5 * ce + 0.5 * 4.0 * get_loss("rkl", temperature=2.0)(x, t, y)).backward()
    xr = s.clone().requires_grad_(True)
    ce_r = torch.nn.functional.cross_entropy(xr.view(-1, xr.shape[-1]), y.view(-1), ignore_index=-100)
    (0.5 * ce_r + 0.5 * 4.0 * ref_loss(xr, "rkl", t, y, temperature=2.0)).backward()
    assert_close(x.grad, xr.grad)


def test_no_grad_and_non_leaf_paths() -> None:
    s, t, y = make_batch(seed=43)
    fn = get_loss("js")
    with torch.no_grad():
        a = fn(s.clone().requires_grad_(True), t, y)
    b = fn(s, t, y)  # student without requires_grad
    assert not a.requires_grad and not b.requires_grad
    w = torch.ones((), dtype=F64, requires_grad=True)
    c = fn(s * w, t, y)  # non-leaf student: the gradient flows on through autograd
    c.backward()
    assert_close(a, b)
    assert_close(a, c.detach())
    # d/dw D(w·s) = Σ ∂D/∂z · s
    _, g, _ = lib_value_grad("js", {}, s, t, y)
    assert_close(w.grad, (g * s).sum())


def test_inputs_are_not_modified() -> None:
    s, t, y = make_batch("prefix", seed=47)
    s32, t32 = s.float(), t.float()
    before = (s32.clone(), t32.clone())
    sparse = SparseTeacher.from_logits(t32, y, k=5, temperature=2.0)
    lps = sparse.topk_logprobs.clone()
    for name in NAMES:
        x = s32.clone().requires_grad_(True)
        get_loss(name, temperature=2.0)(x, t32, y).backward()
        get_loss(name, temperature=2.0)(x, sparse, y).backward()
        assert torch.equal(x.detach(), before[0])
        get_loss(name, temperature=2.0)(s32, t32, y)  # no-grad path works on the caller's tensor directly
    assert torch.equal(s32, before[0]) and torch.equal(t32, before[1])
    assert torch.equal(sparse.topk_logprobs, lps)


@pytest.mark.parametrize("name", ["fkl", "akl", "atkd"])
def test_non_viewable_inputs(name: str) -> None:
    """Caller-shifted logits (x[:, :-1]) cannot be flattened without a copy; results must not change."""
    s, t, y = make_batch(seed=67)
    want, gwant, _ = lib_value_grad(name, {"chunk_size": 4}, s, t, y)
    big_s = torch.cat([s, torch.randn_like(s[:, :1])], 1).requires_grad_(True)
    big_t = torch.cat([t, torch.randn_like(t[:, :1])], 1)
    loss = get_loss(name, chunk_size=4)(big_s[:, :-1], big_t[:, :-1], y.t().contiguous().t())
    loss.backward()
    assert_close(loss.detach(), want)
    assert_close(big_s.grad[:, :-1], gwant)
    assert (big_s.grad[:, -1] == 0).all()
    st = SparseTeacher.from_logits(big_t, torch.cat([y, y[:, :1]], 1), k=5)
    cut = (st.topk_ids, st.topk_logprobs, st.label_logprob, st.tail_mass)
    sliced = SparseTeacher(*(x[:, :-1] for x in cut))
    dense_st = SparseTeacher.from_logits(t, y, k=5)
    val, grad, _ = lib_value_grad(name, {"chunk_size": 4}, big_s.detach()[:, :-1], sliced, y)
    val2, grad2, _ = lib_value_grad(name, {"chunk_size": 4}, s, dense_st, y)
    assert_close(val, val2)
    assert_close(grad, grad2)


def test_backward_twice_is_refused() -> None:
    s, t, y = make_batch()
    x = s.clone().requires_grad_(True)
    loss = get_loss("fkl")(x, t, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


# --------------------------------------------------------------------------------------------------- sparse


@pytest.mark.parametrize("case", ["random", "neginf", "all_valid"])
@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_sparse_full_k_equals_dense(name: str, params: dict, case: str) -> None:
    s, t, y = make_batch(case, v=17, seed=53)
    for temperature in (1.0, 1.7):
        p = {**params, "temperature": temperature}
        sparse = SparseTeacher.from_logits(t, y, k=17, temperature=temperature)
        dval, dgrad, _ = lib_value_grad(name, p, s, t, y)
        sval, sgrad, stats = lib_value_grad(name, p, s, sparse, y)
        assert_close(sval, dval, 1e-9)
        assert_close(sgrad, dgrad, 1e-9)
        assert stats["teacher_mass_covered"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", ["random", "neginf"])
@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=CONFIG_IDS)
def test_sparse_matches_coarsened_reference(name: str, params: dict, case: str) -> None:
    """K < V: exact on the coarsened {top-K, label, tail} distributions, gradients to every logit included."""
    s, t, y = make_batch(case, v=31, seed=59)
    sparse = SparseTeacher.from_logits(t, y, k=5, temperature=1.3)
    val, grad, stats = lib_value_grad(name, {**params, "temperature": 1.3}, s, sparse, y)
    rval, rgrad = ref_value_grad(ref_sparse_loss, s, name, t, y, sparse.topk_ids, temperature=1.3, **params)
    assert_close(val, rval, 1e-9)
    assert_close(grad, rgrad, 1e-9)
    valid = y != -100
    covered = torch.softmax(t / 1.3, -1).gather(-1, sparse.topk_ids).sum(-1)[valid].mean()
    assert stats["teacher_mass_covered"] == pytest.approx(covered.item(), abs=1e-12)
    # the label sits outside the top K at some positions and inside at others: both buckets are exercised
    in_top = (sparse.topk_ids == y.unsqueeze(-1)).any(-1)[valid]
    assert in_top.any() and (~in_top).any()


def test_sparse_teacher_from_logits_and_storage_dtypes() -> None:
    s, t, y = make_batch(v=40, seed=61)
    st = SparseTeacher.from_logits(t, y, k=8, temperature=2.0)
    logp = torch.log_softmax(t / 2.0, -1)
    assert st.k == 8 and st.shape == tuple(y.shape) and st.temperature == 2.0
    assert torch.equal(st.topk_ids, logp.topk(8, -1).indices)
    assert_close(st.topk_logprobs, logp.gather(-1, st.topk_ids))
    assert_close(st.tail_mass, 1 - st.topk_logprobs.exp().sum(-1))
    valid = y != -100
    assert_close(st.label_logprob[valid], logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[valid])
    # on-disk dtypes: uint16 ids, fp16/bf16 log-probs, fp32 tail
    for ids_dtype, lp_dtype in ((torch.uint16, torch.float16), (torch.int32, torch.bfloat16)):
        stored = SparseTeacher(
            st.topk_ids.to(ids_dtype),
            st.topk_logprobs.to(lp_dtype),
            st.label_logprob.to(lp_dtype),
            st.tail_mass.float(),
            2.0,
        )
        val, grad, _ = lib_value_grad("akl", {"temperature": 2.0}, s.float(), stored, y)
        ref, _, _ = lib_value_grad("akl", {"temperature": 2.0}, s, st, y)
        assert torch.isfinite(grad).all()
        assert val.item() == pytest.approx(ref.item(), rel=2e-2)


def test_sparse_temperature_mismatch_and_shape_errors() -> None:
    s, t, y = make_batch()
    st = SparseTeacher.from_logits(t, y, k=4, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 2"):
        get_loss("fkl")(s, st, y)
    with pytest.raises(ValueError, match="leading shape"):
        get_loss("fkl")(s[:1], st, y[:1])
    with pytest.raises(ValueError, match="shape"):
        get_loss("fkl")(s, t[:, :3], y)
    with pytest.raises(ValueError, match="integer"):
        get_loss("fkl")(s, t, y.double())
    with pytest.raises(ValueError, match="k must be"):
        SparseTeacher.from_logits(t, y, k=0)


# -------------------------------------------------------------------------------------------- registry/API


def test_registry_specs() -> None:
    assert list(LOSSES) == ["fkl", "rkl", "skl", "srkl", "js", "tvd", "akl", "atkd"]
    expected = {
        "akl": {"mu": 0.5},
        "atkd": {"k": 0.5, "lam": 0.2, "base": "fkl"},
        "skl": {"alpha": 0.1},
        "srkl": {"alpha": 0.1},
        "js": {"beta": 0.5},
    }
    for name, spec in LOSSES.items():
        assert spec.name == name
        assert spec.description and "\n" not in spec.description
        assert spec.paper
        assert dict(spec.params) == {**expected.get(name, {}), "temperature": 1.0, "chunk_size": None}
        fn = get_loss(name)
        assert fn.params == dict(spec.params)
    assert "2404.02657" in LOSSES["akl"].paper and "2402.11890" in LOSSES["atkd"].paper
    assert "DistiLLM" in LOSSES["skl"].paper


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("akll", {}, "unknown divergence 'akll'; did you mean 'akl'? valid: fkl, rkl, skl, srkl, js, tvd, akl, atkd"),
        ("kl_div", {}, "unknown divergence 'kl_div'"),
        ("fkl", {"mu": 0.5}, "unknown parameter 'mu' for 'fkl'; valid: temperature, chunk_size"),
        ("akl", {"muu": 0.5}, "unknown parameter 'muu' for 'akl'; did you mean 'mu'? valid: mu, temperature"),
        ("akl", {"mu": 0.0}, "'mu' of 'akl' must be in (0, 1]"),
        ("akl", {"mu": 1.5}, "'mu' of 'akl' must be in (0, 1]"),
        ("atkd", {"k": 1.5}, "'k' of 'atkd' must be in [0, 1]"),
        ("atkd", {"lam": -0.1}, "'lam' of 'atkd' must be in [0, 1]"),
        ("atkd", {"base": "js"}, "'base' of 'atkd' must be 'fkl' or 'rkl'"),
        ("skl", {"alpha": 1.0}, "'alpha' of 'skl' must be in [0, 1)"),
        ("srkl", {"alpha": -0.5}, "'alpha' of 'srkl' must be in [0, 1)"),
        ("js", {"beta": 0.0}, "'beta' of 'js' must be in (0, 1)"),
        ("js", {"beta": 1.0}, "'beta' of 'js' must be in (0, 1)"),
        ("tvd", {"temperature": 0.0}, "'temperature' of 'tvd' must be in (0, ∞)"),
        ("fkl", {"temperature": "hot"}, "'temperature' of 'fkl' must be a finite number"),
        ("rkl", {"chunk_size": 0}, "'chunk_size' of 'rkl' must be a positive int or None"),
    ],
)
def test_errors(name: str, params: dict, message: str) -> None:
    from kdcli.errors import KdError

    with pytest.raises(ValueError) as info:
        get_loss(name, **params)
    assert message in str(info.value)
    assert isinstance(info.value, KdError)


def test_bad_num_valid() -> None:
    s, t, y = make_batch()
    with pytest.raises(ValueError, match="num_valid"):
        get_loss("fkl")(s, t, y, num_valid=0)


def test_compute_returns_loss_and_stats() -> None:
    """`compute` gives the loss and the call's stats; calling the loss gives the same loss (no stats on the object)."""
    s, t, y = make_batch(seed=71)
    fn = get_loss("akl")
    x = s.clone().requires_grad_(True)
    out = fn.compute(x, t, y)
    out.loss.backward()
    xc = s.clone().requires_grad_(True)
    called = fn(xc, t, y)
    called.backward()
    assert torch.equal(out.loss.detach(), called.detach()) and torch.equal(x.grad, xc.grad)
    assert set(out.stats) == {"valid_positions", "akl_head_weight"}
    assert out.stats["valid_positions"] == float((y != -100).sum())
    assert all(type(v) is float for v in out.stats.values())
    with torch.no_grad():
        loss, stats = fn.compute(s, SparseTeacher.from_logits(t, y, k=4), y)
    assert not loss.requires_grad and "teacher_mass_covered" in stats
    assert not hasattr(fn, "last_stats")


def test_defaults_come_from_the_registry() -> None:
    """The classes state no defaults; `get_loss` fills them from the spec, the one source."""
    import inspect

    for name, spec in LOSSES.items():
        sig = inspect.signature(spec.cls.__init__)
        assert all(p.default is inspect.Parameter.empty for p in sig.parameters.values()), name
        assert set(spec.params) == {p for p in sig.parameters if p != "self"}, name
        assert spec.build().params == dict(spec.params)


def test_tail_sensitive() -> None:
    from kdcli.losses import is_tail_sensitive

    assert [n for n in LOSSES if is_tail_sensitive(n)] == ["rkl", "akl"]
    assert all(is_tail_sensitive(n) == spec.cls.tail_sensitive for n, spec in LOSSES.items())
    assert not is_tail_sensitive("nope")


def test_sizing_covers_every_divergence() -> None:
    """Each divergence's work figure lives in kdcli.losses.sizing, and the loss object sizes its chunks by it."""
    from kdcli.losses import CROSS_TOKENIZER, sizing

    assert set(sizing.DENSE_WORK) == set(LOSSES) | set(CROSS_TOKENIZER)
    assert dict(sizing.DENSE_WORK) == {
        **{"fkl": 8, "rkl": 8, "skl": 9, "srkl": 9, "js": 8, "tvd": 7, "akl": 8, "atkd": 8},
        **{"uld": 5, "hybrid": 5},
    }
    budgets = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20, "mps": 128 * 2**20}
    n, v = 10**6, 49152
    for name in LOSSES:
        fn = get_loss(name)
        for device, budget in budgets.items():
            for dtype, elem in ((torch.float32, 4), (F64, 8)):
                for sparse in (False, True):
                    w = sizing.SPARSE_WORK if sparse else sizing.DENSE_WORK[name]
                    want = budget // (v * elem * w)
                    assert fn.chunk_rows(n, v, torch.device(device), dtype, sparse) == want
        assert fn.chunk_rows(5, v, torch.device("cpu"), torch.float32, False) == 5
    assert get_loss("fkl", chunk_size=7).chunk_rows(n, v, torch.device("cuda"), torch.float32, True) == 7
    assert sizing.dense_work("custom") == sizing.DEFAULT_DENSE_WORK


def test_package_and_sizing_import_no_torch() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys, kdcli.losses, kdcli.losses.sizing; assert 'torch' not in sys.modules, 'torch'; "
        "kdcli.losses.get_loss('fkl'); assert 'torch' in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env=env)
