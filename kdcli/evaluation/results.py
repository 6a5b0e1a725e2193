"""The eval folder: per set `<set>/generation.json` (what the generations were made from) and `results.json`.

    <eval>/results.json                 every set and mode evaluated so far, merged run after run
    <eval>/judge-cache.jsonl            raw judge replies, keyed by a hash of model and request
    <eval>/<set>/generation.json        inputs and settings of the passes below, their tokens/s
    <eval>/<set>/seed-<s>.jsonl         one line per example: prompt, reference, response, tokens, ...
    <eval>/<set>/greedy.jsonl           the --greedy pass
    <eval>/<set>/judge-<pass>.jsonl     per example: both verdicts, raw replies, scores

A pass is reused only when the generation record says it was made from the same prompts, references, model
weights and settings; anything else is refused with the difference named, and `--force` regenerates. The record
holds no path of this machine (a run's model is `student`, relative to the run folder), so a copied run folder
keeps its passes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdcli.durable import write_json
from kdcli.errors import KdError

FORMAT = 1
RESULTS_FILE = "results.json"
GENERATION_FILE = "generation.json"
JUDGE_CACHE_FILE = "judge-cache.jsonl"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path, fix: str = "Pass --force to regenerate.") -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KdError(f"{path}: not valid JSON ({err}). {fix}") from err
    if not isinstance(data, dict):
        raise KdError(f"{path}: expected a JSON object. {fix}")
    return data


def check_generation(
    set_dir: Path, inputs: dict[str, Any], mode: str, settings: dict[str, Any], *, force: bool
) -> dict[str, Any]:
    """The set's generation record, checked against today's inputs and settings (see module doc).

    With `force`, mismatching passes are deleted instead of refused.
    """
    path = set_dir / GENERATION_FILE
    try:
        record = read_json(path)
    except KdError:
        if not force:
            raise
        record = None
    if record is None or record.get("format") != FORMAT:
        if _pass_files(set_dir) and not force:
            # Generations that cannot be checked are neither trusted nor deleted without being asked.
            why = "no generation.json" if record is None else "a generation.json from another kd version"
            raise KdError(f"{set_dir}: holds generations but {why}, so kd cannot tell how they were made. {_fix()}")
        _clear_passes(set_dir, None)
        record = {"format": FORMAT, "inputs": inputs, "settings": {}, "passes": {}}
    elif not _same_inputs(record.get("inputs"), inputs):
        if not force:
            raise KdError(
                f"{set_dir}: the generations there were {_difference(record.get('inputs') or {}, inputs)}. {_fix()}"
            )
        _clear_passes(set_dir, None)
        record = {"format": FORMAT, "inputs": inputs, "settings": {}, "passes": {}}
    record["inputs"] = inputs  # the model as recorded today (older records held its absolute path)
    stored = record["settings"].get(mode)
    if stored is not None and stored != settings:
        if not force:
            raise KdError(f"{set_dir}: the {mode} passes there were {_difference(stored, settings)}. {_fix()}")
        _clear_passes(set_dir, mode)
        record["passes"] = {k: v for k, v in record["passes"].items() if _mode_of(k) != mode}
    record["settings"][mode] = settings
    set_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def _same_inputs(old: Any, new: dict[str, Any]) -> bool:
    """Whether passes made from `old` inputs count as made from `new`. A local model is known by its weights'
    fingerprint, not by where it lies: a run folder copied elsewhere keeps its passes, and records of older kd
    versions, which held the model's absolute path, still match."""
    if old == new:
        return True
    if not isinstance(old, dict) or new.get("weights") is None or old.get("weights") != new.get("weights"):
        return False
    return {k: v for k, v in old.items() if k != "model"} == {k: v for k, v in new.items() if k != "model"}


def _fix() -> str:
    return "Pass --force to regenerate them, or --out DIR to keep both."


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key == "prompts_sha256":
                return "made from other prompts or references (another data file, template or --max-examples)"
            if key == "weights":
                return "made by other model weights (was the run re-trained?)"
            return f"made with {key}={old.get(key)!r}, this run asks {key}={new.get(key)!r}"
    return "made differently"


def _mode_of(label: str) -> str:
    return "greedy" if label == "greedy" else "sampling"


def _pass_files(set_dir: Path) -> list[Path]:
    """Generation files (finished or partial) and judge records in a set folder."""
    if not set_dir.is_dir():
        return []
    found = []
    for path in set_dir.iterdir():
        label = path.name.split(".", 1)[0].removeprefix("judge-")
        if path.is_file() and (label == "greedy" or label.startswith("seed-")):
            found.append(path)
    return found


def _clear_passes(set_dir: Path, mode: str | None) -> None:
    """Delete generations (and their judge records) of `mode`, or of every mode."""
    for path in _pass_files(set_dir):
        if mode is None or _mode_of(path.name.split(".", 1)[0].removeprefix("judge-")) == mode:
            path.unlink()


def delete_pass(set_dir: Path, label: str) -> None:
    for path in (set_dir / f"{label}.jsonl", set_dir / f"{label}.jsonl.partial", set_dir / f"judge-{label}.jsonl"):
        path.unlink(missing_ok=True)


def record_pass(set_dir: Path, record: dict[str, Any], label: str, stats: dict[str, Any]) -> None:
    record["passes"][label] = stats
    write_json(set_dir / GENERATION_FILE, record)


def update_results(eval_dir: Path, target: dict[str, Any], set_name: str, mode: str, entry: dict[str, Any]) -> dict:
    """Merge one set's results into `results.json` (other sets and modes evaluated earlier stay)."""
    path = eval_dir / RESULTS_FILE
    fix = "Delete it: kd eval rebuilds it from the generations, which it reuses."
    results = read_json(path, fix=fix) or {}
    if results.get("format") != FORMAT:
        results = {"format": FORMAT}
    sets = results.setdefault("sets", {})
    if not isinstance(sets, dict) or not isinstance(sets.setdefault(set_name, {}), dict):
        raise KdError(f"{path}: 'sets' is not an object of sets and modes. {fix}")
    results["target"] = target
    results["updated"] = now()
    sets[set_name][mode] = entry
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    return results


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from kdcli.durable import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
