"""Checkpoints in `<run>/checkpoints/step-NNNNNNNN/`: written whole or not at all, the newest N kept.

A checkpoint is first written into `.step-NNNNNNNN.tmp/` (every rank writes its own DeepSpeed shards and RNG
state there), `kd-state.json` goes in last, and only then is the folder renamed into place; older checkpoints are
pruned only after that. A folder without `kd-state.json`, or a leftover `.tmp` one, is what a killed run leaves
behind; resume skips it with a warning. A write that fails (a full disk) removes its `.tmp` folder and raises
`DiskFull` naming the checkpoint: the previous one is untouched and the run resumes from it.

`kd-state.json` also lists the size of every file beside it, so that resume can tell a checkpoint that a damaged
disk or an interrupted copy cut short (`checkpoint_problem`): it is skipped with a warning, and the run resumes from
the one before it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdcli.durable import disk_errors, fsync_dir, fsync_tree, tree_bytes
from kdcli.engine.distributed import World, barrier
from kdcli.engine.state import TrainingState
from kdcli.errors import KdError, KdWarning
from kdcli.runs import RunFolder

STATE_FILE = "kd-state.json"  # written last: its presence marks a complete checkpoint
_NAME = re.compile(r"step-(\d{8})")


def save_checkpoint(
    folder: RunFolder,
    state: TrainingState,
    write: Callable[[Path], None],
    world: World,
    keep: int,
    per_step: int,
    *,
    needed: int | None = None,
) -> Path:
    """Write model/optimizer/scheduler (`write`, called on every rank), RNG states and `state` atomically.

    `per_step`: micro-batches per optimizer step over all processes (the data position is step × per_step).
    `needed`: the bytes a checkpoint takes when there is none yet to measure (named if the disk is full)."""
    root = folder.checkpoints_dir
    final = root / f"step-{state.step:08d}"
    tmp = root / f".{final.name}.tmp"
    previous = _complete(root)[-1:] if world.is_main and root.is_dir() else []
    with disk_errors(final, tree_bytes(previous[0]) if previous else needed):
        try:
            _on_every_rank(lambda: _fresh(tmp) if world.is_main else None)
            _on_every_rank(lambda: _write_parts(write, tmp, world))
            record = {**state.to_checkpoint(per_step), "world_size": world.world_size}
            _on_every_rank(lambda: _publish(tmp, final, record) if world.is_main else None)
        except BaseException:
            if world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if world.is_main:
        prune(root, keep)  # only now that the new checkpoint is in place
    barrier()
    return final


def _fresh(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _write_parts(write: Callable[[Path], None], tmp: Path, world: World) -> None:
    write(tmp)
    with open(tmp / f"rng-rank{world.rank}.pt", "wb") as handle:  # a file object: a full disk raises OSError
        torch.save(rng_state(), handle)


def _publish(tmp: Path, final: Path, record: dict[str, Any]) -> None:
    """`kd-state.json` last, everything flushed, then one rename: `final` is complete or absent."""
    files = sorted(path for path in tmp.rglob("*") if path.is_file())
    record = {**record, "files": {str(path.relative_to(tmp)): path.stat().st_size for path in files}}
    (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _on_every_rank(work: Callable[[], None]) -> None:
    """Run this rank's share of a checkpoint, then wait for every other rank's. A rank whose share fails raises
    without joining the barrier: it may have failed inside DeepSpeed's own collectives (a shard written between two
    of its barriers), where any collective of ours would pair with one of theirs and wait forever. Under a launcher
    the failure ends the job (`engine/failure.py`): the failed rank exits, and the others' barrier fails at once."""
    work()
    barrier()


def resume_checkpoint(folder: RunFolder, world: World) -> Path:
    """The newest complete checkpoint of a run, checked to fit this launch, or one line saying why not. The
    metrics that resume truncates to it are read too, so that a damaged line stops here, before any slow work."""
    folder.refuse_finished()
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        damaged = _complete(folder.checkpoints_dir) if folder.checkpoints_dir.is_dir() else []
        if damaged:
            raise KdError(
                f"--resume {folder}: no usable checkpoint in {folder.checkpoints_dir} ({damaged[-1].name}: "
                f"{checkpoint_problem(damaged[-1])}). Restore them from a copy, or start the run over with --overwrite."
            )
        raise KdError(
            f"--resume {folder}: no complete checkpoint in {folder.checkpoints_dir}; "
            "set train.save_every to write them."
        )
    folder.read_metrics(warn=world.is_main)
    saved_world = read_state(checkpoint).get("world_size", 1)
    if saved_world != world.world_size:
        raise KdError(
            f"--resume {folder}: {checkpoint.name} was written by {saved_world} process(es); "
            f"resume with --nproc {saved_world}."
        )
    return checkpoint


def latest_checkpoint(folder: RunFolder) -> Path | None:
    """The newest complete, undamaged checkpoint; partial and damaged ones are skipped with a warning."""
    root = folder.checkpoints_dir
    if not root.is_dir():
        return None
    complete = _complete(root)
    for path in sorted(root.iterdir()):
        if path not in complete and path.name.startswith((".step-", "step-")):
            message = f"ignoring partial checkpoint {path} (the run was killed while writing it)"
            warnings.warn(message, KdWarning, stacklevel=2)
    for path in reversed(complete):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(
            f"ignoring damaged checkpoint {path}: {problem}; trying the one before it", KdWarning, stacklevel=2
        )
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from, or None. A kill cannot cause this (the rename publishes
    only whole checkpoints); a damaged disk or a copy cut short can. Sizes and file structure, no tensors read."""
    try:
        state = read_state(checkpoint)
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{STATE_FILE} is unreadable ({(str(err).splitlines() or [type(err).__name__])[0][:120]})"
    if not isinstance(state, dict) or type(state.get("step")) is not int:
        return f"{STATE_FILE} has no step"
    sizes = state.get("files")  # absent in checkpoints of older kd versions
    for name, size in (sizes if isinstance(sizes, dict) else {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is cut short ({path.stat().st_size} of {size} bytes)"
    for path in sorted(checkpoint.rglob("*.pt")):
        with path.open("rb") as handle:
            magic = handle.read(2)
        # torch.save writes a zip, whose directory is at the end: a file cut short has none.
        if len(magic) < 2 or (magic == b"PK" and not zipfile.is_zipfile(path)):
            return f"{path.relative_to(checkpoint)} is cut short or damaged"
    return None


def load_checkpoint(checkpoint: Path, load: Callable[[Path], None], world: World) -> TrainingState:
    """The state saved in `checkpoint`, with the model, optimizer and schedule (`load`, on every rank) and the RNG
    restored; a file that cannot be read is one line naming the checkpoint (`checkpoint_problem` catches most
    damage before anything loads, but not bytes changed in place)."""
    state = TrainingState.from_checkpoint(read_state(checkpoint))
    try:
        load(checkpoint)
        restore_rng(checkpoint, world)
    except torch.OutOfMemoryError:
        raise
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise KdError(
            f"--resume: {checkpoint} cannot be loaded ({reason}). Move that folder out of "
            f"{checkpoint.parent} to resume from the checkpoint before it."
        ) from err
    return state


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first: only a finished write puts `kd-state.json` in a `step-` folder."""
    return sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file())


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and drop leftovers of interrupted writes."""
    complete = _complete(root)
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
