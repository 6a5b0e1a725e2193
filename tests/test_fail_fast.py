"""Input errors are found before any model weight is read, for distill, cache-teacher and eval.

The models here have their config and tokenizer but weights that cannot be read (garbage bytes in
model.safetensors): a command that reaches the weights fails with the weights' error, so each test that expects
the input's error instead proves the input was checked first, from outside the code that checks it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_data_errors import error_line
from test_distill import tiny_recipe
from typer.testing import CliRunner

from kdcli.cli import app

runner = CliRunner()


def unreadable_weights(source: Path, folder: Path) -> Path:
    """A copy of the model at `source` whose weight file is not safetensors."""
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    assert weights.exists()
    weights.write_bytes(b"\x00not a safetensors file" * 64)
    return folder


@pytest.fixture(scope="module")
def weightless(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    return unreadable_weights(tiny_teacher, tmp_path_factory.mktemp("weightless") / "teacher")


def test_unreadable_weights_are_reached_when_the_input_is_good(tmp_path: Path, weightless: Path) -> None:
    """The control: with nothing wrong in the input, the command gets to the weights and fails there."""
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, weightless, train={"max_steps": 1}))])
    line = error_line(result, "teacher.model")
    assert "could not load" in line


def test_a_misspelled_data_path_fails_before_the_teacher_loads(tmp_path: Path, weightless: Path) -> None:
    recipe = tiny_recipe(tmp_path, weightless, data={"train": str(tmp_path / "trian.jsonl")})
    error_line(runner.invoke(app, ["distill", str(recipe)]), "data.train", "trian.jsonl")


def test_unrecognised_columns_fail_before_the_teacher_loads(tmp_path: Path, weightless: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "Name a color.", "a": "Blue."}) + "\n", encoding="utf-8")
    recipe = tiny_recipe(tmp_path, weightless, data={"train": str(data), "eval": None})
    error_line(runner.invoke(app, ["distill", str(recipe)]), "data.train", "no response column")


def test_a_bad_eval_row_fails_before_the_teacher_loads(tmp_path: Path, weightless: Path) -> None:
    data = tmp_path / "eval.jsonl"
    rows = [{"instruction": "Name a color.", "response": "Blue."}, {"instruction": "Say hi.", "response": ["Hi"]}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = tiny_recipe(tmp_path, weightless, data={"eval": str(data)})
    error_line(runner.invoke(app, ["distill", str(recipe)]), "data.eval", "eval.jsonl line 2", "'response'")


def test_a_student_with_another_vocabulary_fails_before_any_weights(
    tmp_path: Path, weightless: Path, tiny_other_vocab: Path
) -> None:
    student = unreadable_weights(tiny_other_vocab, tmp_path / "student")
    recipe = tiny_recipe(tmp_path, weightless, student={"init": "pretrained", "model": str(student)})
    error_line(runner.invoke(app, ["distill", str(recipe)]), "student.model", "vocabulary differs")


def test_an_existing_run_folder_fails_before_the_teacher_loads(tmp_path: Path, weightless: Path) -> None:
    recipe = tiny_recipe(tmp_path, weightless)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "run.json").write_text("{}", encoding="utf-8")
    error_line(runner.invoke(app, ["distill", str(recipe)]), "--overwrite")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> tuple[Path, Path]:
    """(recipe, cache folder): a real cache of the tiny teacher, train and eval."""
    tmp_path = tmp_path_factory.mktemp("cache")
    recipe = tiny_recipe(tmp_path, tiny_teacher, cache={"top_k": 8})
    out = tmp_path / "cache"
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return recipe, out


def test_a_cache_for_another_setup_fails_before_the_student_is_built(
    tmp_path: Path, weightless: Path, cache: tuple[Path, Path]
) -> None:
    _, out = cache
    recipe = tiny_recipe(
        tmp_path, weightless, student={"init": "pretrained", "model": str(weightless)}, data={"max_length": 64}
    )
    settings = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    settings["teacher"]["cache"] = str(out)
    recipe.write_text(yaml.safe_dump(settings), encoding="utf-8")
    result = runner.invoke(app, ["distill", str(recipe)])
    error_line(result, "teacher.cache", "another setup")
    assert "max_length" in result.output


def test_cache_teacher_checks_the_data_before_the_teacher_loads(tmp_path: Path, weightless: Path) -> None:
    recipe = tiny_recipe(tmp_path, weightless, data={"eval": str(tmp_path / "missing.jsonl")})
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(tmp_path / "cache")])
    error_line(result, "data.eval", "missing.jsonl")
    assert not (tmp_path / "cache").exists()


def test_finishing_a_cache_with_other_settings_fails_before_the_teacher_loads(
    tmp_path: Path, weightless: Path, cache: tuple[Path, Path]
) -> None:
    _, out = cache
    copy = shutil.copytree(out, tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    recipe = tiny_recipe(tmp_path, weightless, cache={"top_k": 4})
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(copy)])
    error_line(result, "--out", "other settings")
    assert "top_k" in result.output
    assert {p.name: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_eval_checks_the_data_before_the_model_loads(tmp_path: Path, weightless: Path) -> None:
    result = runner.invoke(
        app, ["eval", str(weightless), "--data", str(tmp_path / "held-out.jsonl"), "--out", str(tmp_path / "e")]
    )
    error_line(result, "held-out.jsonl")


def test_prompts_only_data_is_checked_for_prompts_before_the_teacher_loads(tmp_path: Path, weightless: Path) -> None:
    """`data.responses: teacher` needs prompts only: a file of prompts passes the check, one without fails it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a color."}) + "\n", encoding="utf-8")
    recipe = tiny_recipe(tmp_path, weightless, data={"train": str(prompts), "eval": None, "responses": "teacher"})
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(tmp_path / "cache")])
    assert "could not load" in error_line(result, "teacher.model")  # the prompts passed; the weights are reached
    prompts.write_text(json.dumps({"title": "Name a color."}) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(tmp_path / "cache")])
    error_line(result, "data.train", "prompt")


def test_a_cache_with_a_pretrained_student_needs_no_teacher(tmp_path: Path, tiny_teacher: Path) -> None:
    """The student's config comes from the student alone, so the teacher may be gone once its cache is written."""
    teacher = shutil.copytree(tiny_teacher, tmp_path / "teacher")
    recipe = tiny_recipe(
        tmp_path, teacher, student={"init": "pretrained", "model": str(tiny_teacher)}, train={"max_steps": 2}
    )
    out = tmp_path / "cache"
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    shutil.rmtree(teacher)
    settings = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    settings["teacher"]["cache"] = str(out)
    recipe.write_text(yaml.safe_dump(settings), encoding="utf-8")
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
