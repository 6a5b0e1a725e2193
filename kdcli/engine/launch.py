"""`kd distill --nproc N`: start N copies of kd on this machine under torchrun's elastic agent, run in this process.

Every process runs the same `kd distill` command; the agent gives each its RANK, LOCAL_RANK and WORLD_SIZE. It runs
here rather than as a `torchrun` child so that kd reads its outcome: when a rank fails, the agent stops the others
(`--max-restarts 0`: a restarted rank could not rejoin a half-done step) and kd prints one line naming the rank and
the cause (`engine/failure.py`) instead of torchrun's report. Its logs and the ranks' reports go to a temporary
folder that is removed afterwards. For several machines, see docs/scale-out.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

from kdcli.engine.failure import LAUNCHER_ENV, RankFailure, describe, first_cause
from kdcli.errors import KdError

MONITOR_SECONDS = 0.1  # how often the agent looks at its workers: a dead rank is seen within this


class JobFailed(KdError):
    """A rank failed and the job ended: one line naming the rank and the cause, and the exit code to end with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def torchrun_args(nproc: int, log_dir: str, kd_args: list[str]) -> list[str]:
    """torchrun's command line for one machine: a rendezvous on a free local port, no restarts."""
    return [
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        f"--monitor-interval={MONITOR_SECONDS}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        f"--rdzv-id={uuid.uuid4()}",
        f"--log-dir={log_dir}",
        "-m",
        "kdcli",
        *kd_args,
    ]


def launch(nproc: int, kd_args: list[str], next_step: Callable[[], str]) -> int:
    """Run the command on `nproc` processes and return the exit code: 0, or 130 after Ctrl-C (each rank saved a
    checkpoint). A failed rank raises `JobFailed`; `next_step()` (how to carry on, read once the job has ended) ends
    its line when the rank's own message does not say.

    The ranks start in sessions of their own, so a Ctrl-C reaches the agent here once; it passes SIGINT on to each
    rank, which finishes its step, saves a checkpoint and exits."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    log_dir = tempfile.mkdtemp(prefix="kd-launch-")
    started = time.time()
    try:
        config, command, command_args = config_from_args(parse_args(torchrun_args(nproc, log_dir, kd_args)))
        with _worker_env(nproc), _quiet_agent():
            elastic_launch(config=config, entrypoint=command)(*command_args)
        return 0
    except SignalException as stop:
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        failures = [
            RankFailure(rank, f.exitcode, f.pid, _report(f.error_file_data), float(f.timestamp or started))
            for rank, f in failed.failures.items()
        ]
        message, code = describe(first_cause(failures), nproc, next_step())
        raise JobFailed(message, code) from None
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _report(data: object) -> dict[str, object] | None:
    return data if isinstance(data, dict) and isinstance(data.get("kd"), dict) else None


@contextlib.contextmanager
def _worker_env(nproc: int) -> Iterator[None]:
    """What the ranks inherit from this process: one thread each unless told otherwise (N processes share the
    cores), and the mark that kd's launcher reports their failures."""
    added = {LAUNCHER_ENV: "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    added = {key: value for key, value in added.items() if key not in os.environ or key == LAUNCHER_ENV}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _AgentChatter(logging.Filter):
    """The agent logs each step of a shutdown ("Sending process ... closing signal", "failed (exitcode: -9)");
    kd prints the one line that matters instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    chatter = _AgentChatter()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {
        h
        for lg in loggers
        if isinstance(lg, logging.Logger) and lg.name.startswith(("root", "torch"))
        for h in lg.handlers
    }
    for handler in handlers:
        handler.addFilter(chatter)
    # The agent installs its own handlers (a signal stops the ranks); they end with it.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(chatter)
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        sys.stderr.flush()
