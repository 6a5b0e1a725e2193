"""Two commands on one run folder or cache: the second is refused naming the first; a killed holder's lock is
taken over. The holder is a real second process, so the kernel's lock semantics are what is tested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distill import runner, tiny_recipe

from kdcli.cli import app

HOLD = """
import sys, time
from pathlib import Path
from kdcli.durable import FolderLock
lock = FolderLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def stop(holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_second_distill_on_a_folder_in_use_is_refused(tmp_path: Path, tiny_teacher: Path, extra: list[str]) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"max_steps": 2})
    run_dir = tmp_path / "runs" / "tiny"
    holder = hold_lock(run_dir)
    try:
        started = time.perf_counter()
        result = runner.invoke(app, ["distill", str(recipe), *extra])
        assert result.exit_code == 2, result.output
        assert f"pid {holder.pid}" in result.output and "in use by" in result.output
        assert "Traceback" not in result.output and not run_dir.exists()  # nothing written, nothing loaded
        assert time.perf_counter() - started < 30
    finally:
        stop(holder)
    # The holder was killed: its lock is stale and the next run takes it over.
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "run.json").is_file()


def test_resume_of_a_folder_in_use_is_refused(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"max_steps": 2, "save_every": 1})
    assert runner.invoke(app, ["distill", str(recipe)]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    before = (run_dir / "metrics.jsonl").read_bytes()
    holder = hold_lock(run_dir)
    try:
        result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.output, result.output
        assert (run_dir / "metrics.jsonl").read_bytes() == before  # untouched
    finally:
        stop(holder)


def test_a_second_cache_writer_is_refused(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher)
    out = tmp_path / "cache"
    holder = hold_lock(out)
    try:
        result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out), "--top-k", "4"])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.output, result.output
        assert not out.exists()
    finally:
        stop(holder)


def test_the_lock_is_released_after_a_run(tmp_path: Path) -> None:
    from kdcli.durable import FolderLock

    folder = tmp_path / "run"
    with FolderLock(folder):
        pass
    with FolderLock(folder) as again:  # the same process can take it again once released
        assert again.path.read_text().startswith(f"pid {os.getpid()} ")


def test_no_lock_file_outlives_its_command(tmp_path: Path, tiny_teacher: Path) -> None:
    runs = tmp_path / "runs"
    recipe = tiny_recipe(tmp_path, tiny_teacher, train={"max_steps": 2, "save_every": 1})
    assert runner.invoke(app, ["distill", str(recipe)]).exit_code == 0
    assert list(runs.glob(".*.lock")) == []
    failed = runner.invoke(app, ["distill", str(recipe), "--overwrite", "--set", "data.train=missing.jsonl"])
    assert failed.exit_code == 2 and "missing.jsonl" in failed.output, failed.output
    assert list(runs.glob(".*.lock")) == []  # a run that failed holding it too
    # A killed holder leaves its file; the next command takes the lock over and removes it with its own.
    holder = hold_lock(runs / "tiny")
    stop(holder)
    assert [p.name for p in runs.glob(".*.lock")] == [".tiny.lock"]
    (runs / "tiny" / "run.json").unlink()  # as if it had been killed after its last checkpoint, so resume has work
    assert runner.invoke(app, ["distill", "--resume", str(runs / "tiny")]).exit_code == 0
    assert list(runs.glob(".*.lock")) == []
    out = tmp_path / "cache"
    assert runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out), "--top-k", "4"]).exit_code == 0
    assert list(tmp_path.glob(".*.lock")) == []


def test_a_waiter_on_a_removed_lock_file_takes_the_new_one(tmp_path: Path) -> None:
    """Release removes the file: a process already waiting on it must not hold a lock on a file no one else sees."""
    import threading

    from kdcli.durable import FolderLock

    folder = tmp_path / "run"
    first, second, third = FolderLock(folder), FolderLock(folder), FolderLock(folder)
    first.acquire()
    waiting = threading.Event()
    waiter = threading.Thread(target=lambda: second.acquire(wait=lambda holder: waiting.set()))
    waiter.start()
    assert waiting.wait(10)
    time.sleep(0.3)  # the waiter now blocks on the file `first` holds
    first.release()
    waiter.join(10)
    assert not waiter.is_alive() and second.path.is_file()
    assert not third.try_acquire(), "two holders at once"
    second.release()
    assert third.try_acquire()
    third.release()
    assert not third.path.exists()
