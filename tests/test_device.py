"""`train.device` and the precision rule that follows it: one home (`kdcli.hardware`) for every command.

The rules are tested here on any machine by stubbing what torch reports; the end-to-end GPU runs (distill, resume,
cache-teacher and eval on `cuda`) are skipped where no GPU is visible.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_distill import tiny_recipe
from typer.testing import CliRunner

import kdcli.hardware as hardware
from kdcli.cli import app
from kdcli.errors import KdError
from kdcli.hardware import Runtime, resolve_device, resolve_precision
from kdcli.recipe import Recipe

runner = CliRunner()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture()
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """A pretend machine: set `gpus`, `gpu_bf16` and `cpu_bf16` to say what torch would report."""
    state: dict[str, object] = {"gpus": 0, "gpu_bf16": True, "cpu_bf16": False}
    monkeypatch.setattr(hardware, "cuda_count", lambda: int(state["gpus"]))  # type: ignore[call-overload]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: int(state["gpus"]) > 0)  # type: ignore[call-overload]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bool(state["gpu_bf16"]))
    monkeypatch.setattr(
        hardware, "cpu_flags", lambda *a: frozenset({"avx512_bf16"}) if state["cpu_bf16"] else frozenset()
    )
    hardware.native_bf16.cache_clear()
    yield state
    hardware.native_bf16.cache_clear()


def test_auto_is_the_first_gpu_where_there_is_one(machine: dict[str, object]) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    machine["gpus"] = 2
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_that_is_not_there_is_refused_in_one_line(machine: dict[str, object]) -> None:
    with pytest.raises(KdError, match=r"^train\.device: 'cuda' asks for a GPU, but torch sees no CUDA device"):
        resolve_device("cuda")
    machine["gpus"] = 2
    with pytest.raises(KdError, match=r"'cuda:2' does not exist; this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(KdError, match=r"^--device: 'gpu' is not a device"):
        resolve_device("gpu", "--device")


def test_precision_auto_asks_the_training_device_not_whether_cuda_exists(machine: dict[str, object]) -> None:
    """The bug this fixes: on a GPU machine without native CPU bf16, a CPU run got emulated bf16 (5x slower)."""
    machine["gpus"] = 1
    assert Recipe(name="r").train.precision == "bf16"  # auto → the GPU, which has bf16
    assert Recipe(name="r", train={"device": "cuda:0"}).train.precision == "bf16"
    assert Recipe(name="r", train={"device": "cpu"}).train.precision == "fp32"
    machine["cpu_bf16"] = True
    hardware.native_bf16.cache_clear()
    assert Recipe(name="r", train={"device": "cpu"}).train.precision == "bf16"
    machine["gpus"], machine["cpu_bf16"], machine["gpu_bf16"] = 1, True, False  # an old GPU without bf16
    hardware.native_bf16.cache_clear()
    assert Recipe(name="r").train.precision == "fp32"
    assert Recipe(name="r", train={"device": "cpu", "precision": "fp32"}).train.precision == "fp32"


def test_eval_precision_keeps_the_saved_dtype_only_on_a_cpu(machine: dict[str, object]) -> None:
    machine["cpu_bf16"] = True
    assert resolve_precision("auto", "cpu", saved="fp32") == "fp32"
    assert resolve_precision("auto", "cpu", saved="bf16") == "bf16"
    machine["gpus"] = 1
    hardware.native_bf16.cache_clear()
    assert resolve_precision("auto", "cuda:0", saved="fp32") == "bf16"
    assert resolve_precision("bf16", "cpu", saved="fp32") == "bf16"


def test_autocast_runs_on_the_runtime_device_type() -> None:
    a = torch.randn(4, 4)
    with Runtime(torch.device("cpu"), "bf16").autocast():
        assert (a @ a).dtype == torch.bfloat16
    with Runtime(torch.device("cpu"), "fp32").autocast():
        assert (a @ a).dtype == torch.float32
    with warnings.catch_warnings():  # torch warns that it disables a CUDA autocast where there is no GPU
        warnings.simplefilter("ignore", UserWarning)
        gpu = Runtime(torch.device("cuda", 0), "bf16").autocast()
    assert isinstance(gpu, torch.autocast) and gpu.device == "cuda"  # not the CPU autocast of a GPU run
    assert Runtime(torch.device("cpu"), "bf16").inference_dtype == torch.bfloat16


def test_recipe_refuses_a_misspelled_device(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher)
    result = runner.invoke(app, ["recipe", "check", str(recipe), "--set", "train.device=gpu0"])
    assert result.exit_code == 2, result.output
    assert "train.device" in result.output and "'gpu0' is not a device" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_distill_on_a_missing_gpu_stops_before_loading_anything(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"device": "cuda"})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "train.device: 'cuda' asks for a GPU" in result.output
    assert "Loading teacher" not in result.output and not (tmp_path / "runs").exists()


def test_cpu_run_records_its_device(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"device": "cpu", "max_steps": 2})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert run["device"] == "cpu"


def test_plan_defaults_to_the_recipe_device(machine: dict[str, object], tiny_teacher: Path) -> None:
    from kdcli.plan import default_device

    assert default_device("auto") == "cpu"
    assert default_device("cuda:1") == "cuda"  # planned for the GPU the recipe names, even from a laptop
    machine["gpus"] = 1
    assert default_device("auto") == "cuda"
    assert default_device("cpu") == "cpu"


# ------------------------------------------------------------------------------------------------ on a GPU


@needs_cuda
def test_distill_trains_on_the_gpu_and_resumes_there(tmp_path: Path, tiny_teacher: Path) -> None:
    from kdcli.engine import trainer

    seen: list[torch.device] = []
    original = trainer.Objective.__call__

    def spy(self, student_logits, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(student_logits.device)
        return original(self, student_logits, *args, **kwargs)

    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"max_steps": 4, "save_every": 2, "precision": "bf16"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.Objective, "__call__", spy)
        result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    assert seen and all(d.type == "cuda" for d in seen)
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "run.json").read_text())["device"].startswith("cuda:0")
    resumed = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output


@needs_cuda
def test_cache_teacher_and_eval_run_on_the_gpu(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"max_steps": 2})
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(cache), "--top-k", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads((cache / "manifest.json").read_text())["stats"]["device"].startswith("cuda:0")
    assert runner.invoke(app, ["distill", str(recipe)]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    result = runner.invoke(app, ["eval", str(run_dir), "--max-examples", "2", "--seeds", "1", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    generation = json.loads((run_dir / "eval" / "starter" / "generation.json").read_text())
    assert all(p["device"].startswith("cuda:0") for p in generation["passes"].values())
