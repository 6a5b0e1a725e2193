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


class FolderLock:
    """An exclusive lock on a folder kd writes (a run folder, a cache), held by one process at a time.

    The lock is `flock` on `.<name>.lock` beside the folder, not inside it: `--overwrite` replaces the folder, and
    the lock must outlive that. The kernel drops a flock when its process dies, so a lock left by a killed run is
    simply taken over; the file's text (pid, host, command, start time) only tells the refused user who holds it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self._handle: Any = None

    def acquire(self) -> None:
        import fcntl
        import socket
        import sys
        import time

        from kdcli.errors import KdError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115  (held for the lock's lifetime)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise KdError(
                f"{self.folder}: in use by {holder}. Wait for it to finish or stop it; "
                "two commands never write one folder."
            ) from None
        handle.seek(0)
        handle.truncate()
        command = " ".join(["kd", *sys.argv[1:]])[:200]
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({command}, since {time.strftime('%H:%M:%S')})\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            # The file stays: unlinking it would let a third process lock a new file while a second waits on this one.
            self._handle.close()
            self._handle = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
