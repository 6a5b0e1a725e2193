"""What an experiment logger is, and what it is sent: metric names, the missing-extra error.

A logger only stores numbers and text at a step in a run folder; what they are named and when they are sent is
decided here and in `observer`, so TensorBoard and W&B get the same `train/<key>` and `eval/<key>` scalars.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from kdcli.errors import KdError
from kdcli.recipe.schema import REPORTERS

# Keys of a training step's record that are not metrics: its place in the run and the wall clock.
_NOT_SCALARS = frozenset({"step", "elapsed_s", "total_steps", "tokens_seen"})
# On-policy sampling (`gen_tokens`, `gen_s`) is logged only by runs that sample: elsewhere it is always 0.
_ON_POLICY_KEYS = ("gen_tokens", "gen_s")


class Logger(Protocol):
    """One experiment tracker. `open` is called once, on rank 0, once the run folder exists; the constructor
    only checks that the tracker's package is installed (so a missing extra is reported before any slow work)."""

    def open(self, folder: Path, start_step: int = 0) -> None:
        """Start writing into `folder` (a run folder). `start_step` > 0: a resumed run, whose steps after
        `start_step` that an earlier process may have logged are replaced, not duplicated."""
        ...

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None:
        """A Markdown table or note (`kd compare`'s table)."""
        ...

    def close(self, finished: bool = True) -> None:
        """Flush and end; `finished=False` when the run failed or was interrupted. Safe to call twice."""
        ...


def check_names(names: Iterable[str], key: str) -> list[str]:
    """`names` (a `--report-to` option's, comma-separated allowed) checked against the loggers kd has."""
    out: list[str] = []
    for item in names:
        for name in (part.strip() for part in item.split(",")):
            if name and name not in REPORTERS:
                raise KdError(f"{key}: '{name}' is not a logger; use {', '.join(REPORTERS)}.")
            if name and name not in out:
                out.append(name)
    return out


def missing_extra(name: str, err: ImportError, key: str) -> KdError:
    module = (err.name or name).split(".")[0]
    return KdError(f"{key}: {name} needs the '{name}' extra ({module} is not installed): pip install 'kdcli[{name}]'")


def train_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A training step's record (a `metrics.jsonl` line) as `train/<key>` scalars: loss, kd, ce, lr, grad_norm,
    tokens_per_s, the divergence's diagnostics, and on-policy sampling where the run samples."""
    sampling = "on_policy_ratio" in record
    return {
        f"train/{key}": float(value)
        for key, value in record.items()
        if key not in _NOT_SCALARS and (sampling or key not in _ON_POLICY_KEYS) and _is_number(value)
    }


def eval_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """An eval record (`eval_loss`, `eval_ce`, `eval_kd`) as `eval/loss`, `eval/ce`, `eval/kd`."""
    return {
        f"eval/{key.removeprefix('eval_')}": float(value)
        for key, value in record.items()
        if key.startswith("eval_") and key != "eval_tokens" and _is_number(value)
    }


def results_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """What `kd eval` just evaluated, as `eval/<set>/<metric>` (the mean over seeds; `eval/<set>/greedy/<metric>`
    for a `--greedy` pass): ROUGE-L, exact match, length, distinct-n, and the judge's score when judged."""
    out: dict[str, float] = {}
    for set_name, mode in summary.get("evaluated", []):
        metrics = summary["sets"][set_name][mode].get("metrics", {})
        prefix = f"eval/{set_name}/" + ("greedy/" if mode == "greedy" else "")
        for metric, values in metrics.items():
            mean = values.get("mean") if isinstance(values, Mapping) else None
            if _is_number(mean):
                out[prefix + metric] = float(mean)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
