"""Reading a teacher cache: memory-mapped shards, checked lazily, served as training examples.

Memory stays flat in the cache size: a split keeps only per-example offsets in memory; tensors are sliced out of
the memory-mapped safetensors files (`safe_open(...).get_slice`) one example at a time. Each shard's sha256 is
checked on its first open in the process, so a truncated or altered file is an error naming it, never a wrong
tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, overload

import torch

from kdcli.cache import format as fmt
from kdcli.data import Collator
from kdcli.errors import KdError
from kdcli.losses import SparseTeacher

Batch = dict[str, torch.Tensor]
TEACHER_FIELDS = ("topk_ids", "topk_logprobs", "label_logprob", "tail_mass")


def shard_error(path: Path, problem: str) -> KdError:
    return KdError(f"teacher cache shard {path}: {problem}; {fmt.REBUILD} (only this and later shards are redone).")


def incomplete_error(key: str, root: Path, split: str, entry: dict[str, Any]) -> KdError:
    return KdError(
        f"{key}: the '{split}' split of {root} is incomplete ({len(entry.get('shards', []))} of "
        f"{len(entry.get('plan', []))} shards); re-run `kd cache-teacher` with the same recipe to finish it."
    )


@dataclass
class _Shard:
    path: Path
    sha256: str
    size: int
    first: int  # global index of its first example
    rows: int
    handle: Any = None
    token_start: list[int] | None = None
    position_start: list[int] | None = None


class CachedSplit(Sequence[dict[str, Any]]):
    """One cached split as a sequence of examples: `input_ids`, unshifted `labels`, and the teacher records."""

    def __init__(self, root: Path, split: str, entry: dict[str, Any], key: str = "teacher.cache") -> None:
        self.root, self.split, self.entry, self.key = root, split, entry, key
        if not entry.get("complete"):
            raise incomplete_error(key, root, split, entry)
        self.shards: list[_Shard] = []
        first = 0
        for info in entry["shards"]:
            self.shards.append(_Shard(root / split / info["file"], info["sha256"], info["bytes"], first, info["rows"]))
            first += info["rows"]
        self._length = first
        self._starts = [s.first for s in self.shards]

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        shard = self.shards[_bisect(self._starts, index)]
        self._open(shard)
        local = index - shard.first
        assert shard.token_start is not None and shard.position_start is not None
        t0, t1 = shard.token_start[local], shard.token_start[local + 1]
        p0, p1 = shard.position_start[local], shard.position_start[local + 1]
        ids = shard.handle.get_slice("input_ids")[t0:t1].to(torch.long)
        mask = shard.handle.get_slice("label_mask")[t0:t1].bool()
        labels = torch.full_like(ids, fmt.IGNORE_INDEX)
        labels[1:][mask[:-1]] = ids[1:][mask[:-1]]  # unshifted, as `tokenize_example` builds them
        example: dict[str, Any] = {"input_ids": ids.tolist(), "labels": labels.tolist()}
        for name in TEACHER_FIELDS:
            example[name] = shard.handle.get_slice(name)[p0:p1]
        return example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> list[int]:
        """Tokens of each example, from the shards' indexes alone (batching by length reads no records)."""
        out: list[int] = []
        for shard in self.shards:
            self._open(shard)
            assert shard.token_start is not None
            out += [b - a for a, b in zip(shard.token_start, shard.token_start[1:], strict=False)]
        return out

    def _open(self, shard: _Shard) -> None:
        if shard.handle is not None:
            return
        from safetensors import safe_open

        check_shard(shard.path, shard.sha256, shard.size)
        try:
            shard.handle = safe_open(str(shard.path), framework="pt")
            lengths = shard.handle.get_tensor("lengths").tolist()
            positions = shard.handle.get_tensor("positions").tolist()
        except Exception as err:  # a file that hashes right but does not parse: written by another format version
            raise shard_error(shard.path, f"unreadable ({err})") from None
        if len(lengths) != shard.rows:
            raise shard_error(shard.path, f"holds {len(lengths)} examples, the manifest lists {shard.rows}")
        shard.token_start, shard.position_start = _cumulative(lengths), _cumulative(positions)

    def alignment(self) -> tuple[list[int], list[list[int]]]:
        """Each example's data row and what its labelled positions have read of the response (the `rows` and
        `reads` a cache written with `writer.reads` holds), to pair them with a student of another tokenizer."""
        rows: list[int] = []
        reads: list[list[int]] = []
        for shard in self.shards:
            self._open(shard)
            assert shard.position_start is not None
            try:
                flat = shard.handle.get_tensor("reads").tolist()
                rows += shard.handle.get_tensor("rows").tolist()
            except Exception as err:  # listed and hashed, but without the tensors: another kd wrote it
                raise shard_error(shard.path, f"has no character offsets ({err})") from None
            starts = shard.position_start
            reads += [flat[a:b] for a, b in pairwise(starts)]
        return rows, reads

    def stats(self) -> dict[str, Any]:
        return {
            "source": f"{self.root} ({self.split}, from {self.entry['data']['source']})",
            "examples": len(self),
            "tokens": self.entry.get("tokens"),
            "response_tokens": self.entry.get("positions"),
            "shards": len(self.shards),
        }


def _cumulative(values: list[int]) -> list[int]:
    out = [0]
    for value in values:
        out.append(out[-1] + value)
    return out


def _bisect(starts: list[int], index: int) -> int:
    import bisect

    return bisect.bisect_right(starts, index) - 1


def check_shard(path: Path, sha256: str, size: int) -> None:
    """Refuse a missing, truncated or altered shard by name (size first: it costs nothing)."""
    if not path.is_file():
        raise shard_error(path, "missing")
    actual = path.stat().st_size
    if actual != size:
        raise shard_error(path, f"{actual} bytes, the manifest lists {size} (truncated or altered)")
    if fmt.sha256_file(path) != sha256:
        raise shard_error(path, "sha256 differs from the manifest (altered)")


def stacked_records(examples: Sequence[dict[str, Any]], top_k: int) -> SparseTeacher:
    """The cached examples' records, one after another: [P, K] over their labelled positions in order."""
    return SparseTeacher(
        torch.cat([example["topk_ids"].to(torch.long) for example in examples]).reshape(-1, top_k),
        torch.cat([example["topk_logprobs"].float() for example in examples]).reshape(-1, top_k),
        torch.cat([example["label_logprob"].float() for example in examples]),
        torch.cat([example["tail_mass"].float() for example in examples]),
    )


class CacheCollator:
    """Pads like `Collator` and adds the teacher records, laid out [B, T, K] on the labelled positions."""

    def __init__(self, pad_token_id: int | None, top_k: int) -> None:
        self.base = Collator(pad_token_id)
        self.top_k = top_k

    def __call__(self, examples: Sequence[dict[str, Any]]) -> Batch:
        batch = self.base(examples)
        valid = batch["labels"] != fmt.IGNORE_INDEX
        for row, example in enumerate(examples):
            if int(valid[row].sum()) != len(example["tail_mass"]):
                raise KdError(
                    f"teacher cache: an example has {int(valid[row].sum())} labelled positions but "
                    f"{len(example['tail_mass'])} teacher records; {fmt.REBUILD}."
                )
        records = stacked_records(examples, self.top_k).placed(batch["labels"])
        return {
            **batch,
            "topk_ids": records.topk_ids,
            "topk_logprobs": records.topk_logprobs,
            "label_logprob": records.label_logprob,
            "tail_mass": records.tail_mass,
        }


class CachedTeacher:
    """A `TeacherSource` that reads the teacher's targets from the batch (put there by `CacheCollator`)."""

    def __init__(self, manifest: dict[str, Any], root: Path) -> None:
        self.temperature = float(manifest["setup"]["temperature"])
        self.description = f"{manifest['teacher']['id']} (cached in {root})"
        self.num_parameters = int(manifest["teacher"].get("parameters", 0))

    def targets(self, batch: Batch) -> SparseTeacher:
        return SparseTeacher(
            batch["topk_ids"], batch["topk_logprobs"], batch["label_logprob"], batch["tail_mass"], self.temperature
        )

    def records(self, batch: Batch, k: int, temperature: float) -> SparseTeacher:
        """Across tokenizers: the records of the batch's teacher positions, [P, K] in order (`cache_records`)."""
        return SparseTeacher(*(batch[f"teacher_{name}"] for name in TEACHER_FIELDS), self.temperature)


def cache_records(examples: Sequence[dict[str, Any]], top_k: int) -> Batch:
    """The teacher part of a batch across tokenizers: the cached examples' records, `teacher_` before each name."""
    records = stacked_records(examples, top_k)
    return {f"teacher_{name}": getattr(records, name) for name in TEACHER_FIELDS}


def open_split(root: Path, manifest: dict[str, Any], split: str, key: str = "teacher.cache") -> CachedSplit:
    entry = manifest["splits"].get(split)
    if entry is None:
        raise KdError(f"{key}: {root} has no '{split}' split. Write it with: kd cache-teacher RECIPE --split {split}")
    return CachedSplit(root, split, entry, key)


def verify_cache(root: Path, on_shard: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Check every listed shard's size and sha256 and that each split is complete; return the manifest."""
    manifest = fmt.read_manifest(root, "--verify")
    for split, entry in manifest.get("splits", {}).items():
        for info in entry.get("shards", []):
            path = root / split / info["file"]
            check_shard(path, info["sha256"], info["bytes"])
            if on_shard:
                on_shard(path)
        if not entry.get("complete"):
            raise incomplete_error("--verify", root, split, entry)
    return manifest
