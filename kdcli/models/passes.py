"""A generation pass written to a file (JSON lines, in prompt order), resumable batch by batch.

Built on `kdcli.models.generation`'s plan and batches, so the responses equal `generate`'s for the same seed and
batch size. Finished batches are appended to `<path>.partial` as they complete; a later call with the same batch
size continues after them, and since every batch is reseeded from (seed, batch index) the resumed pass is the one
an uninterrupted run writes. `path` itself appears only once the pass is complete (atomic rename).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.durable import append_text, json_lines, write_text_atomic
from kdcli.errors import KdError
from kdcli.models.generation import GenerationSettings, Generator, LocalGenerator, Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[int, int, float], None]  # (examples done, tokens generated, seconds) of this pass


def partial_file(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def read_generations(path: Path, fix: str = "Delete it to generate the pass again.") -> list[dict[str, Any]]:
    """The rows of a pass file: `index`, the caller's fields, `response`, `tokens`, `stopped`. The file is written
    whole (a rename), so a broken line is damage, not an interruption: a `KdError` naming it, ending with `fix`."""
    rows = []
    lines = json_lines(path.read_text(encoding="utf-8", errors="replace"))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise KdError(f"{path}: line {number} is not valid JSON ({str(err)[:120]}). {fix}") from None
        if not isinstance(row, dict):
            raise KdError(f"{path}: line {number} is not a JSON object. {fix}")
        rows.append(row)
    return rows


def generate_file(
    model: PreTrainedModel | Generator,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    seed: int | None,
    path: Path,
    *,
    batch_size: int = 8,
    fields: Sequence[Mapping[str, Any]] | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Generate one pass into `path`; return its tokens, seconds, tokens/s and how many examples were resumed.

    Each row is `{"index", **fields[index], "response", "tokens", "stopped"}`; `fields` (one mapping a prompt, in
    the order its keys should be written) defaults to `{"prompt": prompt}`. `seed` None: no reseeding (greedy).
    `model` is a model in this process or a `Generator` (a served teacher).
    """
    generator: Generator = model if hasattr(model, "session") else LocalGenerator(model)  # type: ignore[assignment]
    plan = generator.plan(tokenizer, prompts, settings, batch_size)
    columns = list(fields) if fields is not None else [{"prompt": _jsonable(p)} for p in prompts]
    if len(columns) != len(prompts):
        raise ValueError(f"fields: {len(columns)} entries for {len(prompts)} prompts")

    partial = partial_file(path)
    done = _resume(partial, plan.batches)
    _rewrite_partial(partial, done)
    rows_done = resumed = sum(len(rows) for rows in done.values())
    tokens = 0
    started = time.perf_counter()
    if on_progress:
        on_progress(rows_done, 0, 0.0)
    with generator.session():
        for b, batch in enumerate(plan.batches):
            if b in done:
                continue
            rows = []
            for index, generation in zip(batch, generator.batch(tokenizer, plan, b, seed), strict=True):
                rows.append(
                    {
                        "index": index,
                        "batch": b,
                        **columns[index],
                        "response": generation.text,
                        "tokens": len(generation.ids),
                        "stopped": generation.stopped,
                    }
                )
                tokens += generation.generated
            # One append per batch: a crash leaves whole batches (a torn last line is dropped on resume), and a full
            # disk (`DiskFull`) leaves the batches before this one.
            append_text(partial, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            done[b] = rows
            rows_done += len(rows)
            if on_progress:
                on_progress(rows_done, tokens, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    ordered = sorted((row for rows in done.values() for row in rows), key=lambda row: row["index"])
    for row in ordered:
        row.pop("batch", None)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered))
    partial.unlink(missing_ok=True)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 and tokens else None,
        "resumed_examples": resumed,
    }


def _jsonable(prompt: Prompt) -> str | list[int]:
    return prompt if isinstance(prompt, str) else [int(t) for t in prompt]


def _resume(partial: Path, plan: list[list[int]]) -> dict[int, list[dict[str, Any]]]:
    """Whole batches of an interrupted pass that match today's batch plan; anything else is regenerated."""
    if not partial.exists():
        return {}
    by_batch: dict[int, list[dict[str, Any]]] = {}
    for line in json_lines(partial.read_text(encoding="utf-8")):
        try:
            row = json.loads(line)
            by_batch.setdefault(int(row["batch"]), []).append(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line torn by the interruption
    kept: dict[int, list[dict[str, Any]]] = {}
    for b, rows in by_batch.items():
        if b < len(plan) and sorted(row.get("index") for row in rows) == sorted(plan[b]):
            kept[b] = rows
    return kept


def _rewrite_partial(partial: Path, done: dict[int, list[dict[str, Any]]]) -> None:
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows = [row for b in sorted(done) for row in done[b]]
    write_text_atomic(partial, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
