"""kd eval's stop rate and its model-free baselines (`--baselines`), against values computed by hand on a toy set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval import kd_eval

from kdcli.evaluation import EvalItem, score_pass
from kdcli.evaluation.baselines import baseline_rows, frequent_words

# Reference words: [the sky is blue] [a cat is a pet] [hi there]: "a" and "is" twice, every other word once, and a
# median reference of 4 words.
TOY = [
    {"instruction": "name a color", "output": "The sky is blue."},
    {"instruction": "name a pet", "output": "A cat is a pet!"},
    {"instruction": "say hi", "output": "hi there"},
]


def items() -> list[EvalItem]:
    return [EvalItem(row["instruction"], f"<prompt {i}>", (row["output"],)) for i, row in enumerate(TOY)]


def test_stop_rate_is_the_share_of_answers_that_ended_at_eos() -> None:
    rows = [
        {"response": "a", "reference": "a", "tokens": 1, "stopped": stopped}
        for stopped in ("eos", "max_new_tokens", "eos", "eos")
    ]
    assert score_pass(rows)["stop_rate"] == 0.75
    assert "stop_rate" not in score_pass([{**row, "stopped": None} for row in rows])  # nothing generated


def test_frequent_words_by_hand() -> None:
    # Most frequent first ("a", "is": 2 each, alphabetical), then the words seen once, alphabetically; 4 of them.
    assert frequent_words(items()) == "a is blue cat"
    # An even count takes the lower middle length: references of 1 and 3 words give 1 word.
    two = [EvalItem("x", "x", ("b b",)), EvalItem("y", "y", ("a",))]
    assert frequent_words(two) == "b"


def test_baseline_rows_by_hand() -> None:
    rows = baseline_rows(items(), lambda text: len(text.split()))
    fixed, copied = score_pass(rows["frequent_words"]), score_pass(rows["copy_prompt"])
    # "a is blue cat" against each reference: LCS "is blue" (2 of 4 and 4) -> F 1/2; "a is" (2 of 4 and 5) -> 4/9;
    # nothing in "hi there" -> 0.
    assert fixed["rougeL"] == pytest.approx(100 * (1 / 2 + 4 / 9 + 0) / 3)
    # The instruction as the answer: nothing of "name a color"; "a pet" (2 of 3 and 5) -> 1/2; "hi" (1 of 2 and 2)
    # -> 1/2.
    assert copied["rougeL"] == pytest.approx(100 * (0 + 1 / 2 + 1 / 2) / 3)
    assert fixed["length"] == 4 and copied["length"] == pytest.approx((3 + 3 + 2) / 3)
    assert "stop_rate" not in fixed
    assert [row["response"] for row in rows["copy_prompt"]] == [row["instruction"] for row in TOY]


def test_eval_writes_the_stop_rate_and_both_baselines(tmp_path: Path, tiny_teacher: Path) -> None:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TOY))
    out = tmp_path / "ev"
    common = [str(tiny_teacher), "--data", f"toy={data}", "--out", str(out), "--seeds", "1,2", "--precision", "fp32"]
    result = kd_eval(*common, "--max-new-tokens", "6", "--baselines")
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "results.json").read_text())["sets"]["toy"]["sampling"]
    for seed in (1, 2):
        rows = [json.loads(line) for line in (out / "toy" / f"seed-{seed}.jsonl").read_text().splitlines()]
        stopped = sum(row["stopped"] == "eos" for row in rows) / len(rows)
        assert entry["metrics"]["stop_rate"]["per_seed"][f"seed-{seed}"] == stopped
    baselines = entry["baselines"]
    assert baselines["frequent_words"]["answer"] == "a is blue cat"
    assert baselines["frequent_words"]["metrics"]["rougeL"] == pytest.approx(100 * (1 / 2 + 4 / 9) / 3)
    assert baselines["copy_prompt"]["metrics"]["rougeL"] == pytest.approx(100 / 3)
    for name in ("copy-prompt", "frequent-words"):
        rows = [json.loads(line) for line in (out / "toy" / f"baseline-{name}.jsonl").read_text().splitlines()]
        assert [row["index"] for row in rows] == [0, 1, 2]
    shown = " ".join(result.output.split())
    assert "stop rate" in shown and "ROUGE-L, frequent words (no model)" in shown

    # A later run without the flag keeps the baselines up to date rather than dropping them.
    again = kd_eval(*common, "--max-new-tokens", "6")
    assert again.exit_code == 0, again.output
    assert "baselines" in json.loads((out / "results.json").read_text())["sets"]["toy"]["sampling"]
