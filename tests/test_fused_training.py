"""`loss.fused` in real runs: a fused fp32 run logs the plain run's losses (1e-5 relative), and the rule for when
the fused head applies (`auto`, `true`, `false`) holds, with a one-line error where `true` cannot be met."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_distill import tiny_recipe
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine.objective import choose_heads
from kdcli.errors import KdError

runner = CliRunner()


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_both(
    tmp_path: Path, teacher_model: Path, teacher_cache: Path | None = None, **sections: dict
) -> tuple[list[dict], list[dict], dict, dict]:
    """The same recipe with `loss.fused: false` and `true`: (plain metrics, fused metrics, their run records)."""
    out = []
    loss = sections.pop("loss", {})
    for fused in (False, True):
        recipe = tiny_recipe(tmp_path / str(fused), teacher_model, loss={**loss, "fused": fused}, **sections)
        if teacher_cache is not None:
            data = yaml.safe_load(recipe.read_text())
            data["teacher"]["cache"] = str(teacher_cache)
            recipe.write_text(yaml.safe_dump(data))
        result = runner.invoke(app, ["distill", str(recipe)])
        assert result.exit_code == 0, result.output
        run = tmp_path / str(fused) / "runs" / "tiny"
        out.append((losses(run), json.loads((run / "run.json").read_text())))
    (plain, plain_record), (fused_rows, fused_record) = out
    return plain, fused_rows, plain_record, fused_record


def assert_same_losses(plain: list[dict], fused: list[dict]) -> None:
    assert len(plain) == len(fused)
    for a, b in zip(plain, fused, strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "ce", "kd", "grad_norm", "eval_loss", "eval_ce", "eval_kd"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


TRAIN = {"max_steps": 4, "eval_every": 2, "precision": "fp32"}


@pytest.mark.parametrize(
    "loss",
    [
        {"divergence": "fkl"},
        {"divergence": "atkd", "params": {"temperature": 2.0}, "kd_ratio": 0.7},
        {"divergence": "akl", "kd_ratio": 1.0},
        {"divergence": "rkl", "kd_ratio": 0.0},
    ],
    ids=["fkl", "atkd-T2", "akl-kd-only", "ce-only"],
)
def test_fused_run_logs_the_plain_runs_losses(tmp_path: Path, tiny_teacher: Path, loss: dict) -> None:
    plain, fused, plain_record, fused_record = run_both(tmp_path, tiny_teacher, loss=loss, train=TRAIN)
    assert_same_losses(plain, fused)
    assert plain_record["fused_head"] is False and fused_record["fused_head"] is True


def test_fused_lora_run_logs_the_plain_runs_losses(tmp_path: Path, tiny_teacher: Path) -> None:
    lora = {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    plain, fused, _, fused_record = run_both(tmp_path, tiny_teacher, student=lora, train={**TRAIN, "lr": 1e-2})
    assert_same_losses(plain, fused)
    assert fused_record["fused_head"] is True


def test_fused_on_policy_run_logs_the_plain_runs_losses(tmp_path: Path, tiny_teacher: Path) -> None:
    sections = {"on_policy": {"ratio": 0.5, "max_new_tokens": 8}, "train": TRAIN}
    plain, fused, _, _ = run_both(tmp_path, tiny_teacher, **sections)
    assert_same_losses(plain, fused)
    assert any(row.get("gen_tokens") for row in fused)


def test_fused_run_from_a_cache_logs_the_plain_runs_losses(tmp_path: Path, tiny_teacher: Path) -> None:
    cache = tmp_path / "cache"
    recipe = tiny_recipe(tmp_path / "write", tiny_teacher, cache={"top_k": 16})
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(cache)])
    assert result.exit_code == 0, result.output
    sections = {"cache": {"top_k": 16}, "train": TRAIN}
    plain, fused, _, fused_record = run_both(tmp_path, tiny_teacher, cache, **sections)
    assert_same_losses(plain, fused)
    assert fused_record["fused_head"] is True


def tiny_gpt2(path: Path, teacher: Path) -> Path:
    """A GPT-2 student with the tiny teacher's tokenizer: a model type whose output layer kd does not fuse."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gpt2_student_recipe(tmp_path: Path, teacher: Path, **sections: dict) -> Path:
    student = tiny_gpt2(tmp_path / "gpt2", teacher)
    student_section = {"init": "pretrained", "model": str(student), "layers": "all"}
    return tiny_recipe(tmp_path, teacher, student=student_section, train={"max_steps": 1}, **sections)


def test_fused_true_where_it_cannot_apply_is_one_line_and_writes_nothing(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = gpt2_student_recipe(tmp_path, tiny_teacher, loss={"fused": True})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any("loss.fused: true" in line and "'gpt2'" in line for line in lines), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


def test_fused_auto_falls_back_with_a_note(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = gpt2_student_recipe(tmp_path, tiny_teacher)
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "Plain logits (loss.fused: auto)" in result.output
    assert json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())["fused_head"] is False


def test_choose_heads_rule(tiny_teacher: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert choose_heads(False, model, model, None).student is None
    auto = choose_heads("auto", model, model, None)
    assert auto.student is not None and auto.teacher is not None and auto.note is None
    assert auto.student.weight is model.get_input_embeddings().weight  # tied: the embedding's parameter
    assert choose_heads("auto", model, None, None).teacher is None  # a cached teacher has no head
    off = choose_heads("auto", model, model, "the student trains under DeepSpeed")
    assert off.student is None and off.note == "the student trains under DeepSpeed"
    with pytest.raises(KdError, match=r"loss\.fused: true.*DeepSpeed"):
        choose_heads(True, model, model, "the student trains under DeepSpeed")
