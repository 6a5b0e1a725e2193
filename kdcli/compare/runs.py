"""Reading what `kd distill` and `kd eval` left in a run folder, with every defect reported as a `KdError`
naming the file and the fix.

    <run>/recipe.yaml, run.json, metrics.jsonl     written by kd distill
    <run>/eval/results.json                        written by kd eval (its default eval folder)
    <run>/eval/<set>/<pass>.jsonl                  per-example generations: the bootstrap pairs these
    <run>/eval/<set>/judge-<pass>.jsonl            per-example judge scores
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.durable import json_lines
from kdcli.errors import KdError
from kdcli.evaluation.results import read_json
from kdcli.recipe.load import read_yaml
from kdcli.runs import RunFolder, RunRecord

RESULTS_FILE = "results.json"


@dataclass
class RunData:
    label: str  # the column title: the folder name, or its path when two runs share a name
    path: Path
    recipe: dict[str, Any]
    run: RunRecord
    steps: list[dict[str, Any]]  # training lines of metrics.jsonl
    evals: list[dict[str, Any]]  # eval lines of metrics.jsonl
    results: dict[str, Any] | None  # eval/results.json, None before any kd eval
    # A column that is only an eval folder (`kd eval MODEL --out DIR`, `evals/<name>`): the teacher or any model
    # beside the runs. It has no recipe and no training; its generations are the folder's own.
    eval_only: bool = False
    _passes: dict[tuple[str, str], list[dict[str, Any]] | None] = field(default_factory=dict, repr=False)
    _judged: dict[tuple[str, str], dict[int, tuple[float, float]] | None] = field(default_factory=dict, repr=False)

    @property
    def eval_dir(self) -> Path:
        return self.path if self.eval_only else RunFolder(self.path).eval_dir

    def sets(self) -> dict[str, dict[str, Any]]:
        """{set name: {mode: entry}} from results.json."""
        return (self.results or {}).get("sets", {}) or {}

    def folders(self) -> list[RunData]:
        """The run folders behind this column: the run itself (an arm of `--pool-seeds` has several)."""
        return [self]

    def pass_groups(self, passes: Sequence[str]) -> list[list[str]]:
        """`passes` split by training run: one group here (an arm has one per run)."""
        return [list(passes)]

    def group_seeds(self, groups: Sequence[Sequence[str]]) -> list[Any]:
        """The training seed of each of `pass_groups`' groups, what pairs two arms' runs: none for one run."""
        return [None for _ in groups]

    def pass_key(self, label: str) -> str:
        """The sampling pass a pass label is (`seed-10`), by which columns share passes: the label itself here."""
        return label

    def pass_file(self, set_name: str, label: str) -> str:
        """Where a pass's generations are (for messages)."""
        return str(self.eval_dir / set_name / f"{label}.jsonl")

    def pass_rows(self, set_name: str, label: str) -> list[dict[str, Any]] | None:
        """The per-example generations of one pass, or None when the file is gone."""
        key = (set_name, label)
        if key not in self._passes:
            path = self.eval_dir / set_name / f"{label}.jsonl"
            self._passes[key] = _read_jsonl(path, _REGENERATE) if path.is_file() else None
        return self._passes[key]

    def judge_scores(self, set_name: str, label: str) -> dict[int, tuple[float, float]] | None:
        """index → (model score, reference score) for the examples the judge scored in both orders."""
        key = (set_name, label)
        if key not in self._judged:
            path = self.eval_dir / set_name / f"judge-{label}.jsonl"
            scores: dict[int, tuple[float, float]] | None = None
            if path.is_file():
                scores = {}
                for row in _read_jsonl(path, _REGENERATE):
                    model, reference = row.get("model_score"), row.get("reference_score")
                    if model is not None and reference is not None:
                        scores[int(row["index"])] = (float(model), float(reference))
            self._judged[key] = scores
        return self._judged[key]


_REGENERATE = "Re-run kd eval on this run with --force to regenerate it."


def load_runs(paths: list[Path]) -> list[RunData]:
    runs = [load_run(path) for path in paths]
    names = [run.path.name for run in runs]
    for run in runs:
        if names.count(run.path.name) > 1:
            run.label = str(run.path)
    labels = [run.label for run in runs]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise KdError(f"{dupes[0]}: given twice. Name each run once (use --baseline to pick the reference).")
    return runs


def load_run(path: Path) -> RunData:
    path = Path(path)
    if not path.exists():
        raise KdError(
            f"{path}: no such folder. Give a run folder written by kd distill (<output_dir>/<name>) or an eval "
            "folder written by kd eval (evals/<name>)."
        )
    if not path.is_dir():
        raise KdError(f"{path}: is a file, not a run folder. Give the folder kd distill wrote (<output_dir>/<name>).")
    folder = RunFolder(path)
    if (path / RESULTS_FILE).is_file() and not folder.recipe_file.exists() and not folder.looks_like_a_run():
        return _eval_folder(path)
    run = folder.read_record()
    if not folder.recipe_file.is_file():
        raise KdError(
            f"{folder.recipe_file}: missing. kd distill writes it with run.json; restore it or re-run the run."
        )
    recipe = read_yaml(folder.recipe_file)  # raw, not validated: a recipe from an older kd still compares
    lines = folder.read_metrics()  # a last line cut off by a kill is skipped, with a warning
    steps = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval_loss" in line]
    results_file = folder.eval_dir / RESULTS_FILE
    results = None
    if results_file.is_file():
        results = _read_object(results_file, "Delete it: kd eval rebuilds it from the generations, which it reuses.")
        _check_results(results, results_file)
    return RunData(path.name, path, recipe, run, steps, evals, results)


def _eval_folder(path: Path) -> RunData:
    """An eval folder as a column: its results and generations, no recipe, no training record."""
    results = _read_object(path / RESULTS_FILE, "Delete it: kd eval rebuilds it from the generations, which it reuses.")
    _check_results(results, path / RESULTS_FILE)
    return RunData(path.name, path, {}, RunRecord(), [], [], results, eval_only=True)


_ENTRY_KEYS = (("metrics", dict, "an object"), ("settings", dict, "an object"), ("seeds", list, "a list"),
               ("mode", str, "a string"), ("data", str, "a string"))  # fmt: skip


def _check_results(results: dict[str, Any], path: Path) -> None:
    """The shape of results.json that compare reads ({set: {mode: entry}}), so that a damaged one is one line."""
    fix = "Delete it and re-run kd eval on this run."
    sets = results.get("sets", {})
    if not isinstance(sets, dict):
        raise KdError(f"{path}: 'sets' is not an object. {fix}")
    for name, modes in sets.items():
        if not isinstance(modes, dict) or not all(isinstance(entry, dict) for entry in modes.values()):
            raise KdError(f"{path}: 'sets.{name}' is not an object of modes (sampling, greedy). {fix}")
        for mode, entry in modes.items():
            for key, kind, what in _ENTRY_KEYS:
                if entry.get(key) is not None and not isinstance(entry[key], kind):
                    raise KdError(f"{path}: 'sets.{name}.{mode}.{key}' is not {what}. {fix}")
            for metric, value in (entry.get("metrics") or {}).items():
                if not isinstance(value, dict) or not isinstance(value.get("per_seed") or {}, dict):
                    raise KdError(f"{path}: 'sets.{name}.{mode}.metrics.{metric}' is not an object. {fix}")


def _read_object(path: Path, fix: str) -> dict[str, Any]:
    data = read_json(path, fix)
    assert data is not None  # callers check that the file exists
    return data


def _read_jsonl(path: Path, fix: str) -> list[dict[str, Any]]:
    """The JSON lines of a file kd eval wrote whole (metrics.jsonl is `RunFolder.read_metrics`'s)."""
    if not path.is_file():
        return []
    try:
        lines = [line for line in json_lines(path.read_text(encoding="utf-8")) if line.strip()]
    except UnicodeDecodeError as err:
        raise KdError(f"{path}: not UTF-8 text ({_first_line(err)}). {fix}") from None
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise KdError(f"{path}: line {number} is not valid JSON ({_first_line(err)}). {fix}") from None
        if not isinstance(row, dict):
            raise KdError(f"{path}: line {number} is not a JSON object. {fix}")
        rows.append(row)
    return rows


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
