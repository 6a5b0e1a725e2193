"""Distillation: the teacher runs under no_grad, the student trains with AdamW, in one process or on DeepSpeed.

Read top to bottom, `distill` is the recipe: set up (check the run folder, load models, tokenize data), score the
eval set, train (checkpointing every `train.save_every` steps), score again, save the student and the run record.
The parts are in `setup` (what is built before the loop), `loop` (one step, one eval, checkpoints) and `state`
(what a checkpoint saves).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from kdcli.durable import DiskFull
from kdcli.engine.checkpoint import latest_checkpoint, resume_checkpoint
from kdcli.engine.distributed import (
    StopRequest,
    World,
    barrier,
    check_global_batch,
    deepspeed_config,
    uses_deepspeed,
    world_from_env,
)
from kdcli.engine.loop import Session
from kdcli.engine.observer import Observer, SilentObserver
from kdcli.engine.setup import prepare, runtime_for, save_student, seed_everything
from kdcli.engine.state import TrainingState
from kdcli.hardware import Runtime, environment_info
from kdcli.models import count_parameters, count_trainable
from kdcli.recipe import Recipe
from kdcli.runs import MetricsLog, RunFolder, RunRecord

DEEPSPEED_FILE = "deepspeed.json"  # the resolved DeepSpeed config, as the run used it


def distill(
    recipe: Recipe, *, overwrite: bool = False, observer: Observer | None = None, resume: Path | None = None
) -> dict[str, Any]:
    """Run the recipe end to end and return the record that is also written to `run.json`.

    `resume` is a run folder: training continues from its newest complete checkpoint. Under a launcher
    (torchrun, deepspeed) every process runs this function; only rank 0 reports and writes the run folder.
    """
    world = world_from_env()
    observer = observer if observer and world.is_main else SilentObserver()
    started = time.perf_counter()
    folder = RunFolder.existing(resume) if resume else RunFolder.for_recipe(recipe)
    check_global_batch(recipe, world.world_size)
    ds_config = deepspeed_config(recipe, world.world_size) if uses_deepspeed(recipe, world) else None
    runtime = runtime_for(recipe, world, ds_config)  # a missing GPU is refused before the folder is touched
    with folder.lock() if world.is_main else contextlib.nullcontext():
        checkpoint = resume_checkpoint(folder, world) if resume else None
        if world.is_main and not resume:
            folder.refuse_existing(overwrite)  # before any slow work
        try:
            return _distill(recipe, folder, world, runtime, ds_config, observer, overwrite, checkpoint, started)
        except DiskFull as err:
            # "run it again" would be refused: the folder is not empty
            err.next_step = how_to_continue(folder, world.world_size)
            raise


def resume_command(folder: RunFolder, processes: int) -> str:
    return f"kd distill --resume {folder}" + (f" --nproc {processes}" if processes > 1 else "")


def how_to_continue(folder: RunFolder, processes: int) -> str:
    """After a run stopped part-way: resume from its newest checkpoint, or start it over when it has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the partial checkpoints were reported when the run resumed
        if folder.recipe_file.is_file() and latest_checkpoint(folder) is not None:
            return f"resume with `{resume_command(folder, processes)}`"
    return "run the recipe again with --overwrite (no checkpoint was finished to resume from)"


def _distill(
    recipe: Recipe,
    folder: RunFolder,
    world: World,
    runtime: Runtime,
    ds_config: dict[str, Any] | None,
    observer: Observer,
    overwrite: bool,
    checkpoint: Path | None,
    started: float,
) -> dict[str, Any]:
    seed_everything(recipe.seed)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    parts = prepare(recipe, runtime, observer)
    recipe = parts.recipe  # with the layers it chose, for the run folder's recipe.yaml
    session = Session.start(recipe, parts, runtime, world, ds_config)

    if world.is_main:
        if checkpoint is None:
            folder.create(recipe, overwrite)
        if ds_config:
            folder.write_json(DEEPSPEED_FILE, ds_config)
    state = session.restore(checkpoint) if checkpoint else TrainingState()
    if checkpoint is not None and world.is_main:
        folder.truncate_metrics(state.step)
    start_step = state.step
    wall = _Clock(state.wall_seconds, started)
    observer.on_start(_start_info(session, folder, state))
    if session.heads.note:
        observer.message(f"Plain logits (loss.fused: auto): {session.heads.note}")
    if checkpoint is None:
        state.eval_before = session.score()
        if state.eval_before:
            state.evals = [{"step": 0, **state.eval_before}]
            observer.on_eval({"step": 0, **state.eval_before})

    last, eval_after = train(session, state, folder, observer, wall)

    observer.message("Saving student")
    full_weights = session.backend.full_state_dict()  # a collective under ZeRO-3: every rank takes part
    if world.is_main:
        save_student(
            parts.student, parts.tokenizer, folder.student_dir, runtime, full_weights, adapter=folder.adapter_dir
        )
    record = _record(session, state, folder, start_step, last, eval_after, ds_config, wall.seconds())
    if world.is_main:
        folder.write_record(record)
    barrier()  # no rank leaves (and tears down the process group) before rank 0 has written the run
    summary = record.as_dict()
    observer.on_end(summary)
    return summary


def train(
    session: Session, state: TrainingState, folder: RunFolder, observer: Observer, wall: _Clock | None = None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Steps from `state.step` to the end, then the final eval; returns the last step's metrics (those restored
    with `state` when no step is left) and that eval. `wall`: the run's wall clock, saved with each checkpoint.

    Ctrl-C or SIGTERM stops after a whole step, saves a checkpoint and raises `RunInterrupted`."""
    cfg, world, total = session.recipe.train, session.world, session.total_steps
    metrics = folder.metrics_log() if world.is_main else None
    batches = session.batches(state)
    clock = _Clock(state.train_seconds)
    wall = wall or _Clock(state.wall_seconds)
    session.backend.model.train()
    try:
        with StopRequest().installed() as stop:
            for step in range(state.step + 1, total + 1):
                record, stats, tokens, stopping = session.step(batches, stop.requested, state)
                state.step, state.tokens_seen = step, state.tokens_seen + tokens
                state.gen_tokens += record["gen_tokens"]  # on-policy sampling, all processes
                state.gen_seconds += record["gen_s"]
                state.train_seconds = clock.seconds()
                last = state.last_step = {"step": step, **record, "elapsed_s": state.train_seconds, **stats}
                if metrics and cfg.logs_step(step, total):
                    metrics.write(last)
                observer.on_step({**last, "total_steps": total, "tokens_seen": state.tokens_seen})
                if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                    _log_eval(state, step, session.score(), metrics, observer)
                    session.adapt(state)  # `on_policy.schedule: adaptive` follows the eval loss
                    session.backend.model.train()
                if (cfg.save_every and step % cfg.save_every == 0) or stopping:
                    state.wall_seconds = wall.seconds()
                    observer.message(f"Checkpoint {session.save(folder, state)}")
                if stopping:
                    raise RunInterrupted(step, resume_command(folder, world.world_size))
        state.train_seconds = clock.seconds()
        eval_after = session.score()
        _log_eval(state, total, eval_after, metrics, observer)
    finally:
        if metrics:
            metrics.close()
    return state.last_step, eval_after


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM: the loop stopped after a whole step and saved a checkpoint to resume from."""

    def __init__(self, step: int, resume: str) -> None:
        super().__init__(f"Interrupted after step {step}; checkpoint saved. Resume with: {resume}")
        self.step = step


class _Clock:
    """Seconds of earlier processes (a resumed run) plus this one's since `started` (default: now)."""

    def __init__(self, before: float, started: float | None = None) -> None:
        self.before, self.started = before, time.perf_counter() if started is None else started

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


def _log_eval(
    state: TrainingState, step: int, scores: dict[str, float] | None, metrics: MetricsLog | None, observer: Observer
) -> None:
    if scores:
        state.evals.append({"step": step, **scores})
        if metrics:
            metrics.write({"step": step, **scores})
        observer.on_eval({"step": step, **scores})


def _start_info(session: Session, folder: RunFolder, state: TrainingState) -> dict[str, Any]:
    parts = session.parts
    return {
        "run_dir": str(folder.path),
        "total_steps": session.total_steps,
        "start_step": state.step,
        "last_step": state.last_step,  # a resumed run's last step so far ({} for a new run)
        "processes": session.world.world_size,
        "train_examples": len(parts.train_set),
        "eval_examples": len(parts.eval_set) if parts.eval_set is not None else 0,
        "parameters": _parameters(session),
        "divergence": session.recipe.loss.chosen()[0],
    }


def _parameters(session: Session) -> dict[str, int]:
    student = session.parts.student
    return {
        "teacher": session.parts.teacher.num_parameters,
        "student": count_parameters(student),
        "student_trainable": count_trainable(student),  # the LoRA adapters only, with `student.lora`
    }


def _record(
    session: Session,
    state: TrainingState,
    folder: RunFolder,
    start_step: int,
    last: dict[str, Any],
    eval_after: dict[str, float] | None,
    ds_config: dict[str, Any] | None,
    wall_seconds: float,
) -> RunRecord:
    recipe, parts = session.recipe, session.parts
    return RunRecord(
        name=recipe.name,
        seed=recipe.seed,
        device=session.runtime.describe(),
        processes=session.world.world_size,
        deepspeed={"zero_stage": ds_config["zero_optimization"]["stage"]} if ds_config else None,
        torch_threads=torch.get_num_threads(),
        precision=session.runtime.precision,
        divergence=recipe.loss.chosen()[0],
        fused_head=session.heads.student is not None,
        parameters=_parameters(session),
        student_layers=parts.layer_choice,
        steps=session.total_steps,
        resumed_from=start_step or None,
        train_examples=len(parts.train_set),
        eval_examples=len(parts.eval_set) if parts.eval_set is not None else 0,
        tokens_seen=state.tokens_seen,
        tokens_per_s=state.tokens_seen / max(1e-9, state.train_seconds),
        train_seconds=state.train_seconds,
        gen_tokens=state.gen_tokens,
        gen_seconds=state.gen_seconds,
        wall_seconds=wall_seconds,
        final=last,
        eval_before=state.eval_before,
        eval_after=eval_after,
        evals=state.evals,
        data={"train": parts.train_set.stats(), "eval": parts.eval_set.stats() if parts.eval_set is not None else None},
        environment=environment_info(),
        run_dir=str(folder.path),
    )


__all__ = ["RunInterrupted", "World", "distill", "how_to_continue", "train"]
