"""Shared by test_scale.py and test_resume.py: kd in a subprocess, waiting for files, reading loss curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kd_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def start_kd(
    args: list[str], cwd: Path, torchrun: int | list[str] = 0, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`kd ARGS` in its own session (so a SIGKILL can take the whole process group), optionally under torchrun
    (`torchrun`: the process count, or torchrun's own arguments); `env` adds to kd's environment."""
    options = [f"--nproc_per_node={torchrun}"] if isinstance(torchrun, int) else torchrun
    launcher = [sys.executable, "-m", "torch.distributed.run", *options] if torchrun else []
    command = [*(launcher or [sys.executable]), "-m", "kdcli", *args]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**kd_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_kd(
    args: list[str], cwd: Path, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`kd ARGS` in a subprocess; `env` adds to (or replaces) kd's environment."""
    return subprocess.run(
        [sys.executable, "-m", "kdcli", *args],
        cwd=cwd,
        env={**kd_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"kd exited ({process.returncode}) before {path} appeared:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def step_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines) if "loss" in record}


def stop_tree(process: subprocess.Popen[str]) -> None:
    """Kill `process`, every process it started (kd's launcher starts its ranks in sessions of their own, so its
    process group alone would miss them) and its process group; a no-op for whatever already exited."""
    import contextlib
    import signal

    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def full_disk_on_rank(tmp_path: Path, rank: int, pattern: str) -> dict[str, str]:
    """The environment under which, in the process of rank `rank` only, writes to paths matching `pattern` fail
    with ENOSPC (test_full_disk.FullDisk, installed at interpreter start by a `sitecustomize` on PYTHONPATH)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == os.environ.get('KD_TEST_FULL_DISK_RANK'):\n"
        "    import sys\n"
        f"    sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "    import pytest\n"
        "    from test_full_disk import FullDisk\n"
        "    FullDisk(os.environ['KD_TEST_FULL_DISK']).install(pytest.MonkeyPatch())\n",
        encoding="utf-8",
    )
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "KD_TEST_FULL_DISK_RANK": str(rank), "KD_TEST_FULL_DISK": pattern}
