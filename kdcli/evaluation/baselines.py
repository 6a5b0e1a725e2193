"""Answers that need no model (`kd eval --baselines`): the bar a student must clear before its scores mean anything.

A word-salad student that never stops still scores a few points of ROUGE-L, and sharper salad scores more: the
first replication study ranked its arms by exactly that. Two answers written without any model show where that
floor is, on the same prompts and references:

- `copy_prompt`: the instruction (and its context) copied as the answer. Sets whose references restate the
  question reward it, at times above the teacher itself: a reference row that says how much of a set's ROUGE-L
  is echo, not a bar a model must clear.
- `frequent_words`: one fixed string for every prompt, the set's most frequent reference words, most frequent first,
  as many as a typical reference has words. It is the bar: a model that does not beat it on ROUGE-L writes nothing
  a bag of common words would not.

Both are scored like any pass, by `metrics.score_pass`, and written as pass files beside the model's
(`<set>/baseline-copy-prompt.jsonl`, `<set>/baseline-frequent-words.jsonl`), so `kd compare` can pair them with a
run prompt by prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kdcli.evaluation.generate import item_fields
from kdcli.evaluation.metrics import score_pass
from kdcli.evaluation.sets import EvalItem

# name → (pass label, title)
BASELINES: dict[str, tuple[str, str]] = {
    "copy_prompt": ("baseline-copy-prompt", "prompt copied"),
    "frequent_words": ("baseline-frequent-words", "frequent words"),
}
# The bar a student must clear on ROUGE-L before it is ranked: below a fixed string of common words it is not yet a
# model. The copied prompt is a reference row, not a bar: it beats the teacher where references restate the question.
BAR = "frequent_words"
_WORD = re.compile(r"\w+", re.UNICODE)


def baseline_title(name: str) -> str:
    """How tables name one answer written without a model (a key of `BASELINES`): its title, said to be no model's."""
    return f"{BASELINES[name][1]} (no model)"


def reference_words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: the words `frequent_words` counts (punctuation is not a word)."""
    return _WORD.findall(text.lower())


def frequent_words(items: Sequence[EvalItem]) -> str:
    """The set's fixed answer: its K most frequent reference words, most frequent first (a tie in alphabetical
    order), joined by spaces, where K is the median word count of its references (the lower middle value of an
    even count). Every reference of every example counts."""
    references = [ref for item in items for ref in item.references]
    counts = Counter(word for ref in references for word in reference_words(ref))
    lengths = sorted(len(reference_words(ref)) for ref in references)
    size = lengths[(len(lengths) - 1) // 2] if lengths else 0
    ranked = sorted(counts, key=lambda word: (-counts[word], word))
    return " ".join(ranked[:size])


def baseline_rows(items: Sequence[EvalItem], count_tokens: Callable[[str], int]) -> dict[str, list[dict[str, Any]]]:
    """Each baseline's pass rows, in the set's order, shaped like a model's (`generate_pass`'s columns; `stopped`
    is None: nothing was generated, so nothing stopped)."""
    fixed = frequent_words(items)
    answers = {"copy_prompt": [item.instruction for item in items], "frequent_words": [fixed] * len(items)}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, responses in answers.items():
        out[name] = [
            {
                "index": index,
                **item_fields(item),
                "response": response,
                "tokens": count_tokens(response),
                "stopped": None,
            }
            for index, (item, response) in enumerate(zip(items, responses, strict=True))
        ]
    return out


def baseline_entry(name: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What results.json keeps of one baseline: its pass label, its metrics (no stop rate: nothing generated),
    and for `frequent_words` the fixed answer itself."""
    label, title = BASELINES[name]
    metrics = score_pass(rows)
    metrics.pop("stop_rate", None)
    entry: dict[str, Any] = {"label": label, "title": title, "metrics": metrics}
    if name == "frequent_words" and rows:
        entry["answer"] = rows[0]["response"]
    return entry
