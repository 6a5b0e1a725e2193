"""End to end on tiny random Llamas: the CLI, the loss going down, the run folder, reload, overwrite refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdcli.cli import app

runner = CliRunner()


def tiny_recipe(tmp_path: Path, teacher: Path, **sections: dict) -> Path:
    recipe = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(teacher)},
        "student": {"init": "teacher", "layers": "every-other"},
        "data": {
            "train": "builtin:starter",
            "eval": "builtin:starter",
            "max_train_examples": 32,
            "max_eval_examples": 16,
            "max_length": 96,
        },
        "loss": {"divergence": "fkl"},
        "train": {"max_steps": 24, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def distill_quickstart(*overrides: str) -> Any:
    """`kd distill recipes/quickstart.yaml --set ...` through the CLI."""
    args = ["distill", str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")]
    for item in overrides:
        args += ["--set", item]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    tmp_path = tmp_path_factory.mktemp("run")
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, tiny_teacher))])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny"


def test_run_folder_contents(finished_run: Path) -> None:
    assert {p.name for p in finished_run.iterdir()} >= {"recipe.yaml", "run.json", "metrics.jsonl", "student"}
    saved = yaml.safe_load((finished_run / "recipe.yaml").read_text())
    assert saved["train"]["max_steps"] == 24 and saved["loss"]["kd_ratio"] == 0.5  # resolved, defaults filled
    run = json.loads((finished_run / "run.json").read_text())
    assert run["seed"] == 0 and run["device"] == "cpu" and run["steps"] == 24
    assert run["parameters"]["student"] < run["parameters"]["teacher"]
    assert run["environment"]["torch"] == torch.__version__ and run["wall_seconds"] > 0
    lines = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == list(range(1, 25))
    for key in ("step", "loss", "kd", "ce", "lr", "tokens_per_s", "elapsed_s"):
        assert key in steps[0]


def test_loss_goes_down(finished_run: Path) -> None:
    lines = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5
    run = json.loads((finished_run / "run.json").read_text())
    assert run["eval_after"]["eval_loss"] < run["eval_before"]["eval_loss"]


def test_student_reloads_with_transformers(finished_run: Path, tiny_teacher: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(finished_run / "student")
    tokenizer = AutoTokenizer.from_pretrained(finished_run / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert student.config.num_hidden_layers == teacher.config.num_hidden_layers // 2
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    out = student.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 or out[0, -1] == tokenizer.eos_token_id


def test_refuses_to_overwrite(finished_run: Path) -> None:
    recipe = finished_run.parent.parent / "recipe.yaml"
    before = (finished_run / "run.json").read_bytes()
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2
    assert "--overwrite" in result.output and "not empty" in result.output
    assert (finished_run / "run.json").read_bytes() == before


def test_overwrite_replaces_the_run(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"max_steps": 2})
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "old.txt").write_text("old")
    assert runner.invoke(app, ["distill", str(recipe)]).exit_code == 2
    assert (run_dir / "old.txt").exists()
    result = runner.invoke(app, ["distill", str(recipe), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (run_dir / "old.txt").exists() and (run_dir / "student").is_dir()


def test_vocabulary_mismatch_is_refused(tmp_path: Path, tiny_teacher: Path, tiny_other_vocab: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, student={"init": "pretrained", "model": str(tiny_other_vocab)})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2
    assert "vocabulary" in result.output
    assert not (tmp_path / "runs" / "tiny").exists(), "nothing is written before the checks pass"


def test_gradient_accumulation_matches_a_full_batch(tmp_path: Path, tiny_teacher: Path) -> None:
    """Two micro-batches of 4 give the same first step as one batch of 8 (valid-position normalisation)."""
    one = tiny_recipe(tmp_path / "a", tiny_teacher, train={"max_steps": 1, "batch_size": 8, "lr": 1e-3})
    two = tiny_recipe(tmp_path / "b", tiny_teacher, train={"max_steps": 1, "batch_size": 4, "grad_accum": 2})
    for path in (one, two):
        assert runner.invoke(app, ["distill", str(path)]).exit_code == 0
    first = json.loads((tmp_path / "a" / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()[0])
    second = json.loads((tmp_path / "b" / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5)
    assert first["grad_norm"] == pytest.approx(second["grad_norm"], rel=1e-4)


def test_recipe_check_prints_resolved_recipe(tmp_path: Path, tiny_teacher: Path) -> None:
    result = runner.invoke(app, ["recipe", "check", str(tiny_recipe(tmp_path, tiny_teacher)), "--set", "seed=7"])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output and "seed: 7" in result.output and "kd_ratio: 0.5" in result.output


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["recipe", "check", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "missing.yaml: no such file" in result.output
    assert "Traceback" not in result.output


def test_cli_debug_shows_the_traceback(tmp_path: Path) -> None:
    from kdcli.errors import KdError

    result = runner.invoke(app, ["--debug", "recipe", "check", str(tmp_path / "missing.yaml")])
    assert isinstance(result.exception, KdError)


def test_malformed_set_on_the_cli(tmp_path: Path, tiny_teacher: Path) -> None:
    result = runner.invoke(app, ["recipe", "check", str(tiny_recipe(tmp_path, tiny_teacher)), "--set", "seed"])
    assert result.exit_code == 2 and "expected key.path=value" in result.output


def test_python_dash_m_works() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kdcli", "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "distill" in out.stdout


def test_losses_command_lists_every_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import kdcli.ui

    monkeypatch.setattr(kdcli.ui, "console", Console(width=200))  # one row per divergence, nothing wrapped
    result = runner.invoke(app, ["losses"])
    assert result.exit_code == 0, result.output
    for name in ("fkl", "rkl", "akl", "atkd", "skl", "srkl", "js", "tvd", "uld", "hybrid"):
        assert f" {name} " in result.output
    assert "mu=0.5" in result.output and "lam=0.2" in result.output and "COLING 2025" in result.output
    assert "loss.cross_tokenizer.method" in result.output and "2402.12030" in result.output


@pytest.mark.parametrize("divergence", ["akl", "atkd"])
def test_divergence_diagnostics_are_logged(tmp_path: Path, tiny_teacher: Path, divergence: str) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, loss={"divergence": divergence}, train={"max_steps": 2})
    assert runner.invoke(app, ["distill", str(recipe)]).exit_code == 0
    first = json.loads((tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()[0])
    expected = {"akl": ["akl_head_weight"], "atkd": ["atkd_hard_fraction", "atkd_teacher_uncertainty"]}[divergence]
    for key in expected:
        assert 0.0 <= first[key] <= 1.0


def test_real_builtin_teacher_distills_one_step(
    tmp_path: Path, builtin_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped quickstart recipe, shrunk to one step on a few short examples, on the real SmolLM2 teacher."""
    monkeypatch.setenv("KD_HOME", str(builtin_home))
    result = distill_quickstart(
        "train.max_steps=1",
        "train.batch_size=2",
        "data.max_train_examples=2",
        "data.max_eval_examples=2",
        "data.max_length=48",
        f"output_dir={tmp_path / 'runs'}",
    )
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "runs" / "quickstart-fkl" / "run.json").read_text())
    assert run["parameters"]["teacher"] > 100e6 and run["steps"] == 1
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "runs" / "quickstart-fkl" / "student")
    assert config.num_hidden_layers == 15 and config.vocab_size == 49152


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "akl", "atkd", "skl", "srkl", "js", "tvd"])
def test_quickstart_recipe_runs_with_every_divergence(tmp_path: Path, tiny_teacher: Path, divergence: str) -> None:
    """`kd distill recipes/quickstart.yaml --set loss.divergence=X`, with a tiny teacher standing in for SmolLM2."""
    result = distill_quickstart(
        f"loss.divergence={divergence}",
        f"teacher.model={tiny_teacher}",
        "student.layers={keep: 2, by: loss}",  # the recipe's choice, scaled to the tiny teacher's 4 layers
        "train.max_steps=2",
        "train.precision=fp32",
        "data.max_train_examples=16",
        "data.max_eval_examples=8",
        "data.max_length=64",
        f"output_dir={tmp_path / 'runs'}",
    )
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "runs" / f"quickstart-{divergence}" / "run.json").read_text())
    assert run["divergence"] == divergence and run["steps"] == 2
    assert all(torch.isfinite(torch.tensor(run["final"][key])) for key in ("loss", "kd", "ce"))
    assert run["eval_after"]["eval_kd"] >= 0.0
