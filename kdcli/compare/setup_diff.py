"""The setup diff: the recipe keys (dotted, e.g. `loss.params.mu`) whose values differ between runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The run's identity, not its setup: the column titles already say it.
IGNORED_KEYS = frozenset({"name", "output_dir"})
# Shown whenever a run has them, equal or not: what kd resolved for the run and a reader needs to see (the teacher
# layers a `student.layers: {keep: N, by: ...}` student kept).
ALWAYS_SHOWN = frozenset({"student.layers.indices"})


@dataclass(frozen=True)
class SetupRow:
    key: str
    values: dict[str, str | None]  # run label → value as text; None when the run's recipe lacks the key


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted keys; lists and scalars are leaves. An empty mapping is a leaf `{}`, so
    `loss.params: {}` against `loss.params.mu: 0.5` shows up on both sides."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def setup_diff(recipes: Mapping[str, Mapping[str, Any]], order: Sequence[str] | None = None) -> list[SetupRow]:
    """Rows for the keys where at least two runs differ (a key only some recipes have counts as differing), and for
    those in `ALWAYS_SHOWN`, in the recipe's own key order (teacher, student, data, loss, train), not
    alphabetically."""
    labels = list(order or recipes)
    flat = {label: flatten(recipes[label]) for label in labels}
    keys: list[str] = []
    for label in labels:
        for key in flat[label]:
            if key not in keys and key.split(".")[0] not in IGNORED_KEYS:
                keys.insert(_position(keys, key), key)
    rows = []
    for key in keys:
        present = [flat[label].get(key, _ABSENT) for label in labels]
        if key in ALWAYS_SHOWN or any(value != present[0] for value in present[1:]):
            texts = [None if v is _ABSENT else format_value(v) for v in present]
            rows.append(SetupRow(key, dict(zip(labels, texts, strict=True))))
    return rows


def _position(keys: list[str], key: str) -> int:
    """Where a key only a later recipe has goes: after the last key that shares the longest dotted prefix with it,
    so `loss.params.mu` sits beside `loss.params`, not at the end."""
    parts = key.split(".")
    best, where = 0, len(keys)
    for i, other in enumerate(keys):
        shared = 0
        for a, b in zip(parts, other.split("."), strict=False):
            if a != b:
                break
            shared += 1
        if shared and shared >= best:
            best, where = shared, i + 1
    return where


_ABSENT = object()
