"""DeepSpeed on CPU over gloo: two processes under ZeRO-2 and ZeRO-3 follow the single-process loss curve for the
same global batch, the ZeRO-3 export reloads with transformers, and contradictions are refused before launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scale_helpers import run_kd, step_losses
from test_distill import runner, tiny_recipe
from test_resume import FAST

from kdcli.cli import app
from kdcli.engine.distributed import deepspeed_config
from kdcli.errors import KdError
from kdcli.recipe import Recipe

# One process: 4 examples x 2 accumulation. Two processes: 4 examples each x 1 = the same 8 per step, in the
# same micro-batches, so the curves agree to float rounding.
TWO_PROCESSES = {**FAST, "train": {**FAST["train"], "grad_accum": 1, "save_every": None}}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    tmp_path = tmp_path_factory.mktemp("single")
    fast = {**FAST, "train": {**FAST["train"], "save_every": None}}
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, tiny_teacher, **fast))])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny"


def two_process_run(tmp_path: Path, teacher: Path, deepspeed: dict) -> Path:
    recipe = tiny_recipe(tmp_path, teacher, **TWO_PROCESSES, deepspeed=deepspeed)
    result = run_kd(["distill", str(recipe), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "runs" / "tiny"


def max_deviation(run_dir: Path, reference: Path) -> float:
    losses, expected = step_losses(run_dir), step_losses(reference)
    assert losses.keys() == expected.keys()
    return max(abs(losses[step] - expected[step]) for step in expected)


def test_zero2_two_processes_match_one(tmp_path: Path, tiny_teacher: Path, single: Path) -> None:
    run_dir = two_process_run(tmp_path, tiny_teacher, {"zero_stage": 2})
    assert max_deviation(run_dir, single) < 1e-5
    resolved = json.loads((run_dir / "deepspeed.json").read_text())
    assert resolved["zero_optimization"]["stage"] == 2 and resolved["train_batch_size"] == 8
    run = json.loads((run_dir / "run.json").read_text())
    assert run["processes"] == 2 and run["deepspeed"] == {"zero_stage": 2}


def test_zero3_two_processes_match_one_and_export_reloads(tmp_path: Path, tiny_teacher: Path, single: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir = two_process_run(tmp_path, tiny_teacher, {"zero_stage": 3, "teacher_zero3": True})
    assert max_deviation(run_dir, single) < 1e-5
    # The export is one consolidated HF folder, not shards: it reloads and computes what the 1-process student does.
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    expected = AutoModelForCausalLM.from_pretrained(single / "student").eval()
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, expected(ids).logits, atol=1e-4)


def recipe_with(**sections: dict) -> Recipe:
    return Recipe.model_validate({"name": "x", **sections})


def test_deepspeed_config_maps_the_recipe(tmp_path: Path) -> None:
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "train_batch_size": "auto"}))
    recipe = recipe_with(
        train={"batch_size": 2, "grad_accum": 3, "max_grad_norm": 0.5, "precision": "bf16"},
        deepspeed={"zero_stage": 3, "offload_optimizer": True, "config": str(raw)},
    )
    config = deepspeed_config(recipe, 4)
    assert config["train_batch_size"] == 24 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_optimization"] == {"overlap_comm": True, "stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 0.5


@pytest.mark.parametrize(
    ("raw", "train", "message"),
    [
        ({"train_batch_size": 16}, {}, "train_batch_size=16 in"),
        ({"zero_optimization": {"stage": 1}}, {}, "zero_optimization.stage=1"),
        ({"optimizer": {"type": "Adam"}}, {}, "remove `optimizer`"),
        ({}, {"global_batch_size": 12}, "train.global_batch_size=12 but train.batch_size (4) x train.grad_accum (1)"),
    ],
)
def test_contradictions_are_refused_before_launch(
    tmp_path: Path, tiny_teacher: Path, raw: dict, train: dict, message: str
) -> None:
    (tmp_path / "ds.json").write_text(json.dumps(raw))
    sections = {**TWO_PROCESSES, "train": {**TWO_PROCESSES["train"], **train}}
    recipe = tiny_recipe(tmp_path, tiny_teacher, **sections, deepspeed={"config": str(tmp_path / "ds.json")})
    result = runner.invoke(app, ["distill", str(recipe), "--nproc", "2"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before any process started


def test_global_batch_is_checked_in_one_process_too() -> None:
    with pytest.raises(KdError, match=r"set train\.grad_accum=4"):
        deepspeed_config(recipe_with(train={"batch_size": 2, "global_batch_size": 8}), 1)
    with pytest.raises(ValueError, match=r"needs `zero_stage: 3`"):
        recipe_with(deepspeed={"offload_param": True})
