"""Synthetic run folders for `kd compare` tests: what kd distill and kd eval write, with chosen numbers, in ms."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kdcli.evaluation.metrics import aggregate, score_pass

# (seed, example index) → (response, tokens)
Answer = Callable[[int, int], tuple[str, int]]


def recipe(name: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "output_dir": "runs",
        "teacher": {"model": "builtin:smollm2-135m-instruct"},
        "student": {"init": "teacher", "layers": "every-other"},
        "data": {"train": "builtin:starter", "eval": "builtin:starter", "template": "chat", "max_length": 256},
        "loss": {"divergence": "fkl", "params": {}, "kd_ratio": 0.5},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1.0e-4, "schedule": "cosine"},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return data


def make_run(
    root: Path,
    name: str,
    *,
    divergence: str = "fkl",
    steps: int = 30,
    loss_start: float = 4.0,
    loss_end: float = 2.0,
    tokens_per_s: float = 900.0,
    wall_seconds: float = 120.0,
    recipe_changes: dict[str, Any] | None = None,
    diagnostics: dict[str, float] | None = None,
) -> Path:
    """A finished run folder: recipe.yaml, run.json, metrics.jsonl (a noisy decaying loss) and student/."""
    run = root / name
    (run / "student").mkdir(parents=True)
    changes = {"loss__divergence": divergence, **(recipe_changes or {})}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe(name, **changes), sort_keys=False), encoding="utf-8")
    rng = random.Random(name)
    lines: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        loss = loss_start + (loss_end - loss_start) * step / steps + rng.uniform(-0.2, 0.2)
        line = {"step": step, "loss": loss, "kd": loss / 2, "ce": loss / 2, "lr": 1e-4, "grad_norm": 1.0,
                "tokens_per_s": tokens_per_s, "elapsed_s": step * 2.0, "valid_positions": 100.0}  # fmt: skip
        for key, value in (diagnostics or {}).items():
            line[key] = value + rng.uniform(-0.01, 0.01)
        lines.append(line)
    lines.append({"step": steps, "eval_loss": loss_end + 0.1, "eval_ce": 1.5, "eval_kd": 0.6, "eval_tokens": 500})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    summary = {
        "name": name,
        "divergence": divergence,
        "parameters": {"teacher": 134_515_008, "student": 81_419_328},
        "steps": steps,
        "tokens_per_s": tokens_per_s,
        "wall_seconds": wall_seconds,
        "final": lines[steps - 1],
        "eval_before": {"eval_loss": 5.0, "eval_ce": 3.0, "eval_kd": 2.0, "eval_tokens": 500},
        "eval_after": {"eval_loss": loss_end + 0.1, "eval_ce": 1.5 + (0.1 if divergence != "fkl" else 0.0)},
    }
    (run / "run.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return run


def example(index: int) -> dict[str, Any]:
    return {"index": index, "instruction": f"Question {index}?", "prompt": f"<user>Question {index}?<assistant>",
            "reference": f"the answer to question {index} is {index * 7}"}  # fmt: skip


def quality_answers(quality: float, salt: str = "") -> Answer:
    """The reference itself with probability `quality`, else a partly wrong answer; tokens ~ response words."""

    def answer(seed: int, index: int) -> tuple[str, int]:
        rng = random.Random(f"{salt}-{seed}-{index}")
        ref = str(example(index)["reference"])
        text = ref if rng.random() < quality else f"maybe {index} or {rng.randint(0, 99)} words {rng.choice('abc')}"
        return text, len(text.split()) + rng.randint(0, 3)

    return answer


def add_eval(
    run: Path,
    answer: Answer,
    *,
    set_name: str = "starter",
    seeds: Sequence[int] = (10, 20, 30),
    examples: int = 30,
    judge: Callable[[int, int], tuple[float, float]] | None = None,
    mode: str = "sampling",
    missing: Mapping[int, Collection[int]] | None = None,
) -> dict[str, Any]:
    """What kd eval writes for one set: per-pass files, judge records, results.json (merged with earlier sets).

    `missing` maps a seed to the example indices its pass lacks (a pass cut short, or filtered differently)."""
    set_dir = run / "eval" / set_name
    set_dir.mkdir(parents=True, exist_ok=True)
    per_pass: dict[str, dict[str, float]] = {}
    labels = ["greedy"] if mode == "greedy" else [f"seed-{s}" for s in seeds]
    for label, seed in zip(labels, [0] if mode == "greedy" else list(seeds), strict=True):
        rows = []
        kept = [i for i in range(examples) if i not in (missing or {}).get(seed, ())]
        for i in kept:
            text, tokens = answer(seed, i)
            rows.append({**example(i), "response": text, "tokens": tokens, "stopped": "eos"})
        (set_dir / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        per_pass[label] = score_pass(rows)
        if judge is not None:
            records = []
            for i in kept:
                model, reference = judge(seed, i)
                records.append({"index": i, "model_score": model, "reference_score": reference})
            (set_dir / f"judge-{label}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
            )
            per_pass[label]["judge"] = (
                100 * sum(r["model_score"] for r in records) / sum(r["reference_score"] for r in records)
            )
    path = run / "eval" / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"format": 1, "sets": {}}
    results["sets"].setdefault(set_name, {})[mode] = {
        "data": "builtin:starter" if set_name == "starter" else f"data/{set_name}.jsonl",
        "examples": examples,
        "mode": mode,
        "seeds": [] if mode == "greedy" else list(seeds),
        "settings": {"max_new_tokens": 256, "greedy": mode == "greedy", "precision": "fp32"},
        "metrics": aggregate(per_pass),
        "generation": {"passes": {}, "tokens_per_s": None},
    }
    path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results
