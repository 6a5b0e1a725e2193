"""The teacher cache: run the teacher once (`kd cache-teacher`), then train from its stored top-K (`teacher.cache`).

    manifest = write_cache(recipe, Path("caches/quickstart"))           # resumable; returns the manifest
    verify_cache(Path("caches/quickstart"))                            # sha256 of every shard, or a KdError
    root, manifest = read_manifest_for(recipe, print)                  # what `kd distill` uses, before and
    cache = open_for_training(recipe, root, manifest, tokenizer, vocab)  # after it builds the student

The format is described in `kdcli.cache.format` and `docs/cache.md`. Heavy imports (torch) happen only in the
submodules, so importing this package for its names is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdcli.cache.reader import CacheCollator, CachedSplit, CachedTeacher, verify_cache
    from kdcli.cache.training import CacheForTraining, open_for_training, read_manifest_for, splits_distill_reads
    from kdcli.cache.writer import write_cache

__all__ = [
    "CacheCollator",
    "CacheForTraining",
    "CachedSplit",
    "CachedTeacher",
    "open_for_training",
    "read_manifest_for",
    "splits_distill_reads",
    "verify_cache",
    "write_cache",
]

_WHERE = {
    "CacheCollator": "reader",
    "CachedSplit": "reader",
    "CachedTeacher": "reader",
    "verify_cache": "reader",
    "CacheForTraining": "training",
    "open_for_training": "training",
    "read_manifest_for": "training",
    "splits_distill_reads": "training",
    "write_cache": "writer",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"kdcli.cache.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'kdcli.cache' has no attribute {name!r}")
