"""kdcli.models' generation service and forward pass: in memory and on file alike, text and token-id prompts alike,
the context cut from the left, the model's mode kept, and `logits_of` as the engine and the cache call it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcli.hardware import Runtime
from kdcli.models import (
    GenerationSettings,
    encode_prompts,
    generate,
    generate_file,
    load_tokenizer,
    logits_of,
    read_generations,
)
from kdcli.models.generation import max_prompt_tokens, prompt_token_ids


@pytest.fixture(scope="module")
def tiny(tiny_teacher: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    return model, load_tokenizer(str(tiny_teacher))


def prompts_for(tokenizer, n: int) -> list[str]:
    from kdcli.data import format_prompt, load_rows
    from kdcli.recipe import DataConfig

    rows = load_rows("builtin:starter", "eval", "t")[:n]
    return [format_prompt({"prompt": r["instruction"], "context": ""}, tokenizer, DataConfig()) for r in rows]


# --- generation ----------------------------------------------------------------------------------------------------


def test_in_memory_equals_the_file_pass(tmp_path: Path, tiny) -> None:
    model, tokenizer = tiny
    prompts = prompts_for(tokenizer, 5)
    settings = GenerationSettings(max_new_tokens=6)
    generated = generate(model, tokenizer, prompts, settings, seed=7, batch_size=2)
    stats = generate_file(model, tokenizer, prompts, settings, 7, tmp_path / "p.jsonl", batch_size=2)
    rows = read_generations(tmp_path / "p.jsonl")
    assert [g.text for g in generated] == [r["response"] for r in rows]
    assert [len(g.ids) for g in generated] == [r["tokens"] for r in rows]
    assert [g.stopped for g in generated] == [r["stopped"] for r in rows]
    assert stats["tokens"] == sum(g.generated for g in generated)
    # Without fields a row holds the prompt it answers, in prompt order.
    assert [set(r) for r in rows] == [{"index", "prompt", "response", "tokens", "stopped"}] * 5
    assert [r["prompt"] for r in rows] == prompts and [r["index"] for r in rows] == list(range(5))
    assert all(tokenizer.decode(g.ids, skip_special_tokens=True).strip() == g.text for g in generated)


def test_same_seed_same_responses_and_the_batch_is_what_is_seeded(tiny) -> None:
    model, tokenizer = tiny
    prompts = prompts_for(tokenizer, 4)
    settings = GenerationSettings(max_new_tokens=6)
    first = generate(model, tokenizer, prompts, settings, seed=3, batch_size=2)
    torch.manual_seed(12345)  # what ran before must not matter: each batch reseeds
    assert generate(model, tokenizer, prompts, settings, seed=3, batch_size=2) == first
    assert generate(model, tokenizer, prompts, settings, seed=4, batch_size=2) != first


def test_token_id_prompts_equal_text_prompts(tiny) -> None:
    model, tokenizer = tiny
    prompts = prompts_for(tokenizer, 4)
    settings = GenerationSettings(max_new_tokens=5, greedy=True)
    ids = encode_prompts(tokenizer, prompts, None)
    assert generate(model, tokenizer, ids, settings, batch_size=3) == generate(
        model, tokenizer, prompts, settings, batch_size=3
    )
    with pytest.raises(TypeError, match="not a mix"):
        generate(model, tokenizer, [prompts[0], ids[1]], settings)


def test_long_prompts_are_cut_from_the_left(tiny) -> None:
    model, tokenizer = tiny
    context = model.config.max_position_embeddings
    assert max_prompt_tokens(model, 8) == context - 8 and max_prompt_tokens(model, context) is None
    long = [10 + i % 400 for i in range(context + 20)]
    (cut,) = prompt_token_ids(tokenizer, [long], context - 8)
    assert cut == long[-(context - 8) :]  # the end of a prompt is what the response follows
    settings = GenerationSettings(max_new_tokens=8, greedy=True)
    (out,) = generate(model, tokenizer, [long], settings)
    assert len(out.ids) <= 8


def test_the_model_mode_is_given_back(tiny) -> None:
    model, tokenizer = tiny
    model.train()
    try:
        generate(model, tokenizer, prompts_for(tokenizer, 2), GenerationSettings(max_new_tokens=2, greedy=True))
        assert model.training  # a student generating on-policy goes on training
    finally:
        model.eval()


def test_file_pass_writes_the_callers_fields_in_order(tmp_path: Path, tiny) -> None:
    model, tokenizer = tiny
    prompts = prompts_for(tokenizer, 3)
    fields = [{"instruction": f"q{i}", "prompt": p, "reference": ["a", "b"]} for i, p in enumerate(prompts)]
    path, settings = tmp_path / "f.jsonl", GenerationSettings(max_new_tokens=3, greedy=True)
    generate_file(model, tokenizer, prompts, settings, None, path, fields=fields)
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["index", "instruction", "prompt", "reference", "response", "tokens", "stopped"]
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        generate_file(model, tokenizer, prompts, GenerationSettings(), None, tmp_path / "g.jsonl", fields=fields[:2])


# --- the forward pass ----------------------------------------------------------------------------------------------


def test_logits_of_is_the_model_forward_sliced_to_width(tiny) -> None:
    model, tokenizer = tiny
    batch = tokenizer(["the quick brown fox", "a dog"], padding=True, return_tensors="pt")
    runtime = Runtime(torch.device("cpu"), "fp32")
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = logits_of(model, batch, runtime)
        narrow = logits_of(model, batch, runtime, 100)
    assert torch.equal(full, expected)
    assert narrow.shape == (*expected.shape[:2], 100) and torch.equal(narrow, expected[..., :100])


def test_logits_of_runs_under_the_runtime_autocast_and_keeps_gradients(tiny) -> None:
    model, tokenizer = tiny
    batch = dict(tokenizer(["the lazy dog"], return_tensors="pt"))
    bf16 = logits_of(model, batch, Runtime(torch.device("cpu"), "bf16"))
    assert bf16.dtype == torch.bfloat16  # fp32 weights, bf16 compute: the student's mixed precision
    before = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    try:
        logits = logits_of(model, batch, Runtime(torch.device("cpu"), "fp32"), 50)
        assert logits.requires_grad  # the student's forward back-propagates; no_grad is the teacher caller's
    finally:
        for param, flag in zip(model.parameters(), before, strict=True):
            param.requires_grad_(flag)
