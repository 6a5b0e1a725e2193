"""The fused head equals the plain path: values and gradients (hidden states and output weight) in float64.

The reference is what the plain engine computes: the logits materialised whole (differentiably), the objective's
cross-entropy and the divergence on them (`driver.run`), weighted the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from kdcli.engine.objective import cross_entropy
from kdcli.host import process_memory
from kdcli.losses import LOSSES, SparseTeacher, get_loss
from kdcli.losses.fused import fused_objective
from kdcli.losses.projection import OutputLayer, ProjectedLogits

F64 = torch.float64
NAMES = list(LOSSES)
CE_W, KD_W = 0.3, 0.7 * 4.0  # (1 − kd_ratio), kd_ratio · T² at T = 2


def make(seed: int = 0, *, b: int = 3, t: int = 9, d: int = 6, v: int = 29, width: int | None = None):
    g = torch.Generator().manual_seed(seed)
    width = width or v
    hidden = torch.randn(b, t, d, generator=g, dtype=F64)
    weight = torch.randn(v, d, generator=g, dtype=F64) * 0.8
    t_hidden = torch.randn(b, t, d + 2, generator=g, dtype=F64)
    t_weight = torch.randn(v + 3, d + 2, generator=g, dtype=F64)  # a wider (padded) teacher head
    labels = torch.randint(0, width, (b, t), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, t // 2] = -100
    labels[-1, -1] = -100
    return hidden, weight, t_hidden, t_weight, labels


def reference(name, params, hidden, weight, teacher, labels, count, head_kw, ce_w=CE_W, kd_w=KD_W):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    z = ProjectedLogits(hidden, OutputLayer(weight, dtype=F64, **head_kw)).materialise()
    div = get_loss(name, **params)
    ce = cross_entropy(z, labels, count)
    kd, stats = div.compute(z, teacher, labels, num_valid=count)
    total = ce_w * ce + kd_w * kd
    total.backward()
    return total.detach(), ce.detach(), kd.detach(), hidden.grad, weight.grad, stats


def fused(name, params, hidden, weight, teacher, labels, count, head_kw, ce_w=CE_W, kd_w=KD_W):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    student = ProjectedLogits(hidden, OutputLayer(weight, dtype=F64, **head_kw))
    out = fused_objective(
        get_loss(name, **params), student, teacher, labels, ce_weight=ce_w, kd_weight=kd_w, num_valid=count
    )
    out.total.backward()
    return out.total.detach(), out.ce, out.kd, hidden.grad, weight.grad, out.stats


def close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a.to(F64), b.to(F64), rtol=tol, atol=tol)


def check_same(ref, got) -> None:
    for a, b in zip(ref[:5], got[:5], strict=True):
        close(b, a)
    assert ref[5].keys() == got[5].keys()
    for key in ref[5]:
        assert got[5][key] == pytest.approx(ref[5][key], rel=1e-9, abs=1e-12), key


def params_for(name: str, temperature: float) -> dict:
    return {"temperature": temperature, "chunk_size": 5}  # several chunks, some not aligned to the rows


HEADS = {
    "plain": {},
    "softcap": {"softcap": 2.5},
    "scale": {"scale": 0.625},
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_dense_teacher_matches_plain_path(name: str, temperature: float, head: str) -> None:
    hidden, weight, t_hidden, t_weight, labels = make()
    width = weight.shape[0]
    kw = {"width": width, **HEADS[head]}
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=width, dtype=F64, **HEADS[head]))
    count = int((labels != -100).sum()) + 5  # the window is bigger than this micro-batch
    params = params_for(name, temperature)
    ref = reference(name, params, hidden, weight, teacher.materialise().detach(), labels, count, kw)
    got = fused(name, params, hidden, weight, teacher, labels, count, kw)
    assert ref[2].item() > 1e-3 and ref[1].item() > 1e-3  # neither term is trivially zero
    check_same(ref, got)


@pytest.mark.parametrize("block_rows", [1, 12])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_blocks_of_chunks_match_plain_path(
    name: str, temperature: float, block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The products run a block of chunks at a time (`sizing.FUSED_BLOCK_ROWS`): one chunk a block, or two chunks of 5
    rows and a short last block, each chunk's ∂/∂u written over its logits; soft-capping reads them first."""
    from kdcli.losses import sizing

    monkeypatch.setattr(sizing, "FUSED_BLOCK_ROWS", block_rows)
    hidden, weight, t_hidden, t_weight, labels = make(8)
    width = weight.shape[0]
    kw = {"width": width, "softcap": 2.5}
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=width, dtype=F64))
    count = int((labels != -100).sum())
    params = params_for(name, temperature)
    ref = reference(name, params, hidden, weight, teacher.materialise().detach(), labels, count, kw)
    got = fused(name, params, hidden, weight, teacher, labels, count, kw)
    check_same(ref, got)


FOLDS = [("fkl", 1.0, True), ("js", 1.0, True), ("fkl", 2.0, False), ("atkd", 1.0, False)]


@pytest.mark.parametrize(("name", "temperature", "folded"), FOLDS)
def test_cross_entropy_comes_from_the_divergence_softmax_at_t1(name: str, temperature: float, folded: bool) -> None:
    """At T = 1 with one weight for every row the chunk takes the cross-entropy from its own student softmax (no
    separate pass); at another temperature, or under ATKD's row weights, the fused head takes it itself."""
    from kdcli.losses import chunks

    seen = []

    def spy(*args, **kwargs):
        seen.append(len(args) > 6 and args[6] is not None)
        return chunks.dense_chunk(*args, **kwargs)

    hidden, weight, t_hidden, t_weight, labels = make(9)
    width = weight.shape[0]
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=width, dtype=F64))
    student = ProjectedLogits(hidden.requires_grad_(True), OutputLayer(weight, width=width, dtype=F64))
    div = get_loss(name, temperature=temperature, chunk_size=5)
    div.chunk_fns = (spy, chunks.sparse_chunk)
    fused_objective(div, student, teacher, labels, ce_weight=0.5, kd_weight=0.5).total.backward()
    assert seen and all(s == folded for s in seen)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_cached_teacher_matches_plain_path(name: str, temperature: float) -> None:
    hidden, weight, t_hidden, t_weight, labels = make(1)
    width = weight.shape[0]
    dense = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=width, dtype=F64)).materialise()
    cache = SparseTeacher.from_logits(dense, labels.clamp_min(0), k=6, temperature=temperature)
    count = int((labels != -100).sum())
    params = params_for(name, temperature)
    ref = reference(name, params, hidden, weight, cache, labels, count, {"width": width})
    got = fused(name, params, hidden, weight, cache, labels, count, {"width": width})
    check_same(ref, got)


def test_padded_student_head_keeps_width_and_zero_grad_beyond() -> None:
    """A student head wider than the shared vocabulary: only the first `width` rows get a gradient."""
    hidden, weight, t_hidden, t_weight, labels = make(2, v=33, width=29)
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=29, dtype=F64))
    count = int((labels != -100).sum())
    kw = {"width": 29}
    ref = reference("akl", {}, hidden, weight, teacher.materialise().detach(), labels, count, kw)
    got = fused("akl", {}, hidden, weight, teacher, labels, count, kw)
    check_same(ref, got)
    assert (got[4][29:] == 0).all()


def test_tied_embeddings_accumulate_both_gradients() -> None:
    """A tied output layer is the embedding's parameter: its gradient is the head's plus the embedding's."""
    g = torch.Generator().manual_seed(3)
    vocab, d = 31, 8
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[:, :2] = -100
    teacher = torch.randn(2, 7, vocab, generator=g, dtype=F64)
    grads = []
    for use_fused in (False, True):
        emb = torch.nn.Embedding(vocab, d, dtype=F64)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(vocab, d, generator=torch.Generator().manual_seed(4), dtype=F64))
        hidden = torch.tanh(emb(ids))
        student = ProjectedLogits(hidden, OutputLayer(emb.weight, width=vocab, dtype=F64))
        div = get_loss("fkl")
        if use_fused:
            total = fused_objective(div, student, teacher, labels, ce_weight=0.5, kd_weight=0.5).total
        else:
            z = student.materialise()
            count = int((labels != -100).sum())
            total = 0.5 * cross_entropy(z, labels, count) + 0.5 * div(z, teacher, labels, num_valid=count)
        total.backward()
        grads.append(emb.weight.grad)
    close(grads[1], grads[0])


@pytest.mark.parametrize(("ce_w", "kd_w"), [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_one_term_alone(ce_w: float, kd_w: float) -> None:
    hidden, weight, t_hidden, t_weight, labels = make(5)
    width = weight.shape[0]
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=width, dtype=F64))
    count = int((labels != -100).sum())
    kw = {"width": width}
    ref = reference("atkd", {}, hidden, weight, teacher.materialise().detach(), labels, count, kw, ce_w, kd_w)
    got = fused("atkd", {}, hidden, weight, teacher, labels, count, kw, ce_w, kd_w)
    # A term of weight 0 is not taken and reports 0, as the objective's plain path does.
    expected = (ref[0], ref[1] * (ce_w > 0), ref[2] * (kd_w > 0), ref[3], ref[4])
    for a, b in zip(expected, got[:5], strict=True):
        close(b, a)
    assert got[5] == ({} if kd_w == 0 else got[5])


def test_all_masked_gives_zero_and_zero_gradients() -> None:
    hidden, weight, t_hidden, t_weight, labels = make(6)
    labels.fill_(-100)
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=weight.shape[0], dtype=F64))
    got = fused("rkl", {}, hidden, weight, teacher, labels, None, {"width": weight.shape[0]})
    assert got[0].item() == 0.0 and got[1].item() == 0.0 and got[2].item() == 0.0
    assert (got[3] == 0).all() and (got[4] == 0).all()
    assert got[5]["valid_positions"] == 0.0


def test_no_grad_gives_the_same_values() -> None:
    hidden, weight, t_hidden, t_weight, labels = make(7)
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=weight.shape[0], dtype=F64))
    student = ProjectedLogits(hidden, OutputLayer(weight, width=weight.shape[0], dtype=F64))
    div = get_loss("js", chunk_size=4)
    with_grad = fused_objective(div, student, teacher, labels, ce_weight=0.4, kd_weight=0.6)
    with torch.no_grad():
        without = fused_objective(div, student, teacher, labels, ce_weight=0.4, kd_weight=0.6)
    close(without.total, with_grad.total, 0.0)
    assert without.stats == with_grad.stats


def test_bf16_products_follow_the_plain_path_closely() -> None:
    """Under mixed precision the products run in bf16 in both paths: the values agree to bf16 rounding."""
    hidden, weight, t_hidden, t_weight, labels = (x.float() if x.is_floating_point() else x for x in make(8, v=257))
    width = weight.shape[0]
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=width, dtype=torch.bfloat16))
    student = ProjectedLogits(hidden.requires_grad_(True), OutputLayer(weight, width=width, dtype=torch.bfloat16))
    div = get_loss("fkl")
    got = fused_objective(div, student, teacher, labels, ce_weight=0.5, kd_weight=0.5)
    z = student.materialise()
    count = int((labels != -100).sum())
    ref = 0.5 * cross_entropy(z, labels, count) + 0.5 * div(z, teacher.materialise(), labels, num_valid=count)
    assert got.total.dtype == torch.float32
    torch.testing.assert_close(got.total, ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_rows", [1, 4, 7])
def test_weight_gradient_groups_of_any_size(group_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """∂/∂W is the same whether the buffered rows are multiplied in groups smaller than, equal to or larger than a
    chunk (5 rows here), across chunk boundaries."""
    from kdcli.losses import projection

    hidden, weight, t_hidden, t_weight, labels = make(9)
    width = weight.shape[0]
    monkeypatch.setattr(projection, "WEIGHT_GRADIENT_GROUP_BYTES", group_rows * width * 8)
    teacher = ProjectedLogits(t_hidden, OutputLayer(t_weight, width=width, dtype=F64))
    count = int((labels != -100).sum())
    kw = {"width": width, "softcap": 3.0}
    params = params_for("srkl", 1.0)
    ref = reference("srkl", params, hidden, weight, teacher.materialise().detach(), labels, count, kw)
    got = fused("srkl", params, hidden, weight, teacher, labels, count, kw)
    check_same(ref, got)


# A child that builds a fused head's inputs (fp32: 4 blocks of 1,024 rows, V 16,384, chunks of 32 rows) and, with
# "call", runs fused_objective forward and backward once. Its peak is read by the parent (os.wait4).
_PEAK_CHILD = """
import sys, torch
from kdcli.losses import get_loss
from kdcli.losses.fused import fused_objective
from kdcli.losses.projection import OutputLayer, ProjectedLogits
torch.set_num_threads(1)
rows, d, v, chunk = {rows}, {d}, {v}, {chunk}
g = torch.Generator().manual_seed(0)
h = torch.randn(rows, d, generator=g, requires_grad=True)
w = torch.randn(v, d, generator=g, requires_grad=True)
ht, wt = torch.randn(rows, d, generator=g), torch.randn(v, d, generator=g)
y = torch.randint(0, v, (rows,), generator=g)
if sys.argv[1] == "call":
    student = ProjectedLogits(h, OutputLayer(w, v, torch.float32))
    teacher = ProjectedLogits(ht, OutputLayer(wt, v, torch.float32))
    div = get_loss("fkl", chunk_size=chunk)
    fused_objective(div, student, teacher, y, ce_weight=0.5, kd_weight=0.5).total.backward()
    assert h.grad is not None and w.grad is not None
print("done", flush=True)
sys.stdin.read()  # alive until the parent has read its peak
"""


def _child_peak_mib(script: str, mode: str) -> float:
    """The child's high-water RSS (VmHWM), read by this process from /proc while the child waits. Not `ru_maxrss`
    from wait4: Linux starts a child's ru_maxrss at its parent's peak, which pytest's would hide."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", script, mode]
    with subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline().strip()
        peak = process_memory("VmHWM", proc.pid) if ready == "done" else None
        proc.stdin.close()
    assert proc.returncode == 0 and ready == "done" and peak is not None, f"the {mode} child failed"
    return peak / 2**20


@pytest.mark.skipif(sys.platform != "linux", reason="reads the child's peak from /proc")
def test_fused_head_holds_one_block_of_logits_at_a_time() -> None:
    """Measured from outside the process (its VmHWM in /proc): the fused head's peak above its inputs is one block of
    the student's and the teacher's logits, one chunk's workspace and the weight gradient, not two blocks (the loop
    once held the last block's logits while it projected the next: +128 MiB here)."""
    from kdcli.losses import sizing

    rows, d, v, chunk = 4 * sizing.FUSED_BLOCK_ROWS, 32, 16384, 32
    script = _PEAK_CHILD.format(rows=rows, d=d, v=v, chunk=chunk)
    extra = _child_peak_mib(script, "call") - _child_peak_mib(script, "inputs")
    mib = 2**20
    block = 2 * sizing.FUSED_BLOCK_ROWS * v * 4 / mib  # the student's and the teacher's logits, fp32
    chunk_work = chunk * v * 4 * sizing.work("fkl", sparse=False, fused=True) / mib
    grads = (rows * d + v * d) * 4 / mib
    slack = 48  # the allocator's and autograd's own
    assert extra <= block + chunk_work + grads + slack, (extra, block)
