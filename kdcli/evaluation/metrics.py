"""Generation metrics: ROUGE-L (the number the KD papers report), exact match, length and distinct-n.

ROUGE-L and exact match follow MiniLLM's `rouge_metric.py`, which AKL and ATKD reuse: the `rouge-score` package's
RougeScorer(["rougeL"], use_stemmer=True) F-measure, ×100, the best over an example's references; exact match
after lower-casing, removing punctuation and collapsing whitespace (SQuAD's normalisation without article
removal). Per set, each metric is the mean over examples of one generation pass (one seed); `aggregate` then gives
the mean and the standard deviation over seeds.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from kdcli.models.generation import STOPPED_AT_EOS

METRICS = ("rougeL", "exact_match", "length", "stop_rate", "distinct_1", "distinct_2")
_PUNCTUATION = frozenset(string.punctuation)
# distinct-n counts words and punctuation marks as separate tokens, lower-cased: "Yes!" and "yes !" are the same.
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@lru_cache(maxsize=1)
def _scorer() -> Any:
    # Imported lazily: rouge-score pulls in nltk, which `kd --help` should not pay for. Its Porter stemmer is
    # pure code; nothing is downloaded.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure ×100 of `prediction`, the best over `references` (0 when there are none)."""
    scorer = _scorer()
    return 100.0 * max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references), default=0.0)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 when the normalised prediction equals a normalised reference, else 0."""
    norm = normalize_answer(prediction)
    return 100.0 if any(norm == normalize_answer(ref) for ref in references) else 0.0


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams of a pass's responses (Li et al., 2016), in [0, 1]; 0 when none exist.

    Corpus-level, not per response: the question is whether the model says different things to different
    prompts, which a per-response ratio (high for any short answer) would not show.
    """
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def score_pass(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The metrics of one generation pass. Rows need `response`, `reference` (text or list) and `tokens`; the stop
    rate is given where every row says how it ended (`stopped`)."""
    if not rows:
        return dict.fromkeys(METRICS, 0.0)
    responses = [str(row["response"]) for row in rows]
    refs = [references_of(row) for row in rows]
    scores = {
        "rougeL": _mean(rouge_l(r, ref) for r, ref in zip(responses, refs, strict=True)),
        "exact_match": _mean(exact_match(r, ref) for r, ref in zip(responses, refs, strict=True)),
        "length": _mean(float(row["tokens"]) for row in rows),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
    }
    if all(row.get("stopped") is not None for row in rows):  # a model's pass; a baseline generated nothing
        scores["stop_rate"] = stop_rate(rows)
    return {metric: scores[metric] for metric in METRICS if metric in scores}


def stop_rate(rows: Sequence[Mapping[str, Any]]) -> float:
    """The share of answers that ended with EOS before `max_new_tokens`, in [0, 1]. A student that is not yet a
    model runs on to the cap: the teacher of the quickstart stops in about two answers of three at 128 tokens."""
    return _mean(1.0 if row.get("stopped") == STOPPED_AT_EOS else 0.0 for row in rows)


def references_of(row: Mapping[str, Any]) -> list[str]:
    ref = row["reference"]
    return [str(r) for r in ref] if isinstance(ref, list) else [str(ref)]


def aggregate(per_pass: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric: mean and population standard deviation over passes (seeds), and the value of each pass."""
    out: dict[str, dict[str, Any]] = {}
    names = [m for m in METRICS if any(m in values for values in per_pass.values())]
    names += sorted({m for values in per_pass.values() for m in values} - set(names))
    for metric in names:
        values = {label: float(v[metric]) for label, v in per_pass.items() if metric in v}
        mean, std = mean_std(list(values.values()))
        out[metric] = {"mean": mean, "std": std, "per_seed": values}
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, as the papers' scripts compute it)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0
