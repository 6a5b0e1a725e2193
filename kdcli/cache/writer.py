"""`kd cache-teacher`: run the teacher once over the recipe's data and write a resumable, verifiable cache.

Durability: each shard is written under a temporary name, fsynced, renamed, and only then listed in the manifest
(itself written atomically). A crash therefore leaves either a listed, complete shard or nothing that counts, and a
re-run continues after the last listed shard. The shard plan (which examples go in which shard) depends only on
the examples and `cache.shard_tokens`, and each shard's batches only on `cache.batch_size`, so a resumed cache is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.cache import format as fmt
from kdcli.cache.fingerprint import (
    data_fingerprint,
    differences,
    mismatch_error,
    setup_of,
    teacher_fingerprint,
)
from kdcli.cache.scorers import Scorer, local_scorer, served_scorer
from kdcli.data import Collator, build_examples, read_split
from kdcli.data.formatting import Examples
from kdcli.durable import FolderLock, write_bytes_atomic, write_json
from kdcli.errors import KdError
from kdcli.hardware import Runtime
from kdcli.models.served import ServerGone, public_url

if TYPE_CHECKING:
    import torch

    from kdcli.models.served import ServedTeacher
    from kdcli.recipe import Recipe

# (phase, split, done, total): phase "generate" counts examples, "cache" counts tokens.
Progress = Callable[[str, str, int, int], None]


def shard_plan(lengths: Sequence[int], shard_tokens: int) -> list[list[int]]:
    """[start, end) example ranges: a shard closes once it holds `shard_tokens` tokens (always >= 1 example)."""
    plan: list[list[int]] = []
    start = tokens = 0
    for index, length in enumerate(lengths):
        tokens += length
        if tokens >= shard_tokens:
            plan.append([start, index + 1])
            start, tokens = index + 1, 0
    if start < len(lengths):
        plan.append([start, len(lengths)])
    return plan


def writer_settings(recipe: Recipe, top_k: int, vocab: int, reads: bool = True) -> dict[str, Any]:
    """The settings that decide a shard's bytes; `reads`: the shards hold the positions' character offsets (a
    cache begun before kd wrote them is finished without, so that its shards stay alike)."""
    return {
        "top_k": top_k,
        "vocab": vocab,
        "id_dtype": fmt.id_dtype_name(vocab),
        "logprob_dtype": recipe.cache.logprob_dtype,
        "shard_tokens": recipe.cache.shard_tokens,
        "batch_size": recipe.cache.batch_size,
        "precision": recipe.train.precision,
    } | ({"reads": True} if reads else {})


def check_out_dir(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The existing manifest to resume from, None for a fresh folder; refuses anything that is not a kd cache."""
    if out.exists() and not out.is_dir():
        raise KdError(f"--out: '{out}' is a file; give a folder for the cache.")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not fmt.is_cache_dir(out):
        raise KdError(
            f"--out: '{out}' is not empty and is not a teacher cache (no {fmt.MANIFEST}); kd will not write into it. "
            "Choose an empty or new folder."
        )
    manifest = fmt.read_manifest(out, "--out")
    if overwrite:
        for split in fmt.SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
        (out / fmt.MANIFEST).unlink()
        return None
    return manifest


def write_cache(
    recipe: Recipe,
    out: Path,
    splits: Sequence[str] = ("train",),
    *,
    top_k: int | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
    on_message: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write (or finish) the cache of `splits` into `out`; return the manifest, whose `stats` hold the summary.

    One process at a time: a second writer of the same cache is refused, naming the first."""
    with FolderLock(out):
        return _write_cache(
            recipe, out, splits, top_k=top_k, overwrite=overwrite, on_progress=on_progress, on_message=on_message
        )


def _write_cache(
    recipe: Recipe,
    out: Path,
    splits: Sequence[str] = ("train",),
    *,
    top_k: int | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
    on_message: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write (or finish) the cache of `splits` into `out`; return the manifest, whose `stats` hold the summary."""

    from kdcli.models import load_config, load_teacher, load_tokenizer

    say = on_message or (lambda _: None)
    started = time.perf_counter()
    server = recipe.teacher.server
    top_k = top_k or (server.top_k if server is not None else recipe.cache.top_k)
    if "eval" in splits and not recipe.data.eval:
        raise KdError("--split eval: the recipe has no data.eval. Set data.eval, or cache the train split only.")
    previous = check_out_dir(out, overwrite)
    runtime = Runtime.of(recipe.train.device, recipe.train.precision)

    # Everything that needs no weights is checked first: the data, the tokenizer, the settings of a cache to finish.
    rows_of = {split: read_split(recipe.data, split) for split in splits}  # type: ignore[arg-type]
    tokenizer = load_tokenizer(recipe.teacher.model)
    vocab = int(load_config(recipe.teacher.model).get_text_config().vocab_size)
    if not 1 <= top_k <= vocab:
        raise KdError(f"cache.top_k: {top_k} must be between 1 and the teacher's vocabulary size {vocab}.")
    manifest: dict[str, Any] = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "setup": setup_of(recipe, tokenizer),
        "writer": writer_settings(recipe, top_k, vocab, previous is None or "reads" in previous.get("writer", {})),
        "splits": {},
    }
    if previous is not None:
        _check_resumable(previous, manifest, out, ("setup", "writer"))
        manifest["splits"] = previous.get("splits", {})
    data_fps = {split: data_fingerprint(recipe, split, rows) for split, rows in rows_of.items() if rows is not None}
    for split, data_fp in data_fps.items():
        entry = manifest["splits"].get(split)
        if entry is not None and entry.get("data") != data_fp:
            raise mismatch_error(
                f"--out: {out} holds a '{split}' split cached from other data:",
                differences(entry.get("data", {}), data_fp, "data."),
                "Pass --overwrite to rebuild the cache, or choose another --out.",
            )

    model: torch.nn.Module | None = None
    served: ServedTeacher | None = None
    if server is not None:
        from kdcli.models.served import ServedTeacher

        say(f"Asking the teacher served at {public_url(server.url)} ({server.model})")
        served = ServedTeacher(server)
        server_info = served.check(tokenizer, top_k)
        teacher = {"teacher": {"id": recipe.teacher.model, "of": "server", "server": server_info}}
        teacher["served_at"] = public_url(server.url)  # not part of what a resumed cache must match: a URL moves
    else:
        say(f"Loading teacher {recipe.teacher.model}")
        model = load_teacher(recipe.teacher, runtime.inference_dtype).to(runtime.device)
        fingerprint = teacher_fingerprint(recipe.teacher.model, model)
        teacher = {"teacher": {**fingerprint, "parameters": model.num_parameters()}}
    manifest = {k: manifest[k] for k in ("format", "version")} | teacher | manifest
    if previous is not None:
        _check_resumable(previous, manifest, out, ("teacher",))
    score = served_scorer(served, top_k) if served is not None else local_scorer(model, runtime, manifest, recipe)
    job = _Job(recipe, out, manifest, tokenizer, runtime, model, served, score, started, on_progress, say)
    try:
        return _write_splits(job, splits, rows_of, data_fps)
    except ServerGone as gone:
        kept = sum(len(entry.get("shards", [])) for entry in manifest["splits"].values())
        raise KdError(
            f"{gone}; the {kept} finished shard(s) in {out} are kept: run the same command again to go on once it "
            "answers."
        ) from gone
    finally:
        if served is not None:
            served.close()


@dataclass
class _Job:
    """One `kd cache-teacher` run: where it writes, what scores the positions, and how it reports."""

    recipe: Recipe
    out: Path
    manifest: dict[str, Any]
    tokenizer: Any
    runtime: Runtime
    model: torch.nn.Module | None  # the local teacher, or None when it is served
    served: ServedTeacher | None
    score: Scorer
    started: float
    on_progress: Progress | None
    say: Callable[[str], None]


def _write_splits(
    job: _Job, splits: Sequence[str], rows_of: dict[str, Any], data_fps: dict[str, Any]
) -> dict[str, Any]:
    """Every split's shards after the last complete one, the manifest saved after each; returns the manifest."""
    recipe, out, manifest, on_progress, say = job.recipe, job.out, job.manifest, job.on_progress, job.say
    compute_seconds = 0.0  # forward + top-K + writing, without loading: what the writer's overhead is measured on
    collate = Collator.for_tokenizer(job.tokenizer)
    for split in splits:
        rows, data_fp = rows_of[split], data_fps[split]
        assert rows is not None
        entry = manifest["splits"].get(split)
        if entry is None:
            entry = {"data": data_fp, "shards": [], "complete": False}
            manifest["splits"][split] = entry
            _save_manifest(out, manifest)  # records the setup before any slow work, so a rerun can check it
        if entry.get("complete"):
            say(f"{split}: already cached ({len(entry['shards'])} shards)")
            continue
        examples = _examples(recipe, split, rows, job.model, job.served, job.tokenizer, out, on_progress, say)
        plan = shard_plan([len(ids) for ids in examples.input_ids], recipe.cache.shard_tokens)
        if entry.get("plan") not in (None, plan):
            raise KdError(f"--out: {out}: the '{split}' shard plan changed; pass --overwrite to rebuild the cache.")
        entry.update(plan=plan, examples=len(examples), tokens=examples.tokens, positions=examples.response_tokens)
        done = _verified_shards(out / split, entry["shards"], say)
        entry["shards"] = done
        total, progress = examples.tokens, sum(s["tokens"] for s in done)
        if on_progress:
            on_progress("cache", split, progress, total)
        for index in range(len(done), len(plan)):
            start, end = plan[index]

            def batch_done(tokens: int, split: str = split, base: int = progress, total: int = total) -> None:
                if on_progress:
                    on_progress("cache", split, base + tokens, total)

            shard_started = time.perf_counter()
            tensors, mass = _shard_tensors(job.score, examples, start, end, collate, manifest, batch_done)
            info = _write_shard(out / split, index, tensors)
            entry["shards"].append({**info, "rows": end - start, "tokens": int(tensors["lengths"].sum()), **mass})
            _save_manifest(out, manifest)  # last: the shard is only listed once it is durably on disk
            compute_seconds += time.perf_counter() - shard_started
            progress = sum(s["tokens"] for s in entry["shards"])
        entry["complete"] = True
    where = job.runtime.describe() if job.served is None else f"server {job.manifest.get('served_at')}"
    manifest["stats"] = cache_stats(manifest, time.perf_counter() - job.started) | {
        "shard_seconds_this_run": round(compute_seconds, 3),
        "device": where,
    }
    _save_manifest(out, manifest)
    return manifest


def _check_resumable(previous: dict[str, Any], current: dict[str, Any], out: Path, parts: Sequence[str]) -> None:
    recorded = {k: previous.get(k) for k in parts}
    wanted = {k: current[k] for k in parts}
    rows = differences(recorded, wanted)
    if rows:
        raise mismatch_error(
            f"--out: {out} is a teacher cache written with other settings:",
            rows,
            "Pass --overwrite to rebuild it, or choose another --out.",
        )


def _examples(
    recipe: Recipe,
    split: str,
    rows: Sequence[Any],
    model: torch.nn.Module | None,
    served: ServedTeacher | None,
    tokenizer: Any,
    out: Path,
    on_progress: Progress | None,
    say: Callable[[str], None],
) -> Examples:
    key = f"data.{split}"
    if recipe.data.responses == "dataset":
        return build_examples(rows, tokenizer, recipe.data, split, key, reads=True)  # type: ignore[arg-type]
    from kdcli.cache.generate import teacher_examples

    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    say(f"{split}: generating responses with the teacher")
    total = len(rows)

    def progress(done: int, _tokens: int, _seconds: float) -> None:
        if on_progress:
            on_progress("generate", split, done, total)

    teacher = served if served is not None else model
    return teacher_examples(recipe, split, rows, teacher, tokenizer, folder / fmt.RESPONSES, progress)  # type: ignore[arg-type]


def _verified_shards(folder: Path, shards: list[dict[str, Any]], say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The listed shards up to the first one that is missing or altered; later work is redone."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".shard-*"):  # temporaries of an interrupted write
        stale.unlink(missing_ok=True)
    kept: list[dict[str, Any]] = []
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file() or fmt.sha256_file(path) != shard["sha256"]:
            say(f"{path}: missing or altered; rebuilding from here")
            break
        kept.append(shard)
    if kept:
        say(f"{folder.name}: resuming after {len(kept)} complete shard(s)")
    return kept


def _shard_tensors(
    score: Scorer,
    examples: Examples,
    start: int,
    end: int,
    collate: Collator,
    manifest: dict[str, Any],
    on_batch: Callable[[int], None],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    import torch

    writer = manifest["writer"]
    id_dtype, lp_dtype = fmt.torch_dtype(writer["id_dtype"]), fmt.torch_dtype(writer["logprob_dtype"])
    offsets = bool(writer.get("reads"))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in fmt.FIELDS + (fmt.OFFSET_FIELDS if offsets else ())}
    batch_size = writer["batch_size"]
    for lo in range(start, end, batch_size):
        batch = collate(examples[lo : min(end, lo + batch_size)])
        record = score(batch)
        valid = batch["labels"] != fmt.IGNORE_INDEX
        lengths = batch["attention_mask"].sum(dim=1)
        for row, length in enumerate(lengths.tolist()):
            parts["input_ids"].append(batch["input_ids"][row, :length].to(id_dtype))
            parts["label_mask"].append(valid[row, :length].to(torch.uint8))
        parts["lengths"].append(lengths.to(torch.int32))
        parts["positions"].append(valid.sum(dim=1).to(torch.int32))
        parts["topk_ids"].append(record.topk_ids.to(id_dtype))
        parts["topk_logprobs"].append(record.topk_logprobs.to(lp_dtype))
        parts["label_logprob"].append(record.label_logprob.float())
        parts["tail_mass"].append(record.tail_mass.float())
        if offsets:
            assert examples.reads is not None
            parts["reads"] += [torch.tensor(examples.reads[i], dtype=torch.int32) for i in range(lo, lo + len(lengths))]
            parts["rows"].append(torch.tensor(examples.rows[lo : lo + len(lengths)], dtype=torch.int32))
        on_batch(int(torch.cat(parts["lengths"]).sum()))
    tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    mass = {"positions": int(tensors["tail_mass"].numel()), "topk_mass_sum": float((1 - tensors["tail_mass"]).sum())}
    return tensors, mass


def _write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Temporary name, fsync, rename, fsync the folder: a listed shard is always whole."""
    from safetensors.torch import save

    name = fmt.shard_name(index)
    # One metadata key: safetensors serialises metadata from a hash map, so several keys come out in random order
    # and two identical shards would differ in their sha256.
    payload = save(tensors, metadata={"format": f"{fmt.FORMAT}/{fmt.VERSION}"})
    write_bytes_atomic(folder / name, payload, share=True)  # mkstemp's 0600 would hide a shared cache
    return {"file": name, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def _save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / fmt.MANIFEST, manifest)


def cache_stats(manifest: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """Tokens, bytes per labelled position against dense fp16 (2 V bytes), mean top-K mass, wall time."""
    shards = [s for entry in manifest["splits"].values() for s in entry["shards"]]
    tokens = sum(s["tokens"] for s in shards)
    positions = sum(s["positions"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    vocab = manifest["writer"]["vocab"]
    per_position = size / positions if positions else 0.0
    return {
        "tokens": tokens,
        "positions": positions,
        "bytes": size,
        "bytes_per_position": round(per_position, 2),
        "dense_fp16_bytes_per_position": 2 * vocab,
        "fraction_of_dense": round(per_position / (2 * vocab), 6),
        "topk_mass_mean": sum(s["topk_mass_sum"] for s in shards) / positions if positions else 0.0,
        "wall_seconds": round(wall_seconds, 3),
    }
