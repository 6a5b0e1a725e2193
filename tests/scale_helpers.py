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


def start_kd(args: list[str], cwd: Path, torchrun: int = 0) -> subprocess.Popen[str]:
    """`kd ARGS` in its own session (so a SIGKILL can take the whole process group), optionally under torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}"] if torchrun else []
    command = [*(launcher or [sys.executable]), "-m", "kdcli", *args]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=kd_env(),
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
