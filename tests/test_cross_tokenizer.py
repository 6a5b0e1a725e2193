"""Distilling across tokenizers end to end: a tiny byte-level BPE teacher (512 tokens) into a tiny student with a
SentencePiece-style BPE of another size and other merges (700 tokens, byte fallback), both trained on the starter
data. Online, through a served teacher and from a cache; `--resume` is exact; every refusal is one line before any
weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_llama
from scale_helpers import step_losses
from test_distill import runner, tiny_recipe

from kdcli.cli import app

FAST = {
    "data": {"max_train_examples": 12, "max_eval_examples": 4, "max_length": 64},
    "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "threads": 1},
}


@pytest.fixture(scope="module")
def other_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sp-student")
    return make_tiny_llama(folder, layers=2, hidden=32, vocab_size=700, sentencepiece=True)


def cross_recipe(tmp_path: Path, model: Path, student: Path, method: str | None = "uld", **sections: dict) -> Path:
    """`tiny_recipe` with a pretrained student of its own tokenizer and `loss.cross_tokenizer: {method}`."""
    loss = {"cross_tokenizer": {"method": method, "params": {"top_k": 8}}} if method else {}
    teacher = sections.pop("teacher", {})
    merged = {key: {**FAST.get(key, {}), **sections.get(key, {})} for key in {*FAST, *sections}}
    path = tiny_recipe(tmp_path, model, student={"init": "pretrained", "model": str(student)}, **merged)
    raw = yaml.safe_load(path.read_text())
    raw["loss"] = loss
    raw["teacher"].update(teacher)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())


@pytest.mark.parametrize(("method", "fused"), [("uld", "auto"), ("hybrid", False)])
def test_training_across_tokenizers(
    tmp_path: Path, tiny_teacher: Path, other_student: Path, method: str, fused: object
) -> None:
    """Both methods train, on the fused head (teacher and student) and on the plain path."""
    recipe = cross_recipe(tmp_path, tiny_teacher, other_student, method)
    result = runner.invoke(app, ["distill", str(recipe), "--set", f"loss.fused={str(fused).lower()}"])
    assert result.exit_code == 0, result.output
    run = run_json(tmp_path)
    assert run["divergence"] == method and run["fused_head"] == (fused == "auto")
    assert 0.5 < run["data"]["train"]["aligned_fraction"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 6 and all(line["kd"] > 0 for line in steps)
    assert run["eval_after"]["eval_loss"] < run["eval_before"]["eval_loss"]
    assert run["eval_after"]["eval_kd"] > 0


def test_resume_is_exact(tmp_path: Path, tiny_teacher: Path, other_student: Path) -> None:
    """A run stopped after its step-3 checkpoint and resumed gives the uninterrupted run's losses, bit for bit."""
    recipe = cross_recipe(tmp_path, tiny_teacher, other_student, "hybrid", train={"save_every": 3})
    assert runner.invoke(app, ["distill", str(recipe)]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    reference = step_losses(run_dir)
    # What a crash after the step-3 checkpoint leaves: no run.json, no later checkpoint, no student.
    for stale in (run_dir / "run.json", run_dir / "checkpoints" / "step-00000006", run_dir / "student"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert step_losses(run_dir) == reference


def test_a_cache_serves_the_student_of_another_tokenizer(
    tmp_path: Path, tiny_teacher: Path, other_student: Path
) -> None:
    """The teacher's cache (written once, for its own tokenizer) trains the student like the online teacher: the same
    records up to their fp16 storage."""
    writer = tiny_recipe(tmp_path / "w", tiny_teacher, cache={"top_k": 16, "shard_tokens": 400}, **FAST)
    out = tmp_path / "cache"
    done = runner.invoke(app, ["cache-teacher", str(writer), "--out", str(out), "--split", "all"])
    assert done.exit_code == 0, done.output
    runs = {}
    for name, cache in (("online", None), ("cached", str(out))):
        recipe = cross_recipe(tmp_path / name, tiny_teacher, other_student, "hybrid", teacher={"cache": cache})
        result = runner.invoke(app, ["distill", str(recipe)])
        assert result.exit_code == 0, result.output
        runs[name] = run_json(tmp_path / name)
    online, cached = runs["online"], runs["cached"]
    assert cached["data"]["train"]["aligned_fraction"] == online["data"]["train"]["aligned_fraction"]
    for key in ("eval_loss", "eval_kd", "eval_ce"):
        assert cached["eval_before"][key] == pytest.approx(online["eval_before"][key], rel=2e-3), key
        assert cached["eval_after"][key] == pytest.approx(online["eval_after"][key], rel=2e-2), key
    assert cached["final"]["loss"] == pytest.approx(online["final"]["loss"], rel=2e-2)


def test_through_a_served_teacher(tmp_path: Path, tiny_teacher: Path, other_student: Path, kd_home: Path) -> None:
    """The served teacher's top-K, on its own tokens, trains like the online teacher."""
    from fake_vllm import FakeVLLM

    runs = {}
    with FakeVLLM(tiny_teacher) as server:
        for name, served in (("online", None), ("served", {"url": server.url, "model": "served-teacher", "top_k": 8})):
            recipe = cross_recipe(tmp_path / name, tiny_teacher, other_student, "uld", teacher={"server": served})
            result = runner.invoke(app, ["distill", str(recipe)])
            assert result.exit_code == 0, result.output
            runs[name] = run_json(tmp_path / name)
    for key in ("eval_loss", "eval_kd"):
        assert runs["served"]["eval_before"][key] == pytest.approx(runs["online"]["eval_before"][key], rel=1e-4)
        assert runs["served"]["eval_after"][key] == pytest.approx(runs["online"]["eval_after"][key], rel=1e-3)


# ------------------------------------------------------------------------------------------------ refusals


def refused(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The one `error:` line of a `kd distill` that must stop before any weight is read."""
    import kdcli.engine.setup as setup

    def no_weights(*_: object, **__: object) -> None:
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(setup, "load_teacher", no_weights)
    monkeypatch.setattr(setup, "build_student", no_weights)
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output  # one line, the last
    assert not (recipe.parent / "runs" / "tiny").exists()
    return errors[0]


def test_another_vocabulary_without_the_key_names_it(
    tmp_path: Path, tiny_teacher: Path, other_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = refused(cross_recipe(tmp_path, tiny_teacher, other_student, None), monkeypatch)
    assert "vocabulary differs" in line and "loss.cross_tokenizer: {method: uld}" in line


def test_a_student_without_a_chat_template(
    tmp_path: Path, tiny_teacher: Path, other_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(other_student, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    line = refused(cross_recipe(tmp_path, tiny_teacher, bare), monkeypatch)
    assert line.startswith("error: student.model: its tokenizer has no chat template") and "data.template" in line


def test_teacher_written_responses_are_not_yet_supported(
    tmp_path: Path, tiny_teacher: Path, other_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = cross_recipe(tmp_path, tiny_teacher, other_student, teacher={"cache": str(tmp_path)})
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["responses"] = "teacher"
    recipe.write_text(yaml.safe_dump(raw))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "kd-teacher-cache", "version": 1}))
    assert refused(recipe, monkeypatch).startswith("error: data.responses: `teacher` with loss.cross_tokenizer")


def test_an_unknown_method(tmp_path: Path, tiny_teacher: Path, other_student: Path) -> None:
    result = runner.invoke(app, ["distill", str(cross_recipe(tmp_path, tiny_teacher, other_student, "gold"))])
    assert result.exit_code == 2
    assert "loss.cross_tokenizer.method: unknown cross-tokenizer method 'gold'" in result.output
    assert "valid: uld, hybrid" in result.output


def test_a_cache_without_offsets_or_with_too_few_log_probs(
    tmp_path: Path, tiny_teacher: Path, other_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = tiny_recipe(tmp_path / "w", tiny_teacher, cache={"top_k": 4}, **FAST)
    out = tmp_path / "cache"
    assert runner.invoke(app, ["cache-teacher", str(writer), "--out", str(out), "--split", "all"]).exit_code == 0
    recipe = cross_recipe(tmp_path / "k", tiny_teacher, other_student, "uld", teacher={"cache": str(out)})
    line = refused(recipe, monkeypatch)
    assert "top_k: 8 is more than the 4 log-probs the cache" in line
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["writer"]["reads"]  # what a kd that did not store the offsets wrote
    (out / "manifest.json").write_text(json.dumps(manifest))
    raw = yaml.safe_load(recipe.read_text())
    raw["loss"]["cross_tokenizer"]["params"]["top_k"] = 4
    recipe.write_text(yaml.safe_dump(raw))
    line = refused(recipe, monkeypatch)
    assert "written without the teacher's character offsets" in line and "--overwrite" in line
