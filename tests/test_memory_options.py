"""The two memory options of `train`: `activation_checkpointing` (the same losses, the student's layers recomputed
in backward) and `optimizer_states: bf16` (AdamW's moments in bf16 with stochastic rounding: half the bytes, the
fp32 optimizer's trajectory), and what `kd plan` and the recipe make of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distill import tiny_recipe
from transformers.models.llama import modeling_llama
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine import optim
from kdcli.engine.optim import BF16StatesAdamW, round_to_bf16_
from kdcli.errors import KdError
from kdcli.plan import recipe_settings
from kdcli.plan.memory import plain_states
from kdcli.recipe import load_recipe

runner = CliRunner()
STEPS = 3
TRAIN = {"max_steps": STEPS, "precision": "fp32"}


def run(tmp_path: Path, teacher: Path, loss: dict[str, Any] | None = None, **train: Any) -> list[dict[str, Any]]:
    """A tiny run of STEPS steps with these `train` keys: its metrics lines that have a loss."""
    recipe = tiny_recipe(tmp_path, teacher, train={**TRAIN, **train}, data={"eval": None}, loss=loss or {})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_checkpointing_recomputes_the_students_layers_and_keeps_the_losses(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    # Counted inside the layer (its MLP): the layer's own forward is the checkpointing wrapper itself.
    calls = {"n": 0}
    forward = modeling_llama.LlamaMLP.forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    counts, losses = [], []
    for on in (False, True):
        calls["n"] = 0
        rows = run(tmp_path / str(on), tiny_teacher, loss={"fused": fused}, activation_checkpointing=on)
        counts.append(calls["n"])
        losses.append(rows)
    # The teacher's and the student's forwards are the same in both runs; checkpointing adds one forward of each of
    # the student's 2 layers (every other of the tiny teacher's 4) per training micro-batch, in backward.
    assert counts[1] - counts[0] == 2 * STEPS
    plain, checkpointed = losses
    assert len(plain) == len(checkpointed) == STEPS
    for a, b in zip(plain, checkpointed, strict=True):
        for key in ("loss", "ce", "kd", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_bf16_states_run_uses_the_bf16_optimizer(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = {"n": 0}
    step = BF16StatesAdamW.step

    def counted(self: BF16StatesAdamW, *args: Any, **kwargs: Any) -> Any:
        steps["n"] += 1
        out = step(self, *args, **kwargs)
        assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in self.state.values())
        return out

    monkeypatch.setattr(optim.BF16StatesAdamW, "step", counted)
    fp32 = run(tmp_path / "fp32", tiny_teacher)
    assert steps["n"] == 0
    bf16 = run(tmp_path / "bf16", tiny_teacher, optimizer_states="bf16")
    assert steps["n"] == STEPS
    # Step 1 sees the same weights; later steps follow the fp32 optimizer up to the moments' rounding.
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=1e-6)
    assert bf16[-1]["loss"] == pytest.approx(fp32[-1]["loss"], rel=1e-2)


def test_stochastic_rounding_is_unbiased() -> None:
    torch.manual_seed(0)
    x = 1.0 + 2**-9 + 2**-11  # between the bf16 neighbours 1.0 and 1 + 2⁻⁷, 5/16 of the way up
    out = torch.empty(200_000, dtype=torch.bfloat16)
    round_to_bf16_(out, torch.full((200_000,), x))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert out.double().mean().item() == pytest.approx(x, abs=2e-5)
    negative = torch.empty(200_000, dtype=torch.bfloat16)
    round_to_bf16_(negative, torch.full((200_000,), -x))
    assert negative.double().mean().item() == pytest.approx(-x, abs=2e-5)


def test_the_second_moment_decays_in_bf16() -> None:
    """With round-to-nearest, v · 0.999 is v again in bf16 and v never decays; stochastically rounded, it does."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(50_000))
    opt = BF16StatesAdamW([param], lr=1e-3)
    param.grad = torch.full_like(param, 0.5)
    opt.step()
    param.grad = torch.zeros_like(param)
    for _ in range(1000):
        opt.step()
    v = opt.state[param]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16
    expected = 0.001 * 0.25 * 0.999**1000
    assert v.double().mean().item() == pytest.approx(expected, rel=0.02)
    nearest = torch.tensor(0.001 * 0.25, dtype=torch.bfloat16)
    assert (nearest * 0.999).item() == nearest.item()  # what round-to-nearest would have kept


def test_bf16_states_follow_torch_adamw() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(256, 32), torch.randn(256, 4)
    models = [torch.nn.Linear(32, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].weight.detach().clone()
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.1}
    opts = [torch.optim.AdamW(models[0].parameters(), **kwargs), BF16StatesAdamW(models[1].parameters(), **kwargs)]
    for _ in range(100):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    moved = (models[0].weight - start).norm()
    assert (models[1].weight - models[0].weight).norm() < 0.02 * moved
    state = opts[1].state_dict()
    again = BF16StatesAdamW(models[1].parameters(), **kwargs)
    again.load_state_dict(state)  # torch would cast the moments to the parameters' fp32
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in again.state.values())


def test_bf16_states_are_refused_under_deepspeed() -> None:
    quickstart = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    with pytest.raises(KdError, match="ZeRO builds and keeps the optimizer states itself"):
        load_recipe(quickstart, ["train.optimizer_states=bf16", "deepspeed={zero_stage: 2}"])


def test_plan_counts_both_options() -> None:
    quickstart = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    plain = recipe_settings(load_recipe(quickstart, []), world_size=1, device="cpu", memory=None)
    both = recipe_settings(
        load_recipe(quickstart, ["train.activation_checkpointing=true", "train.optimizer_states=bf16"]),
        world_size=1,
        device="cpu",
        memory=None,
    )
    assert not plain.activation_checkpointing and plain.optimizer_state_bytes == 4
    assert both.activation_checkpointing and both.optimizer_state_bytes == 2
    psi = 1000
    assert plain_states(psi, "fp32", state_bytes=2).optimizer == plain_states(psi, "fp32").optimizer // 2
