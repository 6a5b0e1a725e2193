"""Checkpoints in `<run>/checkpoints/step-NNNNNNNN/`: written whole or not at all, the newest N kept.

A checkpoint is first written into `.step-NNNNNNNN.tmp/` (every rank writes its own DeepSpeed shards and RNG
state there), `kd-state.json` goes in last, and only then is the folder renamed into place. A folder without
`kd-state.json`, or a leftover `.tmp` one, is what a killed run leaves behind; resume skips it with a warning.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdcli.durable import fsync_dir, fsync_tree
from kdcli.engine.distributed import World, barrier
from kdcli.engine.state import TrainingState
from kdcli.errors import KdError
from kdcli.runs import RunFolder

STATE_FILE = "kd-state.json"  # written last: its presence marks a complete checkpoint
_NAME = re.compile(r"step-(\d{8})")


def save_checkpoint(
    folder: RunFolder, state: TrainingState, write: Callable[[Path], None], world: World, keep: int, per_step: int
) -> Path:
    """Write model/optimizer/scheduler (`write`, called on every rank), RNG states and `state` atomically.

    `per_step`: micro-batches per optimizer step over all processes (the data position is step × per_step)."""
    root = folder.checkpoints_dir
    final = root / f"step-{state.step:08d}"
    tmp = root / f".{final.name}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{world.rank}.pt")
    barrier()
    if world.is_main:
        record = {**state.to_checkpoint(per_step), "world_size": world.world_size}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        prune(root, keep)
    barrier()
    return final


def resume_checkpoint(folder: RunFolder, world: World) -> Path:
    """The newest complete checkpoint of a run, checked to fit this launch, or one line saying why not."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise KdError(
            f"--resume {folder}: no complete checkpoint in {folder.checkpoints_dir}; "
            "set train.save_every to write them."
        )
    saved_world = read_state(checkpoint).get("world_size", 1)
    if saved_world != world.world_size:
        raise KdError(
            f"--resume {folder}: {checkpoint.name} was written by {saved_world} process(es); "
            f"resume with --nproc {saved_world}."
        )
    return checkpoint


def latest_checkpoint(folder: RunFolder) -> Path | None:
    """The newest complete checkpoint; partial ones are skipped with a warning."""
    root = folder.checkpoints_dir
    if not root.is_dir():
        return None
    complete = []
    for path in sorted(root.iterdir()):
        if _NAME.fullmatch(path.name) and (path / STATE_FILE).is_file():
            complete.append(path)
        elif path.name.startswith((".step-", "step-")):
            warnings.warn(f"ignoring partial checkpoint {path} (the run was killed while writing it)", stacklevel=2)
    return complete[-1] if complete else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and drop leftovers of interrupted writes."""
    complete = sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file())
    stale = [
        p for p in root.iterdir() if p.name.startswith(".step-") or (p not in complete and _NAME.fullmatch(p.name))
    ]
    for path in complete[:-keep] + stale:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(checkpoint: Path, world: World) -> None:
    state = torch.load(checkpoint / f"rng-rank{world.rank}.pt", weights_only=False)  # python's state is a tuple
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
