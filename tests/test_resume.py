"""Checkpoints and exact resume: SIGKILL mid-run then `--resume` gives the uninterrupted run's losses, step by
step (bit for bit in one process, within 1e-5 over two DeepSpeed processes); Ctrl-C saves and exits cleanly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from scale_helpers import run_kd, start_kd, step_losses, wait_for
from test_distill import runner, tiny_recipe

from kdcli.cli import app
from kdcli.engine.checkpoint import latest_checkpoint, read_state
from kdcli.engine.loop import Session
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


def test_resume_from_the_final_checkpoint_keeps_the_whole_run(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C lands during step 2 of 3, so the loop stops after step 3, the last, and saves it: the resumed process
    trains no step. Its run.json must still describe the whole run, as an uninterrupted one's does."""
    fast = {**FAST, "train": {**FAST["train"], "max_steps": 3, "save_every": 1}}
    whole = tiny_recipe(tmp_path / "whole", tiny_teacher, **fast)
    result = runner.invoke(app, ["distill", str(whole)])
    assert result.exit_code == 0, result.output
    reference = RunFolder(tmp_path / "whole" / "runs" / "tiny").read_record()

    original_step = Session.step
    slow_s = 4.0  # the interrupted process's steps take this long: wall time the resumed record must include

    def step_then_ctrl_c(self: Session, batches: Any, stop_requested: bool, state: Any = None) -> Any:
        time.sleep(slow_s / 3)
        out = original_step(self, batches, stop_requested, state)
        if state is not None and state.step == 1:  # during step 2: the loop sees it at step 3, the last
            os.kill(os.getpid(), signal.SIGINT)
        return out

    recipe = tiny_recipe(tmp_path / "cut", tiny_teacher, **fast)
    run_dir = tmp_path / "cut" / "runs" / "tiny"
    with monkeypatch.context() as patch:
        patch.setattr(Session, "step", step_then_ctrl_c)
        result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 130, result.output
    assert read_state(latest_checkpoint(RunFolder(run_dir)))["step"] == 3 and not (run_dir / "run.json").exists()

    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "step 0/3" not in result.output and "step 3/3" in result.output
    record = RunFolder(run_dir).read_record()
    assert record.final["step"] == 3 and record.train_loss == reference.train_loss
    assert _untimed(record.final) == _untimed(reference.final)
    assert record.tokens_seen == reference.tokens_seen and record.steps == 3 and record.resumed_from == 3
    assert record.train_seconds is not None and record.train_seconds >= slow_s
    assert record.tokens_per_s == pytest.approx(record.tokens_seen / record.train_seconds)
    assert record.wall_seconds is not None and record.wall_seconds >= record.train_seconds
    assert [e["step"] for e in record.evals] == [e["step"] for e in reference.evals] == [0, 3]
    assert step_losses(run_dir) == step_losses(tmp_path / "whole" / "runs" / "tiny")

    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "the run is finished" in result.output, result.output
    assert "save_every" not in result.output


def _untimed(final: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics without those that depend on the machine's speed."""
    return {key: value for key, value in final.items() if key not in ("elapsed_s", "tokens_per_s")}
