"""The on-disk format of a teacher cache: the folder layout, the shard tensors, and `manifest.json`.

    DIR/manifest.json                    what was cached, from what, and every finished shard with its sha256
    DIR/<split>/shard-00000.safetensors  one shard: consecutive examples of the split
    DIR/<split>/responses.jsonl          `data.responses: teacher` only: the generated responses

A shard holds, for its examples concatenated in order (N tokens, P labelled positions):

    input_ids      [N]     uint16 when the vocabulary fits (V <= 65,536), else int32
    label_mask     [N]     uint8: 1 where position t has a label (the response token at t+1), as the collator shifts
    lengths        [n]     int32 tokens per example
    positions      [n]     int32 labelled positions per example
    topk_ids       [P, K]  uint16 / int32
    topk_logprobs  [P, K]  fp16 or bf16 (`cache.logprob_dtype`), log p of the teacher at the cache temperature
    label_logprob  [P]     float32: log p of the label token, in or out of the top K (ATKD needs it)
    tail_mass      [P]     float32: 1 - sum of the top-K probabilities
    reads          [P]     int32: the response characters each labelled position has read, -1 inside a character
                           (`kdcli.data.alignment`); what pairs the positions with a student of another tokenizer
    rows           [n]     int32: the data row of each example

Only labelled positions carry teacher records: prompt positions have no loss, and a record costs K times more
than the one-byte mask that says where they are. The labels are the input ids shifted where the mask is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcli.durable import fsync_dir, sha256_file  # noqa: F401  (re-exported for the cache package)
from kdcli.errors import KdError

FORMAT = "kd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
RESPONSES = "responses.jsonl"
SPLITS = ("train", "eval")
UINT16_VOCAB = 65_536
IGNORE_INDEX = -100
FIELDS = ("input_ids", "label_mask", "lengths", "positions", "topk_ids", "topk_logprobs", "label_logprob", "tail_mass")
# Written since kd could pair the teacher's positions with another tokenizer's (`writer.reads` in the manifest): a
# cache without them trains students of the teacher's tokenizer only.
OFFSET_FIELDS = ("reads", "rows")
REBUILD = "re-run `kd cache-teacher` with the same recipe and --out to rebuild it"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def id_dtype_name(vocab: int) -> str:
    return "uint16" if vocab <= UINT16_VOCAB else "int32"


def torch_dtype(name: str) -> Any:
    import torch

    return {"uint16": torch.uint16, "int32": torch.int32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def is_cache_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path, key: str = "cache") -> dict[str, Any]:
    """The manifest of the cache at `path`, or a KdError naming `key`, the folder and what to do."""
    file = path / MANIFEST
    if not path.is_dir():
        raise KdError(f"{key}: no such folder '{path}'. Write the cache first: kd cache-teacher RECIPE --out {path}")
    if not file.is_file():
        raise KdError(
            f"{key}: '{path}' is not a teacher cache (no {MANIFEST}). Write one with: kd cache-teacher RECIPE --out "
            f"{path}"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise KdError(f"{key}: {file} is unreadable ({err}); {REBUILD}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KdError(f"{key}: {file} is not a kd teacher cache manifest; {REBUILD}.")
    if manifest.get("version") != VERSION:
        raise KdError(
            f"{key}: {path} has cache format version {manifest.get('version')}, this kd reads version {VERSION}; "
            f"{REBUILD}."
        )
    return manifest
