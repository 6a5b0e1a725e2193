"""Durable files: what the model conversion, the teacher cache and checkpoints need to publish a write whole."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


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
