"""The training objective (1 − r)·CE + r·scale·D against references written with plain torch from docs/methods.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.engine.objective import Objective
from kdcli.losses import SparseTeacher
from kdcli.recipe import LossConfig

F64 = torch.float64


def make_batch(seed: int = 0, b: int = 4, t: int = 6, v: int = 19) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g, dtype=F64) * 2
    te = torch.randn(b, t, v, generator=g, dtype=F64) * 3
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, :2] = -100
    y[2:, :4] = -100  # the two halves of the batch hold different numbers of valid positions
    return s, te, y


def ref_ce(s: Tensor, y: Tensor, count: int) -> Tensor:
    valid = y != -100
    return F.cross_entropy(s[valid], y[valid], reduction="sum") / count


def ref_fkl(s: Tensor, t: Tensor, y: Tensor, count: int, temperature: float = 1.0) -> Tensor:
    """Σ_valid Σ_v p_v (log p_v − log q_v) / count, p = softmax(t/T), q = softmax(s/T), written out by hand."""
    valid = y != -100
    zs, zt = s[valid] / temperature, t[valid] / temperature
    log_q = zs - zs.exp().sum(-1, keepdim=True).log()
    log_p = zt - zt.exp().sum(-1, keepdim=True).log()
    return (log_p.exp() * (log_p - log_q)).sum() / count


def objective(**loss: object) -> Objective:
    return Objective(LossConfig(**loss))


def run(obj: Objective, s: Tensor, teacher: Tensor | SparseTeacher, y: Tensor, **kw: object):
    x = s.detach().clone().requires_grad_(True)
    terms = obj(x, teacher, y, **kw)
    terms.total.backward()
    return terms, x.grad


def ref_run(fn, s: Tensor) -> tuple[Tensor, Tensor]:
    x = s.detach().clone().requires_grad_(True)
    val = fn(x)
    val.backward()
    return val.detach(), x.grad


def close(a: Tensor, b: Tensor | float, tol: float = 1e-10) -> None:
    b = b if isinstance(b, Tensor) else torch.tensor(b, dtype=F64)
    torch.testing.assert_close(a.detach().to(F64), b.detach().to(F64), rtol=tol, atol=tol)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 1.0])
def test_kd_ratio_mix(kd_ratio: float) -> None:
    s, t, y = make_batch()
    n = int((y != -100).sum())
    terms, grad = run(objective(divergence="fkl", kd_ratio=kd_ratio), s, t, y)
    ce, kd = ref_ce(s, y, n), ref_fkl(s, t, y, n)
    assert abs(ce - kd).item() > 0.5  # swapping the weights of the two terms would show
    want, want_grad = ref_run(lambda x: (1 - kd_ratio) * ref_ce(x, y, n) + kd_ratio * ref_fkl(x, t, y, n), s)
    close(terms.total, want)
    close(grad, want_grad)
    # A term with weight 0 is not computed and reported as 0.
    close(terms.ce, ce if kd_ratio < 1 else 0.0)
    close(terms.kd, kd if kd_ratio > 0 else 0.0)
    assert (terms.stats.get("valid_positions") == n) == (kd_ratio > 0)
    # Without gradients (eval) CE is measured whatever its weight: a pure-KD run's eval CE is its real CE, not 0.
    with torch.no_grad():
        evaluated = objective(divergence="fkl", kd_ratio=kd_ratio)(s, t, y)
    close(evaluated.ce, ce)
    close(evaluated.total, want)


def test_a_pure_kd_run_reports_its_real_eval_ce_through_the_fused_head() -> None:
    from kdcli.losses import OutputLayer, ProjectedLogits

    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(4, 6, 8, generator=g, dtype=F64), torch.randn(19, 8, generator=g, dtype=F64)
    _, t, y = make_batch()
    student = ProjectedLogits(hidden, OutputLayer(weight, 19, F64))
    with torch.no_grad():
        terms = objective(divergence="fkl", kd_ratio=1.0)(student, t, y)
    close(terms.ce, ref_ce(hidden @ weight.t(), y, int((y != -100).sum())))


@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_t2_factor(scale_by_t2: bool) -> None:
    s, t, y = make_batch(seed=1)
    n = int((y != -100).sum())
    temperature, r = 2.0, 0.4
    cfg = {"divergence": "fkl", "params": {"temperature": temperature}, "kd_ratio": r, "scale_by_t2": scale_by_t2}
    terms, grad = run(objective(**cfg), s, t, y)
    scale = temperature**2 if scale_by_t2 else 1.0
    want, want_grad = ref_run(lambda x: (1 - r) * ref_ce(x, y, n) + r * scale * ref_fkl(x, t, y, n, temperature), s)
    close(terms.total, want)
    close(grad, want_grad)
    close(terms.kd, ref_fkl(s, t, y, n, temperature))  # the reported D is never scaled


def test_temperature() -> None:
    """D is taken at softmax(z / T) for both models; CE stays at T = 1."""
    s, t, y = make_batch(seed=2)
    n = int((y != -100).sum())
    terms, _ = run(objective(divergence="fkl", params={"temperature": 3.0}, kd_ratio=0.5), s, t, y)
    close(terms.kd, ref_fkl(s, t, y, n, 3.0))
    close(terms.ce, ref_ce(s, y, n))
    assert abs(ref_fkl(s, t, y, n, 3.0) - ref_fkl(s, t, y, n, 1.0)).item() > 0.1  # the temperature matters here


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(("divergence", "kd_ratio"), [("fkl", 0.5), ("akl", 0.7), ("tvd", 1.0)])
def test_num_valid_across_micro_batches(divergence: str, kd_ratio: float, sparse: bool) -> None:
    """Two halves normalised by the whole batch's count sum to the whole batch: total, ce, kd and gradient."""
    s, t, y = make_batch(seed=3)
    teacher = SparseTeacher.from_logits(t, y, k=5) if sparse else t

    def part(lo: int, hi: int) -> Tensor | SparseTeacher:
        if not isinstance(teacher, SparseTeacher):
            return teacher[lo:hi]
        return SparseTeacher(
            teacher.topk_ids[lo:hi],
            teacher.topk_logprobs[lo:hi],
            teacher.label_logprob[lo:hi],
            teacher.tail_mass[lo:hi],
            teacher.temperature,
        )

    obj = objective(divergence=divergence, kd_ratio=kd_ratio)
    n = int((y != -100).sum())
    whole, g_whole = run(obj, s, teacher, y)
    a, g_a = run(obj, s[:2], part(0, 2), y[:2], num_valid=n)
    b, g_b = run(obj, s[2:], part(2, 4), y[2:], num_valid=n)
    for key in ("total", "ce", "kd"):
        close(getattr(a, key) + getattr(b, key), getattr(whole, key), 1e-12)
    close(torch.cat([g_a, g_b]), g_whole, 1e-12)
    a_mean, _ = run(obj, s[:2], part(0, 2), y[:2])
    b_mean, _ = run(obj, s[2:], part(2, 4), y[2:])
    assert abs((a_mean.total + b_mean.total) / 2 - whole.total).item() > 1e-4  # per-batch means would be wrong


@pytest.mark.parametrize("num_valid", [None, 0, 7])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(("divergence", "kd_ratio"), [("fkl", 0.5), ("akl", 1.0), ("atkd", 0.5), ("rkl", 0.0)])
def test_empty_batch(divergence: str, kd_ratio: float, sparse: bool, num_valid: int | None) -> None:
    """All labels −100 (num_valid 0: the whole window is empty; 7: only this micro-batch is): zeros, no exception,
    zero gradients through the graph, and the divergence's stats present (every rank must report the same keys)."""
    s, t, y = make_batch(seed=4)
    s = s.float()
    s[..., 0] = float("-inf")  # a masked vocabulary entry must not turn the empty loss into NaN
    y = torch.full_like(y, -100)
    teacher = SparseTeacher.from_logits(t.float(), y, k=5) if sparse else t.float()
    obj = objective(divergence=divergence, kd_ratio=kd_ratio)
    x = s.clone().requires_grad_(True)
    terms = obj(x, teacher, y, num_valid=num_valid)
    for value in (terms.total, terms.ce, terms.kd):
        assert value.item() == 0.0
    assert terms.total.requires_grad
    terms.total.backward()
    assert x.grad is not None and (x.grad == 0).all()
    if kd_ratio > 0:
        assert terms.stats["valid_positions"] == 0.0
        assert set(obj.divergence.stat_names) <= terms.stats.keys()
        assert ("teacher_mass_covered" in terms.stats) == sparse


def test_num_valid_zero_with_valid_positions_is_refused() -> None:
    s, t, y = make_batch(seed=5)
    with pytest.raises(ValueError, match="num_valid=0"):
        objective(divergence="fkl")(s, t, y, num_valid=0)
