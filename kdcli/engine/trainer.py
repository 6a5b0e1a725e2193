"""Single-process distillation: the teacher runs online under no_grad, the student trains with AdamW.

Read top to bottom, `distill` is the recipe: load models, check tokenizers, load data, score the eval set,
train, score again, save the student and the run record.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcli.data import Collator, build_examples, load_rows
from kdcli.engine.objective import IGNORE_INDEX, Objective
from kdcli.engine.observer import Observer, SilentObserver
from kdcli.engine.optim import build_optimizer, build_scheduler
from kdcli.engine.teachers import OnlineTeacher, TeacherSource
from kdcli.errors import KdError
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


def distill(recipe: Recipe, *, overwrite: bool = False, observer: Observer | None = None) -> dict[str, Any]:
    """Run the recipe end to end and return the summary that is also written to `run.json`."""
    observer = observer or SilentObserver()
    started = time.perf_counter()
    run_dir = run_dir_for(recipe)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        prepare_run_dir(recipe, overwrite=False)  # raises the refusal before any slow work
    seed_everything(recipe.seed)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)

    precision = recipe.train.precision
    autocast = _autocast(precision)
    parts = prepare(recipe, autocast, observer)
    teacher, student, tokenizer = parts.teacher, parts.student, parts.tokenizer
    train_set, eval_set = parts.train_set, parts.eval_set

    cfg = recipe.train
    window = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_set) / window))
    objective = Objective(recipe.loss)
    collate = parts.collate

    run_dir = prepare_run_dir(recipe, overwrite=overwrite)
    write_text_atomic(run_dir / RECIPE_FILE, recipe_yaml(recipe))
    params = {"teacher": teacher.num_parameters, "student": count_parameters(student)}
    observer.on_start(
        {
            "run_dir": str(run_dir),
            "total_steps": total_steps,
            "train_examples": len(train_set),
            "eval_examples": len(eval_set) if eval_set is not None else 0,
            "parameters": params,
            "divergence": recipe.loss.divergence,
        }
    )

    def score() -> dict[str, float] | None:
        if eval_set is None or len(eval_set) == 0:
            return None
        batches = (collate(eval_set[i : i + cfg.eval_batch_size]) for i in range(0, len(eval_set), cfg.eval_batch_size))
        return evaluate(student, teacher, batches, objective, autocast, parts.width)

    eval_before = score()
    if eval_before:
        observer.on_eval({"step": 0, **eval_before})

    optimizer = build_optimizer(student, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    batches = micro_batches(train_set, collate, cfg.batch_size, recipe.seed)
    metrics = MetricsLog(run_dir / METRICS_FILE)
    evals: list[dict[str, float]] = [{"step": 0, **eval_before}] if eval_before else []
    train_started = time.perf_counter()
    tokens_seen = 0
    last: dict[str, Any] = {}
    student.train()
    try:
        for step in range(1, total_steps + 1):
            step_started = time.perf_counter()
            window_batches = [next(batches) for _ in range(cfg.grad_accum)]
            num_valid = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window_batches)
            sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
            stats: dict[str, float] = {}
            step_tokens = 0
            for batch in window_batches:
                targets = teacher.targets(batch)
                with autocast:
                    student_logits = student(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                terms = objective(student_logits[..., : parts.width], targets, batch["labels"], num_valid=num_valid)
                terms.total.backward()
                del targets, student_logits
                for key, value in (("loss", terms.total), ("ce", terms.ce), ("kd", terms.kd)):
                    sums[key] += float(value.detach())
                for key, value in terms.stats.items():
                    stats[key] = stats.get(key, 0.0) + value / cfg.grad_accum
                step_tokens += int(batch["attention_mask"].sum())
            if cfg.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
            else:
                grad_norm = float(
                    torch.nn.utils.get_total_norm([p.grad for p in student.parameters() if p.grad is not None])
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            tokens_seen += step_tokens
            elapsed = time.perf_counter() - train_started
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
            if step % cfg.log_every == 0 or step == total_steps:
                metrics.write(last)
            observer.on_step({**last, "total_steps": total_steps, "tokens_seen": tokens_seen})
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
                record = score()
                if record:
                    evals.append({"step": step, **record})
                    metrics.write({"step": step, **record})
                    observer.on_eval({"step": step, **record})
                student.train()
        train_seconds = time.perf_counter() - train_started
        eval_after = score()
        if eval_after:
            evals.append({"step": total_steps, **eval_after})
            metrics.write({"step": total_steps, **eval_after})
            observer.on_eval({"step": total_steps, **eval_after})
    finally:
        metrics.close()

    observer.message("Saving student")
    save_student(student, tokenizer, run_dir / STUDENT_DIR, precision)
    summary = {
        "name": recipe.name,
        "seed": recipe.seed,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "precision": precision,
        "divergence": recipe.loss.divergence,
        "parameters": params,
        "steps": total_steps,
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
    write_json(run_dir / RUN_FILE, summary)
    observer.on_end(summary)
    return summary


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


def prepare(recipe: Recipe, autocast: contextlib.AbstractContextManager[Any], observer: Observer) -> Prepared:
    """Load the teacher, build the student, check that their tokenizers agree, and tokenize the data."""
    teacher_dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32
    observer.message(f"Loading teacher {recipe.teacher.model}")
    teacher_tokenizer = load_tokenizer(recipe.teacher.model)
    teacher_model = load_teacher(recipe.teacher, teacher_dtype)
    observer.message(f"Building student ({recipe.student.init})")
    # The student keeps fp32 master weights; bf16 runs it under autocast so small updates are not rounded away.
    student, tokenizer = build_student(
        recipe.student, recipe.teacher.model, torch.float32, recipe.seed, teacher=teacher_model
    )
    width = check_tokenizers(teacher_tokenizer, tokenizer, teacher_model.config, student.config)
    teacher = OnlineTeacher(teacher_model, autocast, width, recipe.teacher.model)

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


def _autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batches(
    examples: Sequence[Any], collate: Callable[[Sequence[Any]], Batch], batch_size: int, seed: int
) -> Iterator[Batch]:
    """Endless micro-batches: each epoch a fresh seeded permutation, so a run is reproducible from its seed."""
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]])
        epoch += 1


@torch.no_grad()
def evaluate(
    student: torch.nn.Module,
    teacher: TeacherSource,
    batches: Any,
    objective: Objective,
    autocast: contextlib.AbstractContextManager[Any],
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
        with autocast:
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        terms = objective(student_logits[..., :width], targets, batch["labels"])
        sums["eval_loss"] += float(terms.total) * valid
        sums["eval_ce"] += float(terms.ce) * valid
        sums["eval_kd"] += float(terms.kd) * valid
        count += valid
    student.train(was_training)
    return {key: value / max(1, count) for key, value in sums.items()} | {"eval_tokens": count}


def save_student(student: torch.nn.Module, tokenizer: Any, path: Path, precision: str) -> None:
    """Save with `save_pretrained` (safetensors) into a temporary folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if precision == "bf16":
        student = student.to(torch.bfloat16)
    student.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
