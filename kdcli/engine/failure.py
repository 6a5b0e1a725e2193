"""A failed rank ends the job: every process exits within seconds, and the user reads one line naming the rank and
the cause.

A rank that fails (a `KdError` such as a full disk, a bug, a lost peer) writes a report and leaves the process at
once (`os._exit`), without joining another collective: the others may be waiting inside one of DeepSpeed's own
(a checkpoint's barrier, say) that it will never reach, and its sockets closing is what ends their wait. They fail
with a collective error, report that they lost a peer, and exit too; torchrun's agent stops whatever is left.

The report goes to the file torchrun names in `TORCHELASTIC_ERROR_FILE` (torchrun's own summary then shows kd's line
instead of "To enable traceback see ..."). kd's launcher (`kd distill --nproc N`, `engine/launch.py`) reads the
reports of every rank and prints the one that started it (`first_cause`): a rank's own failure before a rank that
only lost its peers, then the earliest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kdcli.engine.distributed import World
from kdcli.errors import KdError

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torchrun's agent for each worker
LAUNCHER_ENV = "KD_LAUNCHER"  # set by kd's launcher: it prints the one line, so the ranks stay quiet

# What a collective says when another rank is gone (gloo, NCCL, the c10d store): this rank did not fail first.
# Only a RuntimeError from torch.distributed carries these words; anything else is this rank's own failure.
_LOST_PEER = re.compile(
    r"connection (reset|closed|refused)|broken pipe|gloo|nccl|tcpstore|process ?group|heartbeat|watchdog",
    re.IGNORECASE,
)


def lost_peer(err: BaseException) -> bool:
    """Whether `err` (or an exception it arose from) is a collective that failed because another rank is gone."""
    import torch.distributed

    seen: BaseException | None = err
    chain: list[BaseException] = []
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    dist_error = getattr(torch.distributed, "DistError", ())
    return any(
        isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and _LOST_PEER.search(str(exc)))
        for exc in chain
        if not isinstance(exc, KdError)
    )


@contextlib.contextmanager
def ends_the_job(world: World, *passing: type[BaseException]) -> Iterator[None]:
    """In a job of several processes, a failure inside the block is reported and ends this process at once (exit
    code 2 for a `KdError`, 1 otherwise); `passing` exceptions (an agreed stop) go on as usual. In one process it
    does nothing: the caller's error handling applies."""
    if world.world_size <= 1:
        yield
        return
    try:
        yield
    except passing:
        raise
    except Exception as err:
        _exit(world, err)


def _exit(world: World, err: Exception) -> None:
    who = f"rank {world.rank} of {world.world_size}"
    peer = lost_peer(err)
    if isinstance(err, KdError):
        kind, code, line = "error", 2, f"{who}: {err}"
    elif peer:
        kind, code, line = "lost peer", 1, f"{who} lost contact with another rank ({_first_line(err)})"
    else:
        kind, code, line = "bug", 1, f"{who} failed with {type(err).__name__}: {_first_line(err)}"
        traceback.print_exc()  # a bug: its traceback is what a report needs
    written = write_report(line, kind, code)
    if not (written and os.environ.get(LAUNCHER_ENV)):
        print(f"error: {line}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def write_report(line: str, kind: str, code: int) -> bool:
    """This rank's report where torchrun's agent reads it; False when there is nowhere (or no room) to write it."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    now = time.time()
    report = {"message": line, "timestamp": int(now), "kd": {"kind": kind, "exit_code": code, "at": now}}
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class RankFailure:
    """What the launcher knows of one failed rank: its report (if it wrote one), else its exit code or signal."""

    rank: int
    exit_code: int  # negative: killed by that signal
    pid: int | None = None
    report: Mapping[str, Any] | None = None
    seen_at: float = 0.0

    @property
    def kind(self) -> str:
        if self.report is not None:
            return str(self.report.get("kd", {}).get("kind", "bug"))
        return "signal" if self.exit_code < 0 else "exit"

    @property
    def signal_name(self) -> str:
        with contextlib.suppress(ValueError):
            return signal.Signals(-self.exit_code).name
        return f"signal {-self.exit_code}"

    def priority(self) -> int:
        """Lower comes first: a rank's own error, a kill from outside, an unexplained exit, the agent's SIGTERM,
        and last a rank that only lost its peers."""
        if self.kind in ("error", "bug"):
            return 0
        if self.kind == "signal":
            return 3 if -self.exit_code == signal.SIGTERM else 1
        return 2 if self.kind == "exit" else 4

    def when(self) -> float:
        at = (self.report or {}).get("kd", {}).get("at")
        return float(at) if isinstance(at, int | float) else self.seen_at


def first_cause(failures: list[RankFailure]) -> RankFailure:
    return min(failures, key=lambda f: (f.priority(), f.when(), f.rank))


def describe(failure: RankFailure, world_size: int, next_step: str) -> tuple[str, int]:
    """The one line the launcher prints for the rank that ended the job, and the exit code it ends with."""
    who = f"rank {failure.rank} of {world_size}"
    stopped = f"every rank was stopped; {next_step}"
    if failure.report is not None:
        message = str(failure.report.get("message") or who)
        code = int(failure.report.get("kd", {}).get("exit_code", 1))
        # A KdError says how to carry on itself; a bug or a lost peer does not.
        return (message if failure.kind == "error" else f"{message}; {stopped}."), code
    pid = f" (pid {failure.pid})" if failure.pid else ""
    if failure.exit_code < 0:
        hint = " (out of memory? see `dmesg`)" if -failure.exit_code == signal.SIGKILL else ""
        return f"{who}{pid} was killed by {failure.signal_name}{hint}; {stopped}.", 128 - failure.exit_code
    return f"{who}{pid} exited with code {failure.exit_code} (see its output above); {stopped}.", failure.exit_code
