"""Distillation: the teacher runs under no_grad, the student trains with AdamW, in one process or on DeepSpeed.

Read top to bottom, `distill` is the recipe: load models, check tokenizers, load data, score the eval set,
train (checkpointing every `train.save_every` steps), score again, save the student and the run record.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcli.data import Collator, build_examples, load_rows
from kdcli.engine.backends import DeepSpeedStudent, PlainStudent, StudentBackend
from kdcli.engine.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, read_state, restore_rng, save_checkpoint
from kdcli.engine.distributed import (
    StopRequest,
    World,
    all_reduce_sum,
    barrier,
    check_global_batch,
    deepspeed_config,
    init_deepspeed,
    place_teacher,
    uses_deepspeed,
    world_from_env,
)
from kdcli.engine.objective import IGNORE_INDEX, Objective
from kdcli.engine.observer import Observer, SilentObserver
from kdcli.engine.optim import build_optimizer, build_scheduler
from kdcli.engine.teachers import OnlineTeacher, TeacherSource
from kdcli.errors import KdError
from kdcli.hardware import Runtime
from kdcli.models import build_student, check_tokenizers, count_parameters, load_teacher, load_tokenizer
from kdcli.recipe import Recipe
from kdcli.runs import (
    METRICS_FILE,
    RECIPE_FILE,
    RUN_FILE,
    STUDENT_DIR,
    MetricsLog,
    environment_info,
    prepare_run_dir,
    recipe_yaml,
    run_dir_for,
    write_json,
    write_text_atomic,
)

Batch = dict[str, torch.Tensor]
DEEPSPEED_FILE = "deepspeed.json"  # the resolved DeepSpeed config, as the run used it


def distill(
    recipe: Recipe, *, overwrite: bool = False, observer: Observer | None = None, resume: Path | None = None
) -> dict[str, Any]:
    """Run the recipe end to end and return the summary that is also written to `run.json`.

    `resume` is a run folder: training continues from its newest complete checkpoint. Under a launcher
    (torchrun, deepspeed) every process runs this function; only rank 0 reports and writes the run folder.
    """
    world = world_from_env()
    observer = observer if observer and world.is_main else SilentObserver()
    started = time.perf_counter()
    run_dir = resume or run_dir_for(recipe)
    checkpoint = resume_checkpoint(run_dir, world) if resume else None
    if world.is_main and not resume and run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        prepare_run_dir(recipe, overwrite=False)  # raises the refusal before any slow work
    check_global_batch(recipe, world.world_size)
    ds_config = deepspeed_config(recipe, world.world_size) if uses_deepspeed(recipe, world) else None
    if ds_config:  # the launcher gives each process its own GPU; `train.device: cpu` keeps them all on CPUs
        runtime = Runtime(init_deepspeed(world, cpu=recipe.train.device == "cpu"), recipe.train.precision)
    else:
        runtime = Runtime.of(recipe.train.device, recipe.train.precision)
    device, precision = runtime.device, runtime.precision
    seed_everything(recipe.seed)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)

    parts = prepare(recipe, runtime, observer)
    teacher, student, tokenizer = parts.teacher, parts.student, parts.tokenizer
    train_set, eval_set = parts.train_set, parts.eval_set
    # Before the optimizer exists, so that its state is created on the device too.
    student.to(device)
    place_teacher(
        teacher, device, ds_config, zero3=bool(ds_config and recipe.deepspeed and recipe.deepspeed.teacher_zero3)
    )

    cfg = recipe.train
    window = cfg.batch_size * cfg.grad_accum * world.world_size  # examples per optimizer step, all processes
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_set) / window))
    objective = Objective(recipe.loss)
    collate = parts.collate
    if device.type != "cpu":
        collate = functools.partial(_collate_to, parts.collate, runtime)

    optimizer = build_optimizer(student, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    backend: StudentBackend = (
        DeepSpeedStudent(student, optimizer, scheduler, ds_config, world)
        if ds_config
        else PlainStudent(student, optimizer, scheduler, cfg)
    )
    model = backend.model

    if world.is_main:
        if checkpoint is None:
            run_dir = prepare_run_dir(recipe, overwrite=overwrite)
            write_text_atomic(run_dir / RECIPE_FILE, recipe_yaml(recipe))
        if ds_config:
            write_json(run_dir / DEEPSPEED_FILE, ds_config)
    params = {"teacher": teacher.num_parameters, "student": count_parameters(student)}

    def score() -> dict[str, float] | None:
        # Every rank scores the whole eval set: under ZeRO-3 each forward is a collective all ranks join.
        if eval_set is None or len(eval_set) == 0:
            return None
        batches = (collate(eval_set[i : i + cfg.eval_batch_size]) for i in range(0, len(eval_set), cfg.eval_batch_size))
        return evaluate(model, teacher, batches, objective, runtime, parts.width)

    start_step, tokens_seen, seconds_before = 0, 0, 0.0
    evals: list[dict[str, float]] = []
    if checkpoint is not None:
        state = read_state(checkpoint)
        backend.load(checkpoint, device)
        restore_rng(checkpoint, world)
        start_step, tokens_seen, seconds_before = state["step"], state["tokens_seen"], state["train_seconds"]
        evals, eval_before = state["evals"], state["eval_before"]
        if world.is_main:
            truncate_metrics(run_dir / METRICS_FILE, start_step)
    observer.on_start(
        {
            "run_dir": str(run_dir),
            "total_steps": total_steps,
            "start_step": start_step,
            "processes": world.world_size,
            "train_examples": len(train_set),
            "eval_examples": len(eval_set) if eval_set is not None else 0,
            "parameters": params,
            "divergence": recipe.loss.divergence,
        }
    )
    if checkpoint is None:
        eval_before = score()
        evals = [{"step": 0, **eval_before}] if eval_before else []
        if eval_before:
            observer.on_eval({"step": 0, **eval_before})

    batches = micro_batches(
        train_set,
        collate,
        cfg.batch_size,
        recipe.seed,
        start=start_step * cfg.grad_accum * world.world_size,
        rank=world.rank,
        world_size=world.world_size,
        grad_accum=cfg.grad_accum,
    )
    metrics = MetricsLog(run_dir / METRICS_FILE) if world.is_main else None
    train_started = time.perf_counter()
    last: dict[str, Any] = {}
    stopped_at: int | None = None

    def log_eval(step: int, record: dict[str, float] | None) -> None:
        if record:
            evals.append({"step": step, **record})
            if metrics:
                metrics.write({"step": step, **record})
            observer.on_eval({"step": step, **record})

    def save(step: int) -> Path:
        state = {
            "step": step,
            "micro_batches_consumed": step * cfg.grad_accum * world.world_size,  # the data position
            "tokens_seen": tokens_seen,
            "train_seconds": seconds_before + time.perf_counter() - train_started,
            "eval_before": eval_before,
            "evals": evals,
        }
        return save_checkpoint(run_dir, step, state, backend.save, world, cfg.keep_checkpoints)

    model.train()
    try:
        with StopRequest().installed() as stop:
            for step in range(start_step + 1, total_steps + 1):
                step_started = time.perf_counter()
                window_batches = [next(batches) for _ in range(cfg.grad_accum)]
                # Normalise by the valid positions of the whole global batch, so the summed micro-batch
                # losses of all ranks equal the loss of that batch in one piece, however it is split.
                (num_valid,) = all_reduce_sum(
                    [sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window_batches)], device
                )
                sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
                stats: dict[str, float] = {}
                step_tokens = 0
                for batch in window_batches:
                    targets = teacher.targets(batch)
                    with runtime.autocast():
                        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                        student_logits = outputs.logits
                    terms = objective(
                        student_logits[..., : parts.width], targets, batch["labels"], num_valid=int(num_valid)
                    )
                    backend.backward(terms.total)
                    del targets, outputs, student_logits
                    for key, value in (("loss", terms.total), ("ce", terms.ce), ("kd", terms.kd)):
                        sums[key] += float(value.detach())
                    for key, value in terms.stats.items():
                        stats[key] = stats.get(key, 0.0) + value / (cfg.grad_accum * world.world_size)
                    step_tokens += int(batch["attention_mask"].sum())
                grad_norm, lr = backend.step()
                # One all-reduce gives the global numbers and lets every rank agree on a Ctrl-C.
                reduced = all_reduce_sum([*sums.values(), step_tokens, float(stop.requested), *stats.values()], device)
                sums = dict(zip(sums, reduced[:3], strict=True))
                step_tokens, stopping = int(reduced[3]), reduced[4] > 0
                stats = dict(zip(stats, reduced[5:], strict=True))

                tokens_seen += step_tokens
                elapsed = seconds_before + time.perf_counter() - train_started
                last = {
                    "step": step,
                    "loss": sums["loss"],
                    "kd": sums["kd"],
                    "ce": sums["ce"],
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": step_tokens / max(1e-9, time.perf_counter() - step_started),
                    "elapsed_s": elapsed,
                    **stats,
                }
                if metrics and (step % cfg.log_every == 0 or step == total_steps):
                    metrics.write(last)
                observer.on_step({**last, "total_steps": total_steps, "tokens_seen": tokens_seen})
                if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
                    log_eval(step, score())
                    model.train()
                if (cfg.save_every and step % cfg.save_every == 0) or stopping:
                    saved = save(step)
                    observer.message(f"Checkpoint {saved}")
                if stopping:
                    stopped_at = step
                    break
        if stopped_at is not None:
            raise RunInterrupted(stopped_at, run_dir)
        train_seconds = seconds_before + time.perf_counter() - train_started
        eval_after = score()
        log_eval(total_steps, eval_after)
    finally:
        if metrics:
            metrics.close()

    observer.message("Saving student")
    full_weights = backend.full_state_dict()  # a collective under ZeRO-3: every rank takes part
    if world.is_main:
        save_student(student, tokenizer, run_dir / STUDENT_DIR, precision, state_dict=full_weights)
    summary = {
        "name": recipe.name,
        "seed": recipe.seed,
        "device": runtime.describe(),
        "processes": world.world_size,
        "deepspeed": {"zero_stage": ds_config["zero_optimization"]["stage"]} if ds_config else None,
        "torch_threads": torch.get_num_threads(),
        "precision": precision,
        "divergence": recipe.loss.divergence,
        "parameters": params,
        "steps": total_steps,
        "resumed_from": start_step or None,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / max(1e-9, train_seconds),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "final": last,
        "eval_before": eval_before,
        "eval_after": eval_after,
        "evals": evals,
        "data": {"train": train_set.stats(), "eval": eval_set.stats() if eval_set is not None else None},
        "environment": environment_info(),
        "run_dir": str(run_dir),
    }
    if world.is_main:
        write_json(run_dir / RUN_FILE, summary)
    barrier()  # no rank leaves (and tears down the process group) before rank 0 has written the run
    observer.on_end(summary)
    return summary


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM: the loop stopped after a whole step and saved a checkpoint to resume from."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"Interrupted after step {step}; checkpoint saved. Resume with: kd distill --resume {run_dir}")
        self.step, self.run_dir = step, run_dir


def resume_checkpoint(run_dir: Path, world: World) -> Path:
    """The newest complete checkpoint of `run_dir`, checked to fit this launch, or one line saying why not."""
    if not (run_dir / RECIPE_FILE).is_file():
        raise KdError(f"--resume {run_dir}: not a kd run folder (no {RECIPE_FILE}).")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise KdError(
            f"--resume {run_dir}: no complete checkpoint in {run_dir / CHECKPOINTS_DIR}; "
            "set train.save_every to write them."
        )
    saved_world = read_state(checkpoint).get("world_size", 1)
    if saved_world != world.world_size:
        raise KdError(
            f"--resume {run_dir}: {checkpoint.name} was written by {saved_world} process(es); "
            f"resume with --nproc {saved_world}."
        )
    return checkpoint


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint: the resumed run logs them again."""
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _record_step(line) <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return 1 << 62  # a line cut off by the kill


def _collate_to(collate: Callable[[Sequence[Any]], Batch], runtime: Runtime, rows: Sequence[Any]) -> Batch:
    return runtime.to_device(collate(rows))


@dataclass
class Prepared:
    """Everything the loop needs, built from the recipe before the run folder is touched."""

    teacher: TeacherSource
    student: torch.nn.Module
    tokenizer: Any
    width: int  # logit columns compared: the vocabulary teacher and student share
    train_set: Sequence[Any]
    eval_set: Sequence[Any] | None
    collate: Callable[[Sequence[Any]], Batch]


def prepare(recipe: Recipe, runtime: Runtime, observer: Observer) -> Prepared:
    """Load the teacher, build the student, check that their tokenizers agree, and tokenize the data.

    With `teacher.cache` the teacher never runs: examples and targets stream from the cache (`kdcli.cache`)."""
    if recipe.teacher.cache:
        from kdcli.cache import prepare_cached

        cached = prepare_cached(recipe, observer.message)
        return Prepared(
            cached.teacher,
            cached.student,
            cached.tokenizer,
            cached.width,
            cached.train_set,
            cached.eval_set,
            cached.collate,
        )
    if recipe.data.responses == "teacher":
        raise KdError(
            "data.responses: `teacher` trains on responses the teacher generated, which `kd cache-teacher` writes. "
            "Run `kd cache-teacher RECIPE --out DIR`, then set teacher.cache: DIR."
        )
    observer.message(f"Loading teacher {recipe.teacher.model}")
    teacher_tokenizer = load_tokenizer(recipe.teacher.model)
    teacher_model = load_teacher(recipe.teacher, runtime.inference_dtype)
    observer.message(f"Building student ({recipe.student.init})")
    # The student keeps fp32 master weights; bf16 runs it under autocast so small updates are not rounded away.
    student, tokenizer = build_student(
        recipe.student, recipe.teacher.model, torch.float32, recipe.seed, teacher=teacher_model
    )
    width = check_tokenizers(teacher_tokenizer, tokenizer, teacher_model.config, student.config)
    teacher = OnlineTeacher(teacher_model, runtime, width, recipe.teacher.model)

    train_rows = load_rows(recipe.data.train, "train", "data.train")
    train_set = build_examples(train_rows, tokenizer, recipe.data, "train", "data.train")
    if len(train_set) == 0:
        raise KdError(f"data.train: no usable examples in {recipe.data.train} (all were empty or dropped).")
    eval_set = None
    if recipe.data.eval:
        eval_rows = load_rows(recipe.data.eval, "eval", "data.eval")
        eval_set = build_examples(eval_rows, tokenizer, recipe.data, "eval", "data.eval")
    return Prepared(teacher, student, tokenizer, width, train_set, eval_set, Collator(tokenizer.pad_token_id))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def micro_batches(
    examples: Sequence[Any],
    collate: Callable[[Sequence[Any]], Batch],
    batch_size: int,
    seed: int,
    *,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
) -> Iterator[Batch]:
    """Endless micro-batches: each epoch a fresh seeded permutation, so a run is reproducible from its seed.

    The stream is indexed (micro-batch k is chunk k mod n of epoch k div n), so a resumed run starts at `start`
    without replaying the data. With several processes each optimizer step takes grad_accum x world_size
    consecutive micro-batches and rank r gets the r-th run of grad_accum of them: the same global batches as
    one process with `grad_accum` x world_size.
    """
    per_epoch = math.ceil(len(examples) / batch_size)
    order: list[int] = []
    loaded_epoch = -1
    index = start
    while True:
        if (index // grad_accum) % world_size == rank:
            epoch, chunk = divmod(index, per_epoch)
            if epoch != loaded_epoch:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                order, loaded_epoch = torch.randperm(len(examples), generator=generator).tolist(), epoch
            yield collate([examples[i] for i in order[chunk * batch_size : (chunk + 1) * batch_size]])
        index += 1


@torch.no_grad()
def evaluate(
    student: torch.nn.Module,
    teacher: TeacherSource,
    batches: Any,
    objective: Objective,
    runtime: Runtime,
    width: int,
) -> dict[str, float]:
    """Token-weighted mean of the objective and its parts over the eval set."""
    was_training = student.training
    student.eval()
    sums = {"eval_loss": 0.0, "eval_ce": 0.0, "eval_kd": 0.0}
    count = 0
    for batch in batches:
        valid = int((batch["labels"] != IGNORE_INDEX).sum())
        if valid == 0:
            continue
        targets = teacher.targets(batch)
        with runtime.autocast():
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        terms = objective(student_logits[..., :width], targets, batch["labels"])
        sums["eval_loss"] += float(terms.total) * valid
        sums["eval_ce"] += float(terms.ce) * valid
        sums["eval_kd"] += float(terms.kd) * valid
        count += valid
    student.train(was_training)
    return {key: value / max(1, count) for key, value in sums.items()} | {"eval_tokens": count}


def save_student(
    student: torch.nn.Module,
    tokenizer: Any,
    path: Path,
    precision: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save with `save_pretrained` (safetensors) into a temporary folder, then rename it into place.

    `state_dict`: the full weights when the module itself holds only a shard (ZeRO-3), gathered on this rank.
    """
    if not torch.cuda.is_available():
        # save_pretrained imports DeepSpeed when it is installed (accelerate's unwrap); spare it the GPU probe.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        state_dict = {key: value.to(dtype) for key, value in state_dict.items()}
    elif precision == "bf16":
        student = student.to(torch.bfloat16)
    student.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
