"""CUDA checks for kdcli.losses: skipped on machines without a GPU (CI); run them where one exists."""

from __future__ import annotations

import pytest
import torch

from kdcli.losses import LOSSES, SparseTeacher, get_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64 = torch.float64


def _batch(v: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 9, v, generator=g, dtype=F64) * 2
    t = torch.randn(2, 9, v, generator=g, dtype=F64) * 3
    y = torch.randint(0, v, (2, 9), generator=g)
    y[0, :3] = -100
    return s, t, y


def _run(name: str, s, teacher, y, **params):
    x = s.detach().clone().requires_grad_(True)
    loss, stats = get_loss(name, **params).compute(x, teacher, y)
    loss.backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_cuda_matches_cpu_float64(name: str, dtype: torch.dtype) -> None:
    s, t, y = _batch()
    s, t = s.to(dtype), t.to(dtype)  # same rounded inputs on both sides
    ref, gref, sref = _run(name, s.double(), t.double(), y, chunk_size=4)
    val, grad, stats = _run(name, s.cuda(), t.cuda(), y.cuda(), chunk_size=4)
    assert val.device.type == "cuda" and val.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(val.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(grad.double().cpu(), gref, rtol=tol, atol=tol * gref.abs().max().item())
    assert stats.keys() == sref.keys()

    sparse = SparseTeacher.from_logits(t.double(), y, k=8)
    ref, gref, _ = _run(name, s.double(), sparse, y, chunk_size=4)
    val, grad, _ = _run(name, s.cuda(), sparse.to("cuda"), y.cuda())
    torch.testing.assert_close(val.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), gref, rtol=tol, atol=tol * gref.abs().max().item())


def test_cuda_device_mismatch_is_an_error() -> None:
    s, t, y = _batch()
    with pytest.raises(ValueError, match="on cpu"):
        get_loss("fkl")(s.cuda(), t, y.cuda())
