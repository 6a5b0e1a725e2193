"""Data pipeline: sources, field mapping, prompt rendering, response-only labels, truncation and batching."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# conftest sets these too; repeated so this module stays offline however it is run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kdcli.data import (
    IGNORE_INDEX,
    Collator,
    Examples,
    build_examples,
    format_prompt,
    load_examples,
    load_rows,
    micro_batches,
    prompt_and_reference,
    resolve_fields,
    tokenize_example,
)
from kdcli.errors import KdError
from kdcli.recipe.schema import DataConfig, DataFields

REPO = Path(__file__).resolve().parent.parent
STARTER = REPO / "kdcli" / "data" / "starter"

DOLLY = [
    {"instruction": "Name a color.", "context": "", "response": "Blue.", "category": "open_qa"},
    {"instruction": "Summarize.", "context": "The fox jumps.", "response": "A fox jumped.", "category": "summ"},
]
MINILLM = [{"prompt": "Name a color.", "output": "Blue."}, {"prompt": "Say hi.", "output": "Hi!"}]
ALPACA = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Summarize.", "input": "The fox jumps.", "output": "A fox jumped."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


def error_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(KdError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix in (".csv", ".tsv"):
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise AssertionError(suffix)
    return path


# --- sources -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ".tsv"])
def test_each_file_type_loads(tmp_path: Path, suffix: str) -> None:
    rows = [
        {"instruction": "Add 2 and 2, then say why.", "context": "", "response": "4, because 2+2=4."},
        {"instruction": 'Quote "this", please', "context": "a,b\tc", "response": "ok"},
    ]
    path = write_rows(tmp_path / f"train{suffix}", rows)
    assert load_rows(str(path), "train", "data.train") == rows


def test_json_variants(tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": DOLLY}), encoding="utf-8")
    assert load_rows(str(wrapped), "train", "data.train") == DOLLY
    lines = tmp_path / "lines.json"  # JSON lines saved as .json
    lines.write_text("\n".join(json.dumps(r) for r in DOLLY), encoding="utf-8")
    assert load_rows(str(lines), "train", "data.train") == DOLLY
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\ufeff" + json.dumps(DOLLY[0]) + "\n\n", encoding="utf-8")
    assert load_rows(str(bom), "train", "data.train") == DOLLY[:1]


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(DOLLY[0]) + "\n\n" + '{"instruction": "x", "response": }\n', encoding="utf-8")
    message = error_of(load_rows, str(path), "train", "data.train")
    assert message.startswith("data.train: train.jsonl line 3 is not valid JSON")
    path.write_text('["a list"]\n', encoding="utf-8")
    assert "line 1 is a JSON list, not an object" in error_of(load_rows, str(path), "train", "data.train")


def test_file_errors_name_key_file_and_fix(tmp_path: Path) -> None:
    missing = error_of(load_rows, "missing.jsonl", "train", "data.train")
    assert missing.startswith("data.train: no such file 'missing.jsonl'")
    assert "no such file './data/x'" in error_of(load_rows, "./data/x", "eval", "data.eval")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert error_of(load_rows, str(empty), "train", "data.train") == (
        "data.train: 'empty.jsonl' has no rows. Point data.train at a file with examples."
    )
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    message = error_of(load_rows, str(text), "train", "data.train")
    assert "unsupported file type '.txt'" in message and ".jsonl" in message and ".parquet" in message
    assert "is a folder" in error_of(load_rows, str(tmp_path), "train", "data.train")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"a": 1},\n {"a": 2,}]', encoding="utf-8")
    assert "bad.json is not valid JSON" in error_of(load_rows, str(bad_json), "train", "data.train")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet")
    assert "not a readable Parquet file" in error_of(load_rows, str(bad_parquet), "train", "data.train")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"instruction": "caf\u00e9"}'.encode("latin-1"))
    assert "not UTF-8" in error_of(load_rows, str(latin), "train", "data.train")


def test_csv_keeps_text_and_reports_ragged_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("instruction,response\nHow many?,007\nOops,a,b\n", encoding="utf-8")
    message = error_of(load_rows, str(path), "train", "data.train")
    assert "train.csv line 3 has 1 more cell(s)" in message
    path.write_text("instruction,response\nHow many?,007\n", encoding="utf-8")
    assert load_rows(str(path), "train", "data.train") == [{"instruction": "How many?", "response": "007"}]


def test_unknown_builtin_suggests(tmp_path: Path) -> None:
    message = error_of(load_rows, "builtin:starer", "train", "data.train")
    assert message.startswith("data.train: unknown builtin data set 'builtin:starer'.")
    assert "Did you mean 'starter'?" in message and "builtin:starter" in message


def test_builtin_starter_loads_both_splits() -> None:
    if not (STARTER / "train.jsonl").is_file() or not (STARTER / "eval.jsonl").is_file():
        pytest.skip("kdcli/data/starter/{train,eval}.jsonl are not written yet (another change adds them)")
    train = load_rows("builtin:starter", "train", "data.train")
    held_out = load_rows("builtin:starter", "eval", "data.eval")
    assert train and held_out
    for row in train[:50] + held_out[:50]:
        assert {"id", "instruction", "context", "response"} <= set(row)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held_out), "eval rows must be held out"
    assert load_rows("builtin:starter:eval", "train", "data.train") == held_out


def test_hub_id_offline_error() -> None:
    message = error_of(load_rows, "kd-test/does-not-exist", "train", "data.train")
    assert message.startswith(
        "data.train: could not load dataset 'kd-test/does-not-exist' "
        "(not a local file and not in the Hugging Face cache; this machine is offline)"
    )


def test_hub_split_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fake(splits: list[str]) -> Any:
        return datasets.DatasetDict({s: datasets.Dataset.from_list([{"prompt": s, "output": "x"}]) for s in splits})

    calls: list[tuple[str, str | None]] = []

    def load_dataset(name: str, split: str | None = None) -> Any:
        calls.append((name, split))
        loaded = fake(["train", "validation"])
        return loaded[split] if split else loaded

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_rows("org/name", "train", "data.train")[0]["prompt"] == "train"
    assert load_rows("org/name", "eval", "data.eval")[0]["prompt"] == "validation"
    assert load_rows("org/name:train", "eval", "data.eval")[0]["prompt"] == "train"
    assert calls[-1] == ("org/name", "train")

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None: fake(["train"]))
    message = error_of(load_rows, "org/name", "eval", "data.eval")
    assert "has no 'test' or 'validation'" in message and "org/name:train" in message


# --- fields --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (DOLLY, ("instruction", "context", "response")),
        (MINILLM, ("prompt", None, "output")),
        (ALPACA, ("instruction", "input", "output")),
        ([{"Question": "q", "Answer": "a"}], ("Question", None, "Answer")),
    ],
    ids=["dolly", "minillm", "alpaca", "case-insensitive"],
)
def test_fields_are_detected(rows: list[dict[str, Any]], expected: tuple[str | None, ...]) -> None:
    fmap = resolve_fields(list(rows[0]), DataFields(), "data.train", "train.jsonl")
    assert (fmap.prompt, fmap.context, fmap.response) == expected


@pytest.mark.parametrize("rows", [DOLLY, ALPACA], ids=["dolly", "alpaca"])
def test_context_reaches_the_prompt(tokenizer: Any, rows: list[dict[str, Any]]) -> None:
    examples = build_examples(rows, tokenizer, DataConfig(), "train", "data.train")
    text = tokenizer.decode(examples.input_ids[1])
    assert "Summarize.\n\nThe fox jumps." in text and text.endswith("A fox jumped.<|im_end|>")
    assert "Name a color.<|im_end|>" in tokenizer.decode(examples.input_ids[0]), "empty context adds nothing"


def test_fields_override(tokenizer: Any) -> None:
    rows = [{"q": "Why?", "input": "ignored", "a": "Because.", "output": "not this"}]
    cfg = DataConfig(fields=DataFields(prompt="q", response="a", context=""))
    ((prompt, reference),) = prompt_and_reference(rows, tokenizer, cfg)
    assert reference == "Because." and "Why?<|im_end|>" in prompt and "ignored" not in prompt
    # An explicit column is never also auto-detected for another role.
    fmap = resolve_fields(["input", "output"], DataFields(prompt="input"), "data.train", "t.jsonl")
    assert (fmap.prompt, fmap.context, fmap.response) == ("input", None, "output")


def test_missing_column_lists_columns(tokenizer: Any) -> None:
    cfg = DataConfig(train="train.jsonl")
    message = error_of(build_examples, [{"q": "x", "a": "y"}], tokenizer, cfg, "train", "data.train")
    assert message.startswith("data.train: no prompt column in train.jsonl (columns: q, a). Set data.fields.prompt")
    message = error_of(build_examples, [{"question": "x", "a": "y"}], tokenizer, cfg, "train", "data.train")
    assert message.startswith("data.train: no response column in train.jsonl (columns: question, a).")
    assert "Set data.fields.response" in message
    cfg = DataConfig(train="train.jsonl", fields=DataFields(response="anser"))
    message = error_of(build_examples, [{"question": "x", "answers": "y"}], tokenizer, cfg, "train", "data.train")
    assert "column 'anser' (data.fields.response) is not in train.jsonl" in message
    assert "Did you mean 'answers'?" in message


def test_non_text_cell_is_an_error(tokenizer: Any) -> None:
    rows = [{"question": "x", "answer": {"text": ["y"]}}]
    message = error_of(build_examples, rows, tokenizer, DataConfig(), "train", "data.train")
    assert "row 1: 'answer' holds an object" in message


# --- prompts -------------------------------------------------------------------------------------------------


def test_chat_template_with_system_prompt(tokenizer: Any) -> None:
    cfg = DataConfig(system_prompt="Be brief.")
    text = format_prompt({"prompt": "Hi?", "context": "ctx"}, tokenizer, cfg)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?\n\nctx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_chat_template_is_an_error(tokenizer: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    message = error_of(format_prompt, {"prompt": "x"}, bare, DataConfig())
    assert message.startswith("data.template: the tokenizer has no chat template") and "to a string" in message


def test_template_string(tokenizer: Any) -> None:
    cfg = DataConfig(template="### Instruction:\n{prompt}\n\n### Input:\n{context}\n\n### Response:\n")
    assert format_prompt({"prompt": "P", "context": "C"}, tokenizer, cfg) == (
        "### Instruction:\nP\n\n### Input:\nC\n\n### Response:\n"
    )
    # Without {context}, the context follows the prompt rather than vanishing.
    cfg = DataConfig(template="Q: {prompt}\nA:")
    assert format_prompt({"prompt": "P", "context": "C"}, tokenizer, cfg) == "Q: P\n\nC\nA:"
    assert format_prompt({"prompt": "P", "context": ""}, tokenizer, cfg) == "Q: P\nA:"
    cfg = DataConfig(template="{system}\nQ: {prompt}\nA: {{json}}", system_prompt="S")
    assert format_prompt({"prompt": "P"}, tokenizer, cfg) == "S\nQ: P\nA: {json}"


def test_template_string_errors(tokenizer: Any) -> None:
    message = error_of(format_prompt, {"prompt": "P"}, tokenizer, DataConfig(template="{prompt} {contxt}"))
    assert "unknown placeholder {contxt}" in message and "Did you mean 'context'?" in message
    assert "literal braces" in error_of(format_prompt, {"prompt": "P"}, tokenizer, DataConfig(template="{prompt} {"))
    cfg = DataConfig(template="Q: {prompt}", system_prompt="S")
    assert "no {system} placeholder" in error_of(format_prompt, {"prompt": "P"}, tokenizer, cfg)


# --- tokens and labels ---------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_response(tokenizer: Any) -> None:
    prompt = format_prompt({"prompt": "Name a color."}, tokenizer, DataConfig())
    example = tokenize_example(prompt, "Blue, like the sky.", tokenizer, max_length=256)
    assert example is not None
    ids, labels, n_prompt = example["input_ids"], example["labels"], example["prompt_length"]
    assert ids[:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == prompt.count(tokenizer.bos_token), "no extra BOS"
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert labels[-1] == ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == "Blue, like the sky."
    assert tokenize_example(prompt, "", tokenizer, 256) is None


def test_bos_added_once_for_tokenizers_that_add_it(tokenizer: Any) -> None:
    from tokenizers import processors
    from transformers import AutoTokenizer

    llama_like = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bos = llama_like.bos_token_id
    llama_like.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{llama_like.bos_token} $A", special_tokens=[(llama_like.bos_token, bos)]
    )
    assert llama_like("hi")["input_ids"][0] == bos
    plain = tokenize_example("Q: hi\nA:", "ok", llama_like, 64)
    assert plain is not None and plain["input_ids"][0] == bos and plain["input_ids"][1] != bos
    written = tokenize_example(llama_like.bos_token + "Q: hi\nA:", "ok", llama_like, 64)
    assert written is not None and written["input_ids"] == plain["input_ids"], "a BOS the template wrote is kept once"
    # Left truncation keeps that BOS first.
    long = tokenize_example("Q: " + "word " * 100 + "\nA:", "ok", llama_like, 16)
    assert long is not None and long["prompt_truncated"]
    assert long["input_ids"][0] == bos and len(long["input_ids"]) == 16


def test_truncation(tokenizer: Any) -> None:
    prompt = format_prompt({"prompt": "Tell me a story."}, tokenizer, DataConfig())
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response = "the quick brown fox jumps over the lazy dog " * 20
    n_prompt = len(prompt_ids)

    fits = tokenize_example(prompt, "ok", tokenizer, 256)
    assert fits is not None and not fits["truncated"]

    # Room for the prompt: it stays whole, the response is cut to fill max_length, and a cut response has no EOS.
    max_length = n_prompt + 10
    cut = tokenize_example(prompt, response, tokenizer, max_length)
    assert cut is not None and cut["truncated"] and not cut["prompt_truncated"]
    assert len(cut["input_ids"]) == max_length and cut["input_ids"][:n_prompt] == prompt_ids
    assert cut["labels"][-1] != tokenizer.eos_token_id

    # The prompt alone leaves < max_length // 4 tokens: it loses its beginning, keeps its end.
    long_prompt = format_prompt({"prompt": "story " * 200}, tokenizer, DataConfig())
    long_ids = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    for max_length in (8, 33, 64):
        example = tokenize_example(long_prompt, response, tokenizer, max_length)
        assert example is not None and example["prompt_truncated"]
        assert len(example["input_ids"]) == max_length
        kept = example["prompt_length"]
        assert example["input_ids"][:kept] == long_ids[-kept:], "the generation prompt at the end survives"
        assert max_length - kept == max_length // 4

    # A short response needs only its own length; the prompt keeps the rest.
    short = tokenize_example(long_prompt, "ok", tokenizer, 64)
    assert short is not None and short["labels"][-1] == tokenizer.eos_token_id
    assert len(short["input_ids"]) == 64 and 64 - short["prompt_length"] < 64 // 4


def test_build_examples_counts_and_limits(tokenizer: Any) -> None:
    rows = [
        {"instruction": "a", "response": ""},
        {"instruction": "b", "response": "fine"},
        {"instruction": "c", "response": "   "},
        {"instruction": "d " * 300, "response": "ok"},
        {"instruction": "e", "response": "yes"},
    ]
    examples = build_examples(rows, tokenizer, DataConfig(max_length=32), "train", "data.train")
    assert isinstance(examples, Examples) and len(examples) == 3
    assert (examples.n_rows, examples.n_dropped, examples.n_truncated, examples.n_prompt_truncated) == (5, 2, 1, 1)
    assert examples.tokens == sum(map(len, examples.input_ids))
    assert examples.response_tokens == sum(label != IGNORE_INDEX for row in examples.labels for label in row)
    assert all(len(ids) <= 32 for ids in examples.input_ids)
    assert "3 examples" in examples.summary()
    assert examples.stats()["examples"] == 3 and examples.stats()["dropped"] == 2
    json.dumps(examples.stats())  # goes into the run record
    assert examples[1:] == [examples[1], examples[2]] and examples[-1]["input_ids"] == examples.input_ids[2]

    limited = build_examples(rows, tokenizer, DataConfig(max_train_examples=2), "train", "data.train")
    assert len(limited) == 2 and limited.n_rows == 4, "dropped rows do not use up max_train_examples"
    cfg = DataConfig(max_eval_examples=1)
    assert len(build_examples(rows, tokenizer, cfg, "eval", "data.eval")) == 1
    pairs = prompt_and_reference(rows, tokenizer, cfg)
    assert [ref for _, ref in pairs] == ["fine"]
    assert tokenizer.decode(build_examples(rows, tokenizer, cfg, "eval", "data.eval").input_ids[0]).startswith(
        pairs[0][0]
    )

    message = error_of(build_examples, rows[:1], tokenizer, DataConfig(train="t.jsonl"), "train", "data.train")
    assert message.startswith("data.train: no usable examples in t.jsonl")


def test_load_examples_from_file(tmp_path: Path, tokenizer: Any) -> None:
    path = write_rows(tmp_path / "mine.parquet", ALPACA)
    cfg = DataConfig(train=str(path), eval=None)
    examples = load_examples(cfg, tokenizer, "train")
    assert examples is not None and len(examples) == 2 and examples.source == "mine.parquet"
    assert load_examples(cfg, tokenizer, "eval") is None


# --- batches -------------------------------------------------------------------------------------------------


def test_collator_pads_and_shifts(tokenizer: Any) -> None:
    rows = [*DOLLY, {"instruction": "Say hi.", "response": "Hi!"}]
    examples = build_examples(rows, tokenizer, DataConfig(), "train", "data.train")
    collator = Collator.for_tokenizer(tokenizer)
    batch = collator([examples[i] for i in range(len(examples))])
    lengths = [len(ids) for ids in examples.input_ids]
    width = max(lengths)
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == dict.fromkeys(("input_ids", "attention_mask", "labels"), (3, width))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b, (ids, raw) in enumerate(zip(examples.input_ids, examples.labels, strict=True)):
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids
        assert batch["input_ids"][b, n:].eq(tokenizer.pad_token_id).all()
        labels = batch["labels"][b].tolist()
        for t in range(width):
            is_target = t + 1 < n and raw[t + 1] != IGNORE_INDEX
            assert labels[t] == (ids[t + 1] if is_target else IGNORE_INDEX), (b, t)
        # The last real position predicts nothing; the one before it predicts EOS.
        assert labels[n - 1] == IGNORE_INDEX and labels[n - 2] == tokenizer.eos_token_id

    padded = Collator(None, pad_to_multiple_of=8)(examples[:1])  # no pad token (Llama): pads with 0, masked
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"][0, -1] == 0
    assert padded["attention_mask"][0, -1] == 0 and padded["labels"][0, -1] == IGNORE_INDEX


def test_shifted_labels_match_the_model_loss(tiny_teacher: Path, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    as_dolly = [{"instruction": r["instruction"], "context": r["input"], "response": r["output"]} for r in ALPACA]
    examples = build_examples(DOLLY + as_dolly, tokenizer, DataConfig(), "train", "data.train")
    batch = Collator.for_tokenizer(tokenizer)(list(examples))
    unshifted = torch.full_like(batch["labels"], IGNORE_INDEX)
    for b, raw in enumerate(examples.labels):
        unshifted[b, : len(raw)] = torch.tensor(raw)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=unshifted)
    ours = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(ours, out.loss)


def test_batch_order_is_seeded_and_resumable() -> None:
    examples = [{"input_ids": [i, i + 1], "labels": [IGNORE_INDEX, i + 1]} for i in range(5)]

    def firsts(stream, n):  # type: ignore[no-untyped-def]
        return [[int(x) for x in next(stream)["input_ids"][:, 0]] for _ in range(n)]

    epoch = firsts(micro_batches(examples, Collator(0), 2, seed=3), 3)
    assert [len(b) for b in epoch] == [2, 2, 1] and sorted(i for b in epoch for i in b) == list(range(5))
    assert epoch == firsts(micro_batches(examples, Collator(0), 2, seed=3), 3)
    assert epoch != firsts(micro_batches(examples, Collator(0), 2, seed=4), 3)
    six = firsts(micro_batches(examples, Collator(0), 2, seed=3), 6)
    assert six[3:] != six[:3] and sorted(i for b in six[3:] for i in b) == list(range(5))  # a new epoch, reshuffled
    assert firsts(micro_batches(examples, Collator(0), 2, seed=3, start=4), 2) == six[4:6]  # resumes mid-stream
    ranks = [firsts(micro_batches(examples, Collator(0), 2, seed=3, rank=r, world_size=2), 2) for r in (0, 1)]
    assert [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]] == six[:4]  # ranks interleave one stream


def test_batches_grouped_by_length_pad_less_and_keep_every_example_once() -> None:
    import random

    from kdcli.data.collate import LENGTH_GROUP_STEPS, epoch_batches

    lengths = [random.Random(i).randint(5, 200) for i in range(283)]
    size = 4
    plain = epoch_batches(len(lengths), size, seed=1, epoch=0)
    grouped = epoch_batches(len(lengths), size, seed=1, epoch=0, lengths=lengths)
    assert len(grouped) == len(plain) == -(-283 // size)
    assert sorted(i for b in grouped for i in b) == list(range(283))
    assert [len(b) for b in grouped] == [len(b) for b in plain] == [4] * 70 + [3]  # the short batch last, as without

    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    # Each stretch of the permutation, sorted by length and cut: exactly the grouped batches.
    expected = set()
    for k in range(0, len(plain), LENGTH_GROUP_STEPS):
        stretch = [i for b in plain[k : k + LENGTH_GROUP_STEPS] for i in b]
        ordered = sorted(stretch, key=lambda i: lengths[i], reverse=True)
        expected |= {frozenset(ordered[j : j + size]) for j in range(0, len(ordered), size)}
    assert {frozenset(b) for b in grouped} == expected
    assert padded(grouped) < 0.8 * padded(plain), (padded(grouped), padded(plain))
    assert grouped == epoch_batches(len(lengths), size, seed=1, epoch=0, lengths=lengths)
    assert grouped != epoch_batches(len(lengths), size, seed=1, epoch=1, lengths=lengths)
    # Batch order is shuffled, not longest first.
    tops = [max(lengths[i] for i in b) for b in grouped]
    assert tops != sorted(tops, reverse=True)
    # A step holds the same examples as one batch of 8 or as two accumulated batches of 4.
    eights = epoch_batches(len(lengths), 8, seed=1, epoch=0, lengths=lengths)
    fours = epoch_batches(len(lengths), 4, seed=1, epoch=0, lengths=lengths, per_step=2)
    assert [sorted(b) for b in eights] == [sorted(fours[k] + fours[k + 1]) for k in range(0, 70, 2)] + [
        sorted(fours[70])
    ]


def test_grouped_stream_resumes_and_ranks_interleave() -> None:
    examples = [{"input_ids": list(range(n)), "labels": [IGNORE_INDEX] * n} for n in (3, 9, 4, 8, 2, 7, 5, 6, 1)]

    def widths(stream, n):  # type: ignore[no-untyped-def]
        return [sorted(int(m) for m in next(stream)["attention_mask"].sum(1)) for _ in range(n)]

    # One process accumulating 2 micro-batches a step: the stream two processes share.
    six = widths(micro_batches(examples, Collator(0), 2, seed=3, grad_accum=2, group_by_length=True), 6)
    assert sorted(n for b in six[:5] for n in b) == list(range(1, 10))  # one epoch: every example once
    resumed = micro_batches(examples, Collator(0), 2, seed=3, start=4, grad_accum=2, group_by_length=True)
    assert widths(resumed, 2) == six[4:6]
    ranks = [widths(micro_batches(examples, Collator(0), 2, seed=3, rank=r, world_size=2, group_by_length=True), 2)
             for r in (0, 1)]  # fmt: skip
    assert [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]] == six[:4]
    # 9 examples fit one stretch: batches hold neighbours in length.
    assert all(b[-1] - b[0] <= 1 for b in six[:5] if len(b) == 2)


def test_by_length_orders_indices_shortest_first() -> None:
    from kdcli.data import by_length

    examples = [{"input_ids": [0] * n, "labels": [0] * n} for n in (5, 2, 9, 2)]
    assert by_length(examples) == [1, 3, 0, 2]


def test_import_does_not_load_torch() -> None:
    code = "import sys, kdcli.data; assert 'torch' not in sys.modules, 'torch'; kdcli.data.Collator"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
