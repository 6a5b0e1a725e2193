"""LoRA students (`student.lora`): only the adapters train, the run saves `student/` merged (plain transformers)
and `adapter/` (peft), resume is exact, a mistyped target module is one line before training, kd plan counts it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scale_helpers import step_losses
from test_distill import runner, tiny_recipe

from kdcli.cli import app
from kdcli.engine.backends import STATE_FILE
from kdcli.models import build_student
from kdcli.recipe import load_recipe

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
FAST = {
    "data": {"max_train_examples": 16, "max_eval_examples": 4, "max_length": 64},
    "train": {"max_steps": 6, "batch_size": 4, "save_every": 3, "keep_checkpoints": 5, "threads": 1},
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    tmp_path = tmp_path_factory.mktemp("lora")
    recipe = tiny_recipe(tmp_path, tiny_teacher, **FAST, student={"lora": LORA})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny"


def _initial_student(run_dir: Path) -> torch.nn.Module:
    recipe = load_recipe(run_dir / "recipe.yaml")
    student = build_student(recipe.student, recipe.teacher.model, torch.float32, recipe.seed)
    return student.eval()


def test_only_the_adapters_train(lora_run: Path) -> None:
    from safetensors.torch import load_file

    params = json.loads((lora_run / "run.json").read_text())["parameters"]
    # 2 layers × (q_proj 64→64 + v_proj 64→kv) adapters of rank 4: a small fraction of the student.
    assert 0 < params["student_trainable"] < params["student"] / 20
    state = torch.load(lora_run / "checkpoints" / "step-00000006" / STATE_FILE, weights_only=True)
    moments = sum(t.numel() for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step")
    assert moments == 2 * params["student_trainable"]  # AdamW's m and v for the adapters only

    merged = load_file(lora_run / "student" / "model.safetensors")
    adapter = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    initial = _initial_student(lora_run).state_dict()
    changed = set()
    for key, weight in merged.items():
        if not torch.equal(weight, initial[key]):
            changed.add(key)
            prefix = "base_model.model." + key.removesuffix(".weight")
            delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * (8 / 4)
            torch.testing.assert_close(weight, initial[key] + delta, rtol=0, atol=1e-6)
    assert changed and all(key.endswith(("q_proj.weight", "v_proj.weight")) for key in changed)


def test_student_loads_plainly_and_matches_base_plus_adapter(lora_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(lora_run / "student").eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    peft_model = PeftModel.from_pretrained(_initial_student(lora_run), lora_run / "adapter").eval()
    batch = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(batch).logits, peft_model(batch).logits, rtol=1e-4, atol=1e-5)


def test_resume_with_lora_is_exact(lora_run: Path, tmp_path: Path) -> None:
    """The run as if killed after its step-3 checkpoint: resuming gives the same losses bit for bit."""
    run_dir = tmp_path / "tiny"
    shutil.copytree(lora_run, run_dir)
    for leftover in ("run.json", "student", "adapter", "checkpoints/step-00000006"):
        path = run_dir / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert step_losses(run_dir) == step_losses(lora_run)
    resumed = json.loads((run_dir / "run.json").read_text())
    assert resumed["resumed_from"] == 3
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    shown = runner.invoke(app, ["compare", str(lora_run), str(run_dir)])  # two LoRA runs: trainable shown
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "student trainable parameters" in line)
    assert (
        f"{resumed['parameters']['student_trainable']:,}" in row
        or str(resumed["parameters"]["student_trainable"]) in row
    )


def test_mistyped_target_module_is_one_line_before_training(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, student={"lora": {"target_modules": ["q_proj", "v_prj"]}})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if "error" in line.lower()]
    assert len(error) == 1 and "student.lora.target_modules" in error[0] and "'v_proj'" in error[0], result.output
    assert "Loading teacher" not in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


def test_bad_rank_is_refused(tmp_path: Path, tiny_teacher: Path) -> None:
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, tiny_teacher, student={"lora": {"r": 0}}))])
    assert result.exit_code == 2 and "student.lora.r" in result.output


def test_plan_shows_fewer_trainable_parameters_and_smaller_optimizer(tmp_path: Path, tiny_teacher: Path) -> None:
    from kdcli.plan import plan_recipe

    full = plan_recipe(load_recipe(tiny_recipe(tmp_path / "full", tiny_teacher)), world_size=2, memory=None)
    lora = plan_recipe(
        load_recipe(tiny_recipe(tmp_path / "lora", tiny_teacher, student={"lora": LORA})), world_size=2, memory=None
    )
    assert full.student.trainable is None and 0 < lora.student.trainable < full.student.params / 20
    for before, after in zip(full.rows, lora.rows, strict=True):
        assert after.states.optimizer < before.states.optimizer / 20
        assert after.states.params == before.states.params  # the frozen base is still all there
    shown = runner.invoke(app, ["plan", str(tmp_path / "lora" / "recipe.yaml")])
    assert shown.exit_code == 0, shown.output
    assert f"{lora.student.trainable:,} trainable (LoRA)" in shown.output


def test_zero3_two_processes_with_lora_match_one_and_export(tmp_path: Path, tiny_teacher: Path) -> None:
    """ZeRO-3 shards the frozen base and the adapters alike; the gathered export is merged the same way."""
    from peft import PeftModel
    from scale_helpers import run_kd
    from transformers import AutoModelForCausalLM

    train = {"max_steps": 4, "batch_size": 4, "save_every": None, "threads": 1}
    one = tiny_recipe(
        tmp_path / "one", tiny_teacher, **{**FAST, "train": {**train, "grad_accum": 2}}, student={"lora": LORA}
    )
    assert runner.invoke(app, ["distill", str(one)]).exit_code == 0
    two = tiny_recipe(
        tmp_path / "two",
        tiny_teacher,
        **{**FAST, "train": {**train, "grad_accum": 1}},
        student={"lora": LORA},
        deepspeed={"zero_stage": 3},
    )
    result = run_kd(["distill", str(two), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir, single = tmp_path / "two" / "runs" / "tiny", tmp_path / "one" / "runs" / "tiny"
    losses, expected = step_losses(run_dir), step_losses(single)
    assert losses.keys() == expected.keys() and max(abs(losses[s] - expected[s]) for s in expected) < 1e-5
    assert (
        json.loads((run_dir / "run.json").read_text())["parameters"]["student_trainable"]
        == json.loads((single / "run.json").read_text())["parameters"]["student_trainable"]
    )
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    peft_model = PeftModel.from_pretrained(_initial_student(run_dir), run_dir / "adapter").eval()
    batch = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(batch).logits, peft_model(batch).logits, rtol=1e-4, atol=1e-5)
