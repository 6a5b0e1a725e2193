"""Durable files: what the model conversion, the teacher cache and checkpoints need to publish a write whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int | None:
    """Read without `os.umask(0)`, which would briefly change it for every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path, *, share: bool = False) -> None:
    """Flush every file and folder under `root` before a rename publishes it. `share` also widens private 0600
    files (safetensors writes them so) to the umask, so that a folder shared by a team stays readable."""
    umask = current_umask() if share else None
    for dirpath, _, filenames in os.walk(root):
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            if umask is not None:
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def write_bytes_atomic(path: Path, data: bytes, *, share: bool = False) -> None:
    """Temporary name in the same folder, fsync, rename, fsync the folder: `path` is always whole or absent.

    `share` gives the file the umask's permissions instead of mkstemp's private 0600 (a cache a team shares)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if share:
            umask = current_umask()
            os.chmod(tmp, 0o666 & ~(0o022 if umask is None else umask))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
