"""A pass's rows as statistics over its examples: each metric of kd eval as a function of resampling counts, with
kd eval's own metric functions, so that `kd compare` recomputes exactly what `kd eval` reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdcli.compare.stats import DistinctStat, MeanStat, Statistic


def pass_statistics(picked: Sequence[dict[str, Any]]) -> dict[str, Statistic]:
    """Each metric of one pass as a statistic over its examples (kd eval's own metric functions)."""
    from kdcli.evaluation.metrics import exact_match, references_of, rouge_l, words
    from kdcli.models.generation import STOPPED_AT_EOS

    responses = [str(row.get("response", "")) for row in picked]
    tokenised = [words(text) for text in responses]
    out: dict[str, Statistic] = {
        "rougeL": MeanStat([rouge_l(text, references_of(row)) for text, row in zip(responses, picked, strict=True)]),
        "exact_match": MeanStat(
            [exact_match(text, references_of(row)) for text, row in zip(responses, picked, strict=True)]
        ),
        "length": MeanStat([float(row.get("tokens", 0)) for row in picked]),
        "distinct_1": DistinctStat(tokenised, 1),
        "distinct_2": DistinctStat(tokenised, 2),
    }
    if all(row.get("stopped") is not None for row in picked):  # answers a model generated; a baseline's did not stop
        out["stop_rate"] = MeanStat([1.0 if row.get("stopped") == STOPPED_AT_EOS else 0.0 for row in picked])
    return out
