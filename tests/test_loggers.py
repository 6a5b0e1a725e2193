"""Experiment loggers (`train.report_to`, `--report-to`): TensorBoard holds exactly what metrics.jsonl holds, a
killed and resumed run logs each step once, W&B gets the resolved recipe and the same scalars (through a stand-in
`wandb` module, plus an offline smoke test where wandb is installed), a missing extra is one line before any model
loads, and `kd eval` / `kd compare` add their results at the run's last step."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scale_helpers import run_kd, start_kd, wait_for
from test_distill import runner, tiny_recipe

from kdcli.cli import app
from kdcli.loggers import TrainingLog
from kdcli.recipe import TrainConfig, validate_recipe

pytest.importorskip("tensorboard", reason="the tensorboard extra (in .[dev]) is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# 12 steps of 2 x 4 examples with AKL (a divergence with diagnostics), an eval every 4 steps, a checkpoint every 3.
FAST = {
    "loss": {"divergence": "akl"},
    "data": {"max_train_examples": 24, "max_eval_examples": 4, "max_length": 64},
    "train": {
        "max_steps": 12,
        "batch_size": 4,
        "grad_accum": 2,
        "eval_every": 4,
        "save_every": 3,
        "keep_checkpoints": 10,
        "threads": 1,
    },
}
TIMING_TAGS = {"train/tokens_per_s"}  # the only tags that differ between two identical runs


def settings(report_to: Any) -> dict[str, Any]:
    return {**FAST, "train": {**FAST["train"], "report_to": report_to}}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] as TensorBoard shows them (a resumed writer's purge applied)."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(value: float) -> float:
    return float(np.float32(value))  # event files store float32


def expected_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """What the loggers must hold, from metrics.jsonl (and run.json's eval before training, at step 0)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        if "loss" in row:
            for key in set(row) - {"elapsed_s", "gen_tokens", "gen_s"}:  # no on-policy sampling in this run
                out[f"train/{key}"][step] = f32(row[key])
        else:
            for key in ("loss", "ce", "kd"):
                out[f"eval/{key}"][step] = f32(row[f"eval_{key}"])
    before = json.loads((run_dir / "run.json").read_text())["eval_before"]
    for key in ("loss", "ce", "kd"):
        out[f"eval/{key}"][0] = f32(before[f"eval_{key}"])
    return out


class FakeWandb(types.ModuleType):
    """The part of `wandb` kd uses: `init` records its arguments and returns a run that records `log`s."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.runs: list[Any] = []

    def init(self, **kwargs: Any) -> Any:
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], exit_code=None)
        run.log = lambda data, step: run.logged.append((step, dict(data)))
        run.finish = lambda exit_code=0: setattr(run, "exit_code", exit_code)
        self.runs.append(run)
        return run

    @staticmethod
    def Html(text: str) -> tuple[str, str]:
        return ("html", text)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> tuple[Path, FakeWandb]:
    """An uninterrupted run reporting to TensorBoard and to a stand-in W&B."""
    tmp_path = tmp_path_factory.mktemp("loggers")
    fake = FakeWandb()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake)
        mp.delenv("WANDB_MODE", raising=False)
        result = runner.invoke(
            app, ["distill", str(tiny_recipe(tmp_path, tiny_teacher, **settings(["tensorboard", "wandb"])))]
        )
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny", fake


def test_tensorboard_holds_what_metrics_jsonl_holds(finished: tuple[Path, FakeWandb]) -> None:
    run_dir, _ = finished
    got = read_scalars(run_dir)
    want = expected_scalars(run_dir)
    named = {"train/loss", "train/kd", "train/ce", "train/lr", "train/grad_norm", "train/tokens_per_s"}
    assert named | {"train/akl_head_weight", "eval/loss", "eval/ce", "eval/kd"} <= set(got)
    assert set(got) == set(want)  # nothing missing, nothing extra (no zero gen_tokens off-policy)
    for tag, values in want.items():
        assert got[tag] == sorted(values.items()), tag
    assert [step for step, _ in got["train/loss"]] == list(range(1, 13))
    assert [step for step, _ in got["eval/loss"]] == [0, 4, 8, 12]


def test_wandb_gets_the_resolved_recipe_and_the_same_scalars(finished: tuple[Path, FakeWandb]) -> None:
    run_dir, fake = finished
    (run,) = fake.runs
    assert run.kwargs["config"] == yaml.safe_load((run_dir / "recipe.yaml").read_text())  # every default filled in
    assert run.kwargs["id"] == (run_dir / "wandb" / "run_id").read_text().strip()
    assert (run.kwargs["resume"], run.kwargs["mode"], run.kwargs["dir"]) == ("allow", "offline", str(run_dir))
    logged: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step, data in run.logged:
        for tag, value in data.items():
            logged[tag].append((step, f32(value)))
    assert dict(logged) == read_scalars(run_dir)
    assert run.exit_code == 0


def test_a_resumed_run_logs_each_step_once(
    tmp_path: Path, tiny_teacher: Path, finished: tuple[Path, FakeWandb]
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **settings("tensorboard"))
    run_dir = tmp_path / "runs" / "tiny"
    process = start_kd(["distill", str(recipe)], tmp_path)
    wait_for(run_dir / "checkpoints" / "step-00000006" / "kd-state.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "run.json").exists(), "the run finished before it could be killed"
    killed = read_scalars(run_dir)
    assert [s for s, _ in killed["train/loss"]][:6] == list(range(1, 7))  # flushed as logged: a kill keeps them
    # As if the checkpoints after step 3 were never finished: the resume re-logs steps 4 to 6 (and on).
    for checkpoint in (run_dir / "checkpoints").iterdir():
        if int(checkpoint.name.rsplit("-", 1)[-1]) > 3:
            shutil.rmtree(checkpoint)

    result = run_kd(["distill", "--resume", str(run_dir)], tmp_path)
    assert result.returncode == 0, result.stderr
    got, reference = read_scalars(run_dir), read_scalars(finished[0])
    assert set(got) == set(reference)
    for tag, values in reference.items():
        steps = [step for step, _ in got[tag]]
        assert steps == [step for step, _ in values], f"{tag}: {steps}"  # one value per step, none missing
        if tag not in TIMING_TAGS:
            assert got[tag] == values, tag  # exact resume: the uninterrupted run's values


def test_training_log_follows_log_every_and_skips_steps_before_a_resume() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def open(self, folder: Path, start_step: int = 0) -> None:
            self.calls.append(("open", start_step))

        def scalars(self, step: int, values: dict[str, float]) -> None:
            self.calls.append((step, sorted(values)))

        def close(self, finished: bool = True) -> None:
            self.calls.append(("close", finished))

    fresh, resumed = Recorder(), Recorder()
    for logger, start in ((fresh, 0), (resumed, 4)):
        log = TrainingLog([logger], TrainConfig(log_every=3))  # type: ignore[list-item]
        log.on_start({"run_dir": "run", "start_step": start})
        for step in range(start + 1, 8):
            log.on_step({"step": step, "total_steps": 7, "loss": 1.0, "elapsed_s": 2.0, "tokens_seen": 9})
        log.on_eval({"step": 7, "eval_loss": 1.0, "eval_tokens": 5})
        log.close()  # no on_end: the run failed
        log.close()
    assert fresh.calls == [
        ("open", 0),
        (3, ["train/loss"]),
        (6, ["train/loss"]),
        (7, ["train/loss"]),
        (7, ["eval/loss"]),
        ("close", False),
    ]
    assert resumed.calls[:3] == [("open", 4), (6, ["train/loss"]), (7, ["train/loss"])]


@pytest.mark.parametrize("extra", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str
) -> None:
    real_import = builtins.__import__
    blocked = {extra, f"torch.utils.{extra}"}  # torch's module imports tensorboard, and may be imported already

    def without_extra(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == extra or name in blocked:
            raise ModuleNotFoundError(f"No module named '{extra}'", name=extra)
        return real_import(name, *args, **kwargs)

    import kdcli.engine

    monkeypatch.setattr(kdcli.engine, "distill", lambda *a, **k: pytest.fail("kd distill started the run"))
    monkeypatch.setattr(builtins, "__import__", without_extra)
    # The teacher does not exist: any model work would fail with another message.
    recipe = tiny_recipe(tmp_path, tmp_path / "no-such-teacher", train={"report_to": extra})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: train.report_to:") and f"pip install 'kdcli[{extra}]'" in line, line
    assert not (tmp_path / "runs").exists()


def test_report_to_names_are_checked() -> None:
    assert validate_recipe({"name": "x", "train": {"report_to": "wandb"}}).train.report_to == ["wandb"]
    assert validate_recipe({"name": "x"}).train.report_to == []
    with pytest.raises(Exception, match=r"train\.report_to: 'mlflow' is not a logger; use tensorboard, wandb"):
        validate_recipe({"name": "x", "train": {"report_to": ["tensorboard", "mlflow"]}})
    result = runner.invoke(app, ["eval", "anything", "--report-to", "tensorboard,mlflow"])
    assert result.exit_code == 2 and "--report-to: 'mlflow' is not a logger; use tensorboard, wandb" in result.output


def test_wandb_continues_its_run_and_respects_wandb_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcli.loggers import loggers_for

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")
    for _ in range(2):
        (logger,) = loggers_for(["wandb"], run_name="tiny", config={"seed": 0})
        logger.open(tmp_path, 3)
        logger.close(finished=False)
    first, second = fake.runs
    assert first.kwargs["id"] == second.kwargs["id"] == (tmp_path / "wandb" / "run_id").read_text().strip()
    assert first.kwargs["mode"] == "online" and first.exit_code == 1


def test_real_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from kdcli.loggers import loggers_for

    monkeypatch.delenv("WANDB_MODE", raising=False)
    for step in (1, 2):
        (logger,) = loggers_for(["wandb"], run_name="tiny", config={"seed": 0})
        logger.open(tmp_path, step - 1)
        logger.scalars(step, {"train/loss": 1.0 / step})
        logger.close()
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    offline = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2 and all((d / f"run-{run_id}.wandb").is_file() for d in offline)


def test_kd_eval_and_compare_report_at_the_runs_last_step(
    tmp_path: Path, finished: tuple[Path, FakeWandb], tiny_teacher: Path
) -> None:
    run_a = shutil.copytree(finished[0], tmp_path / "a")
    run_b = shutil.copytree(finished[0], tmp_path / "b")
    args = ["eval", str(run_a), "--report-to", "tensorboard", "--seeds", "10", "--max-new-tokens", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (set_name,) = json.loads((run_a / "eval" / "results.json").read_text())["sets"]
    metrics = json.loads((run_a / "eval" / "results.json").read_text())["sets"][set_name]["sampling"]["metrics"]
    got = read_scalars(run_a)
    for metric in ("rougeL", "distinct_1", "distinct_2"):
        assert got[f"eval/{set_name}/{metric}"] == [(12, f32(metrics[metric]["mean"]))]

    result = runner.invoke(app, ["compare", str(run_a), str(run_b), "--report-to", "tensorboard", "--resamples", "100"])
    assert result.exit_code == 0, result.output
    acc = EventAccumulator(str(run_a / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("compare/text_summary")
    assert event.step == 12 and "kd compare (baseline: a)" in event.tensor_proto.string_val[0].decode()

    result = runner.invoke(app, ["eval", str(tiny_teacher), "--report-to", "tensorboard"])
    assert result.exit_code == 2 and "TARGET" in result.output and "is a model" in result.output
