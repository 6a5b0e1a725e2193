"""Checkpoints and exact resume: SIGKILL mid-run then `--resume` gives the uninterrupted run's losses, step by
step (bit for bit in one process, within 1e-5 over two DeepSpeed processes); Ctrl-C saves and exits cleanly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from scale_helpers import run_kd, start_kd, step_losses, wait_for
from test_distill import runner, tiny_recipe

from kdcli.cli import app
from kdcli.engine.checkpoint import latest_checkpoint, read_state
from kdcli.runs import RunFolder

# 12 steps of 2 x 4 examples, a checkpoint every 3: small enough for ~10 s runs on 2 CPU cores.
FAST = {
    "data": {"max_train_examples": 24, "max_eval_examples": 4, "max_length": 64},
    "train": {"max_steps": 12, "batch_size": 4, "grad_accum": 2, "save_every": 3, "threads": 1},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> dict[int, float]:
    """The uninterrupted single-process run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, tiny_teacher, **FAST))])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000009", "step-00000012"]
    return step_losses(run_dir)


def kill_after_checkpoint(args: list[str], run_dir: Path, cwd: Path, torchrun: int = 0) -> None:
    process = start_kd(args, cwd, torchrun=torchrun)
    wait_for(run_dir / "checkpoints" / "step-00000003" / "kd-state.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "run.json").exists(), "the run finished before it could be killed"


def test_sigkill_then_resume_single_process_is_exact(
    tmp_path: Path, tiny_teacher: Path, reference: dict[int, float]
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **FAST)
    run_dir = tmp_path / "runs" / "tiny"
    kill_after_checkpoint(["distill", str(recipe)], run_dir, tmp_path)
    # What a kill during a checkpoint write leaves behind: resume must skip both, with a warning.
    (run_dir / "checkpoints" / ".step-00000099.tmp").mkdir()
    (run_dir / "checkpoints" / "step-00000098").mkdir()

    result = run_kd(["distill", "--resume", str(run_dir)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ignoring partial checkpoint" in result.stderr
    assert step_losses(run_dir) == reference  # identical at every step, not merely close
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000009", "step-00000012"]  # keep_checkpoints: 2, leftovers pruned


def test_sigkill_then_resume_two_processes(tmp_path: Path, tiny_teacher: Path, reference: dict[int, float]) -> None:
    fast = {**FAST, "train": {**FAST["train"], "grad_accum": 1}, "deepspeed": {"zero_stage": 2}}
    recipe = tiny_recipe(tmp_path, tiny_teacher, **fast)
    run_dir = tmp_path / "runs" / "tiny"
    kill_after_checkpoint(["distill", str(recipe)], run_dir, tmp_path, torchrun=2)  # kd under torchrun itself

    result = run_kd(["distill", "--resume", str(run_dir), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    losses = step_losses(run_dir)
    assert losses.keys() == reference.keys()
    assert max(abs(losses[step] - reference[step]) for step in reference) < 1e-5


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **{**FAST, "train": {**FAST["train"], "max_steps": 500}})
    run_dir = tmp_path / "runs" / "tiny"
    process = start_kd(["distill", str(recipe)], tmp_path)
    wait_for(run_dir / "checkpoints" / "step-00000003" / "kd-state.json", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Interrupted after step" in stderr and "Traceback" not in stderr
    checkpoint = latest_checkpoint(RunFolder(run_dir))
    assert checkpoint is not None and read_state(checkpoint)["step"] > 3
    assert f"--resume {run_dir}" in " ".join(stderr.split())


def test_resume_refusals(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **FAST)
    result = runner.invoke(app, ["distill", "--resume", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a kd run folder" in result.output
    result = runner.invoke(app, ["distill", str(recipe), "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "drop the recipe file" in result.output
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe.read_text())
    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "no complete checkpoint" in result.output
