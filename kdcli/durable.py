"""Durable files: what the model conversion, the teacher cache and checkpoints need to publish a write whole.

A write that fails (a full disk, or any other OSError) becomes `DiskFull`, one line naming the file the user knows,
the space it needed and the space left: `disk_errors` is the one place that translates, and the writers here use
it, so a failed write also leaves no temporary and no torn line behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdcli.errors import KdError
from kdcli.host import process_status
from kdcli.sizes import format_bytes

# Writers that do their own I/O (torch's zip writer, safetensors' Rust one) report a full disk in their own words.
_NO_SPACE = re.compile(r"no space left|os error 28|storagefull|disk quota exceeded", re.IGNORECASE)
_WRITE_FAILED = re.compile(r"iostream error|file write failed|unexpected pos|i/o error", re.IGNORECASE)


def json_lines(text: str) -> list[str]:
    """The lines of a JSON-lines text, split on "\n" only: how every kd reader splits one.

    str.splitlines also splits on U+2028, U+2029, U+0085 and other separators that JSON allows unescaped inside a
    string, and that json.dumps(..., ensure_ascii=False) writes as they are: a model's answer holding one would
    read as a torn line."""
    return text.split("\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int | None:
    """Read without `os.umask(0)`, which would briefly change it for every thread of the process."""
    value = process_status("Umask")
    try:
        return int(value, 8) if value else None
    except ValueError:
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


class DiskFull(KdError):
    """A write that failed (a full disk, or any other OSError): one line naming the path, the space it needed and
    the space left. `next_step` is how to carry on; the command that knows better (`kd distill`: resume) sets it."""

    def __init__(self, path: Path, needed: int | None, reason: str | None) -> None:
        self.path, self.needed, self.reason = Path(path), needed, reason
        self.free = free_bytes(self.path)
        self.next_step = "run the same command again; what finished is kept"
        super().__init__(str(self))

    def __str__(self) -> str:  # read when shown, so that `next_step` can still be changed on the way up
        space = f"{'?' if self.free is None else format_bytes(self.free)} free"
        if self.needed:
            space = f"needs ~{format_bytes(self.needed)}, {space}"
        if self.reason is None:
            return f"no space left on device writing {self.path} ({space}). Free space, then {self.next_step}."
        return f"could not write {self.path}: {self.reason} ({space}). Fix that, then {self.next_step}."


@contextlib.contextmanager
def disk_errors(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a failed write inside the block into `DiskFull` for `path` (what the user knows: the checkpoint, the
    shard, not a temporary name). Partial work is undone inside the block, so the free space reported is what the
    user will find. `needed`: the bytes the write takes, when known."""
    try:
        yield
    except KdError:
        raise
    except Exception as err:
        failure = _write_failure(err)
        if failure is None:
            raise
        code, reason = failure
        full = code in (errno.ENOSPC, errno.EDQUOT)
        if code is None:  # no errno to go by: a shortfall of space is the likely cause
            free = free_bytes(Path(path))
            full = needed is not None and free is not None and free < needed
        raise DiskFull(path, needed, None if full else reason) from err


def _write_failure(err: BaseException) -> tuple[int | None, str] | None:
    """(errno, reason) when `err` or an exception it arose from is a failed write; None for anything else."""
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for exc in chain:
        if isinstance(exc, OSError):
            return exc.errno, exc.strerror or str(exc)
    for exc in chain:
        if _NO_SPACE.search(str(exc)):
            return errno.ENOSPC, "no space left on device"
        if _WRITE_FAILED.search(str(exc)):
            return None, f"the write failed ({str(exc).splitlines()[0][:120]})"
    return None


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds `path` (or would: the nearest folder that exists)."""
    for folder in (path, *path.parents):
        if folder.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free
            return None
    return None


def tree_bytes(root: Path) -> int:
    """The bytes of every file under `root`: what writing that folder again will take."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_bytes_atomic(path: Path, data: bytes, *, share: bool = False) -> None:
    """Temporary name in the same folder, fsync, rename, fsync the folder: `path` is always whole or absent.

    `share` gives the file the umask's permissions instead of mkstemp's private 0600 (a cache a team shares).
    A failed write (a full disk) removes the temporary and raises `DiskFull`; the old `path`, if any, stays."""
    with disk_errors(path, len(data)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            if share:
                umask = current_umask()
                os.chmod(tmp, 0o666 & ~(0o022 if umask is None else umask))
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    fsync_dir(path.parent)


def append_text(path: Path, text: str) -> None:
    """Append `text` (whole lines) to `path`, or leave the file as it was: a failed append is cut back off, so a
    torn line cannot glue itself to the next line a resumed run appends. Raises `DiskFull`."""
    data = text.encode("utf-8")
    with disk_errors(path, len(data)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str, *, share: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), share=share)


def write_json(path: Path, data: Any, *, share: bool = False) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n", share=share)


class FolderLock:
    """An exclusive lock on a folder kd writes (a run folder, a cache, a converted built-in model), held by one
    process at a time.

    The lock is `flock` on `.<name>.lock` beside the folder, not inside it: `--overwrite` replaces the folder, and
    the lock must outlive that. It is removed when released, so no lock file outlives its command. The kernel drops
    a flock when its process dies, so a lock left by a killed run is simply taken over; the file's text (pid, host,
    command, start time) only tells the refused user who holds it.
    Where there is no flock (Windows) the lock holds nothing back.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self._handle: Any = None

    def acquire(self, *, wait: Callable[[str], None] | None = None) -> None:
        """Take the lock, or raise a `KdError` naming its holder; with `wait`, wait for the holder instead (`wait`
        first receives who holds it)."""
        if not self._take(blocking=False):
            if wait is None:
                raise KdError(
                    f"{self.folder}: in use by {self._holder()}. Wait for it to finish or stop it; "
                    "two commands never write one folder."
                )
            wait(self._holder())
            self._take(blocking=True)

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        return self._take(blocking=False)

    def _take(self, *, blocking: bool) -> bool:
        try:
            import fcntl
        except ImportError:
            return True
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115  (held for the lock's lifetime)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError:
                handle.close()
                return False
            if self._still_there(handle):
                break
            handle.close()  # the holder removed this file as it let go: lock the one at the path now
        self._handle = handle
        self._write_holder()
        return True

    def _still_there(self, handle: Any) -> bool:
        """Whether the file this handle locked is still the one at `path` (release unlinks it)."""
        try:
            here, locked = os.stat(self.path), os.fstat(handle.fileno())
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            return "another process"

    def _write_holder(self) -> None:
        import socket
        import sys
        import time

        handle = self._handle
        handle.seek(0)
        handle.truncate()
        command = " ".join(["kd", *sys.argv[1:]])[:200]
        holder = f"pid {os.getpid()} on {socket.gethostname()} ({command}, since {time.strftime('%H:%M:%S')})\n"
        # Unbuffered and allowed to fail: the text is a courtesy to a refused user, and a full disk must not stop
        # the command here (its first real write reports the full disk, with the path and the space).
        with contextlib.suppress(OSError):
            os.write(handle.fileno(), holder.encode("utf-8"))

    def release(self) -> None:
        """Remove the lock file, then let go. A process that opened it meanwhile and locks it next finds it gone
        (`_still_there`) and locks the path's new file instead, so two never hold the lock at once. A killed
        holder's file stays until the next command on the folder takes it over and releases it."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
