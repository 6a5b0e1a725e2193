"""Damaged run folders: `kd distill --resume`, `kd eval` and `kd compare` on a run whose files a kill, a full disk or
a bad copy broke give one `error:` line naming the file (exit 2), or skip what is broken and say so in a `warning:`
line (exit 0); never a traceback, and never a changed file of the run (except what the command writes anew).

One real tiny run is built per module (checkpoints at steps 2 and 4, the student, run.json, metrics.jsonl and a kd
eval), and each test damages one thing in a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_distill import tiny_recipe
from typer.testing import CliRunner

from kdcli.cli import app

runner = CliRunner()

FAST = {
    "data": {"max_train_examples": 16, "max_eval_examples": 2, "max_length": 48},
    "train": {"max_steps": 4, "batch_size": 4, "save_every": 2, "keep_checkpoints": 2, "threads": 1},
}
EVAL = ["--greedy", "--max-examples", "2", "--max-new-tokens", "3", "--device", "cpu", "--precision", "fp32"]
NEWEST, OLDER = "checkpoints/step-00000004", "checkpoints/step-00000002"

Damage = Callable[[Path], None]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    tmp_path = tmp_path_factory.mktemp("corrupt")
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, tiny_teacher, **FAST))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    result = runner.invoke(app, ["eval", str(run), *EVAL])
    assert result.exit_code == 0, result.output
    assert (run / "eval" / "starter" / "greedy.jsonl").is_file()
    return run


def copy_of(run: Path, tmp_path: Path, *, killed: bool = False, evaluated: bool = True) -> Path:
    """A copy of the run; `killed`: as SIGKILL after the last checkpoint leaves it (no student, no run.json)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    if killed:
        shutil.rmtree(copy / "student")
        (copy / "run.json").unlink()
    if killed or not evaluated:
        shutil.rmtree(copy / "eval")  # made from the original's path: a copy's own eval starts afresh
    return copy


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def kd(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, *names: str) -> None:
    """Exit 2 and exactly one `error:` line, which names every one of `names`."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and all(name in errors[0] for name in names), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output


def assert_skipped(result, *names: str) -> None:
    """Exit 0 and a `warning:` line naming every one of `names`."""
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert any(all(name in line for name in names) for line in warnings), result.output
    assert not any(line.startswith("error:") for line in result.output.splitlines()), result.output


# --- damage -----------------------------------------------------------------------------------------------------


def cut(relative: str, keep: int | None = None) -> Damage:
    """Cut a file short: to half its size, or to its first `keep` bytes."""

    def damage(run: Path) -> None:
        path = run / relative
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 if keep is None else keep])

    return damage


def write(relative: str, text: str) -> Damage:
    return lambda run: (run / relative).write_text(text, encoding="utf-8")


def delete(relative: str) -> Damage:
    return lambda run: (run / relative).unlink()


def metrics_line(text: str, at: int | None = 1) -> Damage:
    """Insert a line into metrics.jsonl after line `at`, or append it (`at` None: as a kill mid-write leaves it)."""

    def damage(run: Path) -> None:
        path = run / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        if at is None:
            path.write_text("\n".join(lines) + "\n" + text, encoding="utf-8")
        else:
            path.write_text("\n".join([*lines[:at], text, *lines[at:]]) + "\n", encoding="utf-8")

    return damage


def scramble(relative: str) -> Damage:
    """The same size, other bytes: damage that no size or structure check can see before loading."""

    def damage(run: Path) -> None:
        size = (run / relative).stat().st_size
        (run / relative).write_bytes((bytes(range(7, 256)) * (size // 249 + 1))[:size])

    return damage


def set_in_results(run: Path) -> None:
    path = run / "eval" / "results.json"
    results = json.loads(path.read_text())
    results["sets"]["starter"] = [1]
    path.write_text(json.dumps(results))


# --- kd distill --resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (metrics_line("not json {"), ["metrics.jsonl", "line 2"]),
        (metrics_line("[1, 2]"), ["metrics.jsonl", "line 2", "not a JSON object"]),
        (metrics_line('{"step": "three", "loss": 1.0}'), ["metrics.jsonl", "line 2", "step"]),
        (delete("recipe.yaml"), ["recipe.yaml", "missing"]),
        (write("recipe.yaml", "name: [unclosed\n"), ["recipe.yaml", "invalid YAML"]),
        (write("recipe.yaml", "- a\n- b\n"), ["recipe.yaml", "mapping"]),
        (lambda run: (cut(f"{NEWEST}/state.pt")(run), cut(f"{OLDER}/state.pt")(run)), ["no usable checkpoint"]),
        (scramble(f"{NEWEST}/state.pt"), ["step-00000004", "cannot be loaded"]),
    ],
    ids=["metrics-garbage", "metrics-list", "metrics-step", "recipe-missing", "recipe-yaml", "recipe-list",
         "all-checkpoints-cut", "state-scrambled"],
)  # fmt: skip
def test_resume_refuses_a_damaged_run_and_changes_nothing(
    finished: Path, tmp_path: Path, damage: Damage, names: list[str]
) -> None:
    run = copy_of(finished, tmp_path, killed=True)
    damage(run)
    before = hashes(run)
    assert_refused(kd("distill", "--resume", run), *names)
    assert hashes(run) == before


@pytest.mark.parametrize(
    ("damage", "broken"),
    [
        (cut(f"{NEWEST}/state.pt"), "state.pt"),
        (cut(f"{NEWEST}/rng-rank0.pt"), "rng-rank0.pt"),
        (delete(f"{NEWEST}/state.pt"), "state.pt"),
        (write(f"{NEWEST}/kd-state.json", '{"step": 4, "tok'), "kd-state.json"),
    ],
    ids=["state-cut", "rng-cut", "state-missing", "kd-state-cut"],
)
def test_resume_falls_back_to_the_checkpoint_before_a_damaged_one(
    finished: Path, tmp_path: Path, damage: Damage, broken: str
) -> None:
    run = copy_of(finished, tmp_path, killed=True)
    damage(run)
    before = hashes(run)
    assert_skipped(kd("distill", "--resume", run), "step-00000004", broken)
    assert json.loads((run / "run.json").read_text())["resumed_from"] == 2
    after = hashes(run)
    assert {k: v for k, v in after.items() if k.startswith(OLDER) or k == "recipe.yaml"} == {
        k: v for k, v in before.items() if k.startswith(OLDER) or k == "recipe.yaml"
    }
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]  # 3 and 4 logged again, once


def test_resume_drops_a_metrics_line_cut_off_by_the_kill_and_says_so(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path, killed=True)
    metrics_line('{"step": 5, "loss": 2.', at=None)(run)
    assert_skipped(kd("distill", "--resume", run), "metrics.jsonl", "cut off")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]


# --- kd eval ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (cut("student/model.safetensors"), ["student/model.safetensors", "cut short"]),
        (cut("student/model.safetensors", keep=50), ["student/model.safetensors", "cut short"]),
        (delete("student/model.safetensors"), ["student", "no weights"]),
        (delete("student/config.json"), ["student", "config.json"]),
        (write("student/config.json", '{"model_type": "lla'), ["student/config.json"]),
        (delete("recipe.yaml"), ["recipe.yaml", "missing"]),
        (write("recipe.yaml", "name: [unclosed\n"), ["recipe.yaml", "invalid YAML"]),
    ],
    ids=["weights-cut", "weights-header-cut", "weights-missing", "config-missing", "config-cut", "recipe-missing",
         "recipe-yaml"],
)  # fmt: skip
def test_eval_refuses_a_half_written_run_before_writing_anything(
    finished: Path, tmp_path: Path, damage: Damage, names: list[str]
) -> None:
    run = copy_of(finished, tmp_path, evaluated=False)
    damage(run)
    before = hashes(run)
    assert_refused(kd("eval", run, *EVAL), *names)
    assert hashes(run) == before and not (run / "eval").exists()


def test_eval_does_not_need_the_run_record(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path, evaluated=False)
    write("run.json", '{"name": "tiny", "st')(run)
    before = hashes(run)
    result = kd("eval", run, *EVAL)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert {k: v for k, v in hashes(run).items() if not k.startswith("eval/")} == before


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (cut("eval/starter/greedy.jsonl"), ["greedy.jsonl", "line 1", "--force"]),
        (set_in_results, ["results.json", "Delete it"]),
    ],
    ids=["pass-cut", "results-sets"],
)
def test_eval_refuses_its_own_damaged_outputs(finished: Path, tmp_path: Path, damage: Damage, names: list[str]) -> None:
    run = copy_of(finished, tmp_path, evaluated=False)
    assert kd("eval", run, *EVAL).exit_code == 0
    damage(run)
    before = hashes(run)
    assert_refused(kd("eval", run, *EVAL), *names)
    changed = {k for k in hashes(run).keys() | before.keys() if hashes(run).get(k) != before.get(k)}
    assert changed <= {"eval/starter/generation.json"}  # rewritten with the same settings, nothing else


# --- kd compare -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (metrics_line("not json {"), ["metrics.jsonl", "line 2"]),
        (metrics_line('"just a string"'), ["metrics.jsonl", "line 2"]),
        (delete("run.json"), ["run.json", "did not finish"]),
        (write("run.json", '{"name": "tiny", "st'), ["run.json", "not valid JSON"]),
        (write("run.json", "[]"), ["run.json", "JSON object"]),
        (write("run.json", '{"final": [1], "steps": 4}'), ["run.json", "'final'"]),
        (write("run.json", '{"parameters": "many"}'), ["run.json", "'parameters'"]),
        (delete("recipe.yaml"), ["recipe.yaml", "missing"]),
        (write("recipe.yaml", "a: [b\n"), ["recipe.yaml", "invalid YAML"]),
        (cut("eval/results.json"), ["results.json", "not valid JSON"]),
        (set_in_results, ["results.json", "sets.starter"]),
        (cut("eval/starter/greedy.jsonl"), ["greedy.jsonl", "line 1"]),
    ],
    ids=["metrics-garbage", "metrics-string", "record-missing", "record-cut", "record-list", "record-final-list",
         "record-parameters-text", "recipe-missing", "recipe-yaml", "results-cut", "results-sets", "pass-cut"],
)  # fmt: skip
def test_compare_refuses_a_damaged_run_and_changes_nothing(
    finished: Path, tmp_path: Path, damage: Damage, names: list[str]
) -> None:
    run = copy_of(finished, tmp_path)
    damage(run)
    before, base = hashes(run), hashes(finished)
    assert_refused(kd("compare", finished, run, "--resamples", "100"), *names)
    assert hashes(run) == before and hashes(finished) == base


def test_compare_skips_a_metrics_line_cut_off_by_a_kill_and_says_so(finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path)
    metrics_line('{"step": 5, "lo', at=None)(run)
    before = hashes(run)
    assert_skipped(kd("compare", finished, run, "--resamples", "100"), "metrics.jsonl", "cut off")
    assert hashes(run) == before


@pytest.mark.parametrize(
    "damage",
    [write("run.json", '{"name": "tiny"}'), cut("student/model.safetensors"), delete(f"{NEWEST}/state.pt")],
    ids=["record-keys-missing", "student-cut", "checkpoint-damaged"],
)
def test_compare_does_not_need_what_it_does_not_read(finished: Path, tmp_path: Path, damage: Damage) -> None:
    run = copy_of(finished, tmp_path)
    damage(run)
    before = hashes(run)
    result = kd("compare", finished, run, "--resamples", "100")
    assert result.exit_code == 0 and result.exception is None, result.output
    assert hashes(run) == before


def test_resume_rewrites_what_a_kill_left_half_written(finished: Path, tmp_path: Path) -> None:
    # Killed while saving the student: run.json (written last) absent, model.safetensors cut short; and a run.json
    # damaged by hand, which resume never reads but replaces.
    run = copy_of(finished, tmp_path, evaluated=False)
    cut("student/model.safetensors")(run)
    write("run.json", '{"name": "tiny", "st')(run)
    result = kd("distill", "--resume", run)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert json.loads((run / "run.json").read_text())["resumed_from"] == 4
    assert kd("eval", run, *EVAL).exit_code == 0  # the student is whole again
