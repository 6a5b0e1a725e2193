"""On-policy and mixed-policy distillation (`on_policy`): which micro-batches are sampled, the batch built from the
student's samples (prompt masked, EOS labelled, padded), ratio 0 as the plain run bit for bit, ratio 1 sampling
every micro-batch, exact resume at ratio 0.5 after SIGKILL, the cache refusal, the adaptive schedule, kd plan and
kd compare, and ZeRO-3 over two processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from scale_helpers import run_kd, start_kd, wait_for
from test_distill import runner, tiny_recipe
from test_fail_fast import error_line, unreadable_weights

from kdcli.cli import app
from kdcli.data import Collator
from kdcli.engine.checkpoint import latest_checkpoint, read_state
from kdcli.engine.objective import IGNORE_INDEX
from kdcli.engine.on_policy import (
    OnPolicy,
    Sample,
    TransformersSampler,
    draws_on_policy,
    next_ratio,
    prompts_of,
    sampled_examples,
)
from kdcli.engine.state import TrainingState
from kdcli.hardware import Runtime
from kdcli.models import GenerationSettings, load_tokenizer
from kdcli.recipe import validate_recipe
from kdcli.runs import RunFolder

# 2 x 4 examples a step, 8 new tokens a sample: a few seconds a run on 2 CPU cores.
FAST: dict[str, Any] = {
    "data": {"max_train_examples": 24, "max_eval_examples": 4, "max_length": 64},
    "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "threads": 1},
    "on_policy": {"max_new_tokens": 8},
}
TIMING = ("tokens_per_s", "elapsed_s", "gen_s")


def with_(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    return {key: {**base.get(key, {}), **sections.get(key, {})} for key in {*base, *sections}}


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(run_dir: Path) -> list[dict[str, Any]]:
    return [row for row in metrics(run_dir) if "loss" in row]


def distill(tmp_path: Path, teacher: Path, **sections: dict[str, Any]) -> Path:
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, teacher, **sections))])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny"


# --- the pieces -----------------------------------------------------------------------------------------------------


def test_draws_are_a_pure_function_of_seed_step_and_slot() -> None:
    assert not any(draws_on_policy(0, step, slot, 0.0) for step in range(1, 50) for slot in range(4))
    assert all(draws_on_policy(0, step, slot, 1.0) for step in range(1, 50) for slot in range(4))
    half = [draws_on_policy(3, step, slot, 0.5) for step in range(1, 201) for slot in range(2)]
    assert 160 < sum(half) < 240
    assert half == [draws_on_policy(3, step, slot, 0.5) for step in range(1, 201) for slot in range(2)]
    assert half != [draws_on_policy(4, step, slot, 0.5) for step in range(1, 201) for slot in range(2)]
    state = torch.get_rng_state()
    draws_on_policy(0, 1, 0, 0.5)
    assert torch.equal(state, torch.get_rng_state())  # no draw from torch's RNG


def test_sampled_batch_masks_the_prompt_labels_the_response_and_pads() -> None:
    collate = Collator(pad_token_id=0)
    data = collate(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
            {"input_ids": [5, 6, 10, 11], "labels": [-100, -100, 10, 11]},
            {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]},  # response cut off by max_length
        ]
    )
    assert prompts_of(data) == [[5, 6, 7], [5, 6], [5, 6, 7]]
    samples = [Sample([5, 6, 7], [20, 21, 2]), Sample([5, 6], [22]), Sample([5, 6, 7], [23, 24, 25, 26])]
    batch = collate(sampled_examples(samples))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 20, 21, 2, 0], [5, 6, 22, 0, 0, 0, 0], [5, 6, 7, 23, 24, 25, 26]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [6, 3, 7]
    ignore = IGNORE_INDEX
    # Shifted: label t is token t + 1, so the last prompt position predicts the first sampled token.
    assert batch["labels"].tolist() == [
        [ignore, ignore, 20, 21, 2, ignore, ignore],
        [ignore, 22, ignore, ignore, ignore, ignore, ignore],
        [ignore, ignore, 23, 24, 25, 26, ignore],
    ]
    assert prompts_of(batch) == [s.prompt for s in samples]


def test_sampler_stops_at_eos_keeps_prompts_and_rng(tiny_teacher: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).train()
    tokenizer = load_tokenizer(str(tiny_teacher))
    sampler = TransformersSampler(
        tokenizer, GenerationSettings(max_new_tokens=12), Runtime.of("cpu", "fp32"), zero3=False
    )
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50], [1, 60, 61, 62]]  # different lengths: left-padded together
    first = sampler.sample(model, prompts, seed=7)
    assert [s.prompt for s in first] == prompts and all(len(s.response) == 12 for s in first)  # no EOS sampled
    assert model.training  # the model's mode is given back
    rng = torch.get_rng_state()
    assert [s.response for s in sampler.sample(model, prompts, seed=7)] == [s.response for s in first]
    assert torch.equal(rng, torch.get_rng_state())  # sampling is seeded apart from training's RNG
    # Make row 0's third token a stop token: that row now ends there with it; the others stop at their first one.
    stop = first[0].response[2]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    second = sampler.sample(model, prompts, seed=7)
    for before, after in zip(first, second, strict=True):
        cut = before.response.index(stop) + 1 if stop in before.response else len(before.response)
        assert after.response == before.response[:cut]
    assert second[0].response == first[0].response[: first[0].response.index(stop) + 1]
    batch = Collator(tokenizer.pad_token_id)(sampled_examples(second))
    # A vocabulary shared with the teacher narrower than the output layer: no id beyond it is sampled.
    narrow = TransformersSampler(
        tokenizer, GenerationSettings(max_new_tokens=12), Runtime.of("cpu", "fp32"), zero3=False, width=100
    )
    narrowed = [t for s in narrow.sample(model, prompts, seed=7) for t in s.response]
    assert len(narrowed) >= 12 and max(narrowed) < 100
    for row, sample in enumerate(second):
        length = len(sample.prompt) + len(sample.response)
        labels = batch["labels"][row].tolist()
        assert int(batch["attention_mask"][row].sum()) == length
        assert labels[: len(sample.prompt) - 1] == [IGNORE_INDEX] * (len(sample.prompt) - 1)
        assert labels[len(sample.prompt) - 1 : length - 1] == sample.response
        assert set(labels[length - 1 :]) == {IGNORE_INDEX}


def test_adaptive_schedule_rises_when_the_eval_loss_stops_improving() -> None:
    evals = [{"step": 0, "eval_loss": 3.0}, {"step": 10, "eval_loss": 2.5}]
    assert next_ratio(0.2, evals, 10, 0.1) == 0.2  # improving: unchanged
    evals.append({"step": 20, "eval_loss": 2.6})
    assert next_ratio(0.2, evals, 20, 0.1) == 0.3  # rising: up by the step
    evals.append({"step": 30, "eval_loss": 2.6})
    assert next_ratio(0.3, evals, 30, 0.1) == 0.4  # flat counts as not improving
    assert next_ratio(0.95, evals, 30, 0.1) == 1.0  # capped
    assert next_ratio(0.3, evals, 40, 0.1) == 0.3  # no eval at this step: nothing to react to
    assert next_ratio(0.0, evals[:1], 0, 0.1) == 0.0
    state = TrainingState(step=30, evals=evals, on_policy_ratio=0.4, gen_tokens=1234, gen_seconds=5.5)
    assert TrainingState.from_checkpoint(json.loads(json.dumps(state.to_checkpoint(2)))) == state


def test_recipe_checks() -> None:
    recipe = validate_recipe({"name": "x"})
    assert recipe.on_policy.ratio == 0 and not recipe.on_policy.active
    assert OnPolicy.for_recipe(recipe, None, Runtime.of("cpu", "fp32"), Collator(0), zero3=False) is None
    assert validate_recipe({"name": "x", "on_policy": {"top_k": None}}).on_policy.top_k == 0
    for bad, words in [
        ({"on_policy": {"ratio": 1.5}}, "on_policy.ratio"),
        ({"on_policy": {"ratio": 0.5}, "loss": {"kd_ratio": 0.0}}, "loss.kd_ratio"),
        ({"on_policy": {"schedule": "adaptive"}}, "train.eval_every"),
        ({"on_policy": {"schedule": "adaptive"}, "teacher": {"cache": "c"}}, "teacher.cache"),
    ]:
        with pytest.raises(Exception, match=words.replace(".", r"\.")):
            validate_recipe({"name": "x", **bad})


def test_cache_refusal_is_one_line_before_any_model_loads(tmp_path: Path, tiny_teacher: Path) -> None:
    teacher = unreadable_weights(tiny_teacher, tmp_path / "teacher")  # loading any weight would fail differently
    recipe = tiny_recipe(tmp_path, teacher, on_policy={"ratio": 0.5})
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**raw, "teacher": {**raw["teacher"], "cache": str(tmp_path / "cache")}}))
    line = error_line(runner.invoke(app, ["distill", str(recipe)]), "on_policy.ratio", "teacher.cache")
    assert "cannot" in line or "only holds" in line
    assert not (tmp_path / "runs").exists()


def test_plan_counts_the_sampling(tiny_teacher: Path) -> None:
    from kdcli.plan import plan_recipe

    base = {"name": "x", "teacher": {"model": str(tiny_teacher)}, "train": {"precision": "fp32", "batch_size": 2}}
    plain = plan_recipe(validate_recipe(base), world_size=1, device="cpu", memory=2**34)
    sampled = plan_recipe(
        validate_recipe({**base, "on_policy": {"ratio": 0.5, "max_new_tokens": 64}}), world_size=1, device="cpu"
    )
    assert plain.rows[0].generation == 0 and plain.settings.tokens == 2 * 256
    row, student = sampled.rows[0], sampled.student
    assert sampled.settings.tokens == 2 * (256 + 64)  # a sampled batch trains on prompt + sample
    kv_cache = 2 * student.layers * 2 * (256 + 64) * student.kv_dim * 4
    assert kv_cache < row.generation and row.activations > plain.rows[0].activations
    assert row.total >= row.states.device + row.generation


# --- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_sampled(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> tuple[Path, list[tuple]]:
    """Ratio 1 in one process, recording every window before and after sampling, and each objective call."""
    tmp_path = tmp_path_factory.mktemp("ratio-one")
    seen: list[tuple] = []
    calls: list[bool] = []
    original_window = OnPolicy.window

    def window(self: OnPolicy, model: Any, batches: list, *args: Any) -> Any:
        out = original_window(self, model, batches, *args)
        seen.append((batches, out))
        return out

    from kdcli.engine.objective import Objective

    original_call = Objective.__call__

    def call(self: Objective, *args: Any, with_ce: bool = True, **kwargs: Any) -> Any:
        calls.append(with_ce)
        return original_call(self, *args, with_ce=with_ce, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OnPolicy, "window", window)
        mp.setattr(Objective, "__call__", call)
        run_dir = distill(tmp_path, tiny_teacher, **with_(FAST, on_policy={"ratio": 1.0}))
    assert len(calls) >= 12  # the evals call the objective too (with CE, on the data)
    assert calls.count(False) == 12
    return run_dir, seen


def test_ratio_one_samples_every_micro_batch_and_masks_the_prompt(all_sampled: tuple[Path, list[tuple]]) -> None:
    run_dir, seen = all_sampled
    rows = steps_of(run_dir)
    assert len(rows) == 6 and all(r["gen_tokens"] > 0 and r["ce"] == 0.0 and r["on_policy_ratio"] == 1.0 for r in rows)
    assert len(seen) == 6
    for before, (after, sampled, tokens, seconds) in seen:
        assert sampled == [True, True] and tokens > 0 and seconds > 0
        for data, batch in zip(before, after, strict=True):
            prompts = prompts_of(data)
            assert prompts_of(batch) == prompts
            for row, prompt in enumerate(prompts):
                length = int(batch["attention_mask"][row].sum())
                ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
                assert ids[: len(prompt)] == prompt
                assert labels[: len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)
                assert labels[len(prompt) - 1 : length - 1] == ids[len(prompt) : length]  # every sampled token
                assert 1 <= length - len(prompt) <= 8
    run = json.loads((run_dir / "run.json").read_text())
    assert run["gen_tokens"] == sum(r["gen_tokens"] for r in rows) and run["gen_seconds"] > 0


def test_ratio_zero_is_the_plain_run_bit_for_bit(tmp_path: Path, tiny_teacher: Path) -> None:
    # Dropout in the student: any extra draw from torch's RNG would change the losses.
    sections = with_(FAST, student={"init": "random", "overrides": {"num_hidden_layers": 2, "attention_dropout": 0.2}})
    plain = distill(tmp_path / "plain", tiny_teacher, **sections)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ratio 0 must not sample")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TransformersSampler, "sample", refuse)
        zero = distill(tmp_path / "zero", tiny_teacher, **with_(sections, on_policy={"ratio": 0.0, "temperature": 0.5}))
    strip = [{k: v for k, v in row.items() if k not in TIMING} for row in metrics(plain)]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING} for row in metrics(zero)]
    assert all(row["gen_tokens"] == 0 and row["gen_s"] == 0.0 for row in steps_of(zero))
    assert "on_policy_ratio" not in steps_of(zero)[0]


def test_sigkill_then_resume_at_half_is_exact(tmp_path: Path, tiny_teacher: Path) -> None:
    sections = with_(FAST, train={"max_steps": 9, "save_every": 3}, on_policy={"ratio": 0.5})
    reference = steps_of(distill(tmp_path / "reference", tiny_teacher, **sections))
    # Mixed windows (a sampled slot and a data slot): CE from the data's, tokens from the sample.
    draws = [[draws_on_policy(0, step, slot, 0.5) for slot in range(2)] for step in range(1, 10)]
    assert [row["gen_tokens"] > 0 for row in reference] == [any(d) for d in draws]
    assert [row["ce"] > 0 for row in reference] == [not all(d) for d in draws]
    assert any(all(d) for d in draws) and any(any(d) and not all(d) for d in draws)

    recipe = tiny_recipe(tmp_path / "killed", tiny_teacher, **sections)
    run_dir = tmp_path / "killed" / "runs" / "tiny"
    process = start_kd(["distill", str(recipe)], tmp_path)
    wait_for(run_dir / "checkpoints" / "step-00000003" / "kd-state.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "run.json").exists(), "the run finished before it could be killed"
    result = run_kd(["distill", "--resume", str(run_dir)], tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = steps_of(run_dir)
    for key in ("step", "loss", "kd", "ce", "grad_norm", "gen_tokens", "on_policy_ratio"):
        assert [row[key] for row in resumed] == [row[key] for row in reference], key


def test_adaptive_schedule_end_to_end(tmp_path: Path, tiny_teacher: Path) -> None:
    """A rising eval loss (scores replaced by a climbing number) raises the ratio at each eval; the checkpoint
    keeps it."""
    from kdcli.engine.loop import Session

    scores = iter(range(100))

    def rising(self: Session) -> dict[str, float]:
        return {"eval_loss": float(next(scores)), "eval_ce": 0.0, "eval_kd": 0.0, "eval_tokens": 1}

    sections = with_(
        FAST,
        train={"max_steps": 4, "eval_every": 1, "save_every": 2},
        on_policy={"ratio": 0.0, "schedule": "adaptive", "adaptive_step": 0.5},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Session, "score", rising)
        run_dir = distill(tmp_path, tiny_teacher, **sections)
    rows = steps_of(run_dir)
    assert [r["on_policy_ratio"] for r in rows] == [0.0, 0.5, 1.0, 1.0]
    assert rows[0]["gen_tokens"] == 0 and rows[3]["gen_tokens"] > 0 and rows[2]["gen_tokens"] > 0
    checkpoint = latest_checkpoint(RunFolder(run_dir))
    assert checkpoint is not None and read_state(checkpoint)["on_policy_ratio"] == 1.0


def test_compare_shows_generation(tmp_path: Path) -> None:
    from compare_fixtures import make_run

    from kdcli.compare import compare_runs, load_runs

    plain, mixed = make_run(tmp_path, "plain"), make_run(tmp_path, "mixed")
    for path, tokens in ((plain, 0), (mixed, 4096)):
        run = json.loads((path / "run.json").read_text())
        (path / "run.json").write_text(json.dumps({**run, "gen_tokens": tokens, "gen_seconds": tokens / 1000}))
    rows = {row.key: row for row in compare_runs(load_runs([plain, mixed]), resamples=50).training}
    assert rows["gen_tokens"].values == {"plain": 0, "mixed": 4096}
    assert rows["gen_seconds"].values["mixed"] == pytest.approx(4.096)
    alone = {row.key for row in compare_runs(load_runs([plain]), resamples=50).training}
    assert "gen_tokens" not in alone  # nothing sampled: no generation rows


@pytest.fixture(scope="module")
def eager_eos(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """The tiny teacher made to sample EOS about one token in three, so that samples (and the ranks' generate
    loops) end after different numbers of tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tokenizer = load_tokenizer(str(tiny_teacher))
    with torch.no_grad():
        for layer in model.model.layers:  # hidden unit 0 is then the input embedding's, 1 for every token but EOS
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0  # so the logits are unit 0 (about 8 after the norm) times E[:, 0]
        embeddings = model.model.embed_tokens.weight  # tied: also the output layer
        embeddings[:, 0] = 1.0
        embeddings[tokenizer.eos_token_id, 0] = 1.67  # EOS about 8 x 0.67 above every other token's logit
    path = tmp_path_factory.mktemp("eager-eos")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_zero3_two_processes_sample_in_step(tmp_path: Path, eager_eos: Path) -> None:
    """Ratio 1 under ZeRO-3 on two processes: each sampled token's forward gathers the sharded weights, so a rank
    whose samples all ended keeps stepping until the other's have (`synced_gpus`; without it this run hangs). The
    run follows the one-process run with the same global batch: same prompts, same seeds, same samples."""
    sections = with_(FAST, train={"max_steps": 4}, on_policy={"ratio": 1.0})
    reference = steps_of(distill(tmp_path / "one", eager_eos, **sections))
    lengths = [r["gen_tokens"] for r in reference]
    assert all(0 < n < 2 * 4 * 8 for n in lengths)  # samples end at EOS, before max_new_tokens
    # Shard every weight: by default ZeRO-3 keeps parameters this small whole on every rank, with nothing to gather.
    raw = tmp_path / "zero3.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    zero3 = {"zero_stage": 3, "config": str(raw)}
    recipe = tiny_recipe(tmp_path / "two", eager_eos, **with_(sections, train={"grad_accum": 1}, deepspeed=zero3))
    result = run_kd(["distill", str(recipe), "--nproc", "2"], tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    rows = steps_of(tmp_path / "two" / "runs" / "tiny")
    assert [r["gen_tokens"] for r in rows] == lengths
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, reference, strict=True)) < 1e-5
