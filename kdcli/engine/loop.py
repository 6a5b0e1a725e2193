"""The training loop's parts: one forward for training and eval, one optimizer step, the eval pass, checkpoints.

A `Session` holds what stays fixed during a run (models, objective, batching, where it runs); `TrainingState`
holds what moves. `trainer.distill` strings them together.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcli.data import by_length, micro_batches
from kdcli.engine.backends import DeepSpeedStudent, PlainStudent, StudentBackend
from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
from kdcli.engine.distributed import World, all_reduce_sum, place_teacher
from kdcli.engine.objective import IGNORE_INDEX, Heads, Objective, ObjectiveTerms, choose_heads
from kdcli.engine.on_policy import OnPolicy, next_ratio
from kdcli.engine.optim import build_optimizer, build_scheduler
from kdcli.engine.setup import Prepared
from kdcli.engine.state import TrainingState
from kdcli.engine.teachers import Batch, OnlineTeacher, TeacherSource
from kdcli.hardware import Runtime
from kdcli.models import FusedHead, count_parameters, logits_of, projected_logits_of
from kdcli.recipe import Recipe
from kdcli.runs import RunFolder


@dataclass
class Session:
    recipe: Recipe
    parts: Prepared
    runtime: Runtime
    world: World
    backend: StudentBackend
    objective: Objective
    collate: Callable[[Sequence[Any]], Batch]
    total_steps: int
    on_policy: OnPolicy | None = None  # None: every micro-batch is the data's (`on_policy.ratio: 0`)
    heads: Heads = field(default_factory=Heads)  # the fused head (`loss.fused`), or the plain path

    @classmethod
    def start(
        cls, recipe: Recipe, parts: Prepared, runtime: Runtime, world: World, ds_config: dict[str, Any] | None
    ) -> Session:
        """Place the models on the device (before the optimizer exists, so its state is created there too), and
        build the objective, the optimizer, the schedule and the backend."""
        cfg = recipe.train
        parts.student.to(runtime.device)
        zero3 = bool(ds_config and recipe.deepspeed and recipe.deepspeed.teacher_zero3)
        place_teacher(parts.teacher, runtime.device, ds_config, zero3=zero3)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(parts.train_set) / _window(recipe, world)))
        objective = Objective(recipe.loss)
        collate = parts.collate
        if runtime.device.type != "cpu":
            collate = functools.partial(_collate_to, parts.collate, runtime)
        optimizer = build_optimizer(parts.student, cfg)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        backend: StudentBackend = (
            DeepSpeedStudent(parts.student, optimizer, scheduler, ds_config, world)
            if ds_config
            else PlainStudent(parts.student, optimizer, scheduler, cfg)
        )
        # Under ZeRO-3 sampling is a collective (each forward gathers the sharded weights): see TransformersSampler.
        zero3 = bool(ds_config and ds_config["zero_optimization"]["stage"] == 3)
        on_policy = OnPolicy.for_recipe(recipe, parts.tokenizer, runtime, collate, zero3=zero3, width=parts.width)
        heads = _heads(recipe, parts, ds_config)
        return cls(recipe, parts, runtime, world, backend, objective, collate, total_steps, on_policy, heads)

    @property
    def micro_batches_per_step(self) -> int:
        return self.recipe.train.grad_accum * self.world.world_size

    # --- one forward serves training and eval

    def forward(self, batch: Batch, num_valid: int | None = None, *, with_ce: bool = True) -> ObjectiveTerms:
        model, teacher, width = self.backend.model, self.parts.teacher, self.parts.width
        head = self.heads.student
        return forward(
            model, teacher, batch, self.objective, self.runtime, width, num_valid, with_ce=with_ce, head=head
        )

    # --- training

    def batches(self, state: TrainingState) -> Iterator[Batch]:
        cfg = self.recipe.train
        return micro_batches(
            self.parts.train_set,
            self.collate,
            cfg.batch_size,
            self.recipe.seed,
            start=state.step * self.micro_batches_per_step,
            rank=self.world.rank,
            world_size=self.world.world_size,
            grad_accum=cfg.grad_accum,
            group_by_length=cfg.group_by_length,
        )

    def step(
        self, batches: Iterator[Batch], stop_requested: bool, state: TrainingState | None = None
    ) -> tuple[dict[str, float], dict[str, float], int, bool]:
        """One optimizer step over the accumulation window: (its metrics, the divergence's diagnostics, global
        tokens, whether to stop), all reduced over the processes. `state`: the run's state before this step (it
        places the step for on-policy sampling, and keeps the on-policy ratio)."""
        cfg = self.recipe.train
        started = time.perf_counter()
        window = [next(batches) for _ in range(cfg.grad_accum)]
        sampled, gen_tokens, gen_s, ratio = [False] * len(window), 0, 0.0, None
        if self.on_policy is not None and state is not None:
            # Every sampled batch is built before any forward: the count below must include their positions.
            ratio = state.on_policy_ratio = self.on_policy.ratio(state.on_policy_ratio)
            first = state.step * self.micro_batches_per_step + self.world.rank * cfg.grad_accum
            model = self.backend.model
            window, sampled, gen_tokens, gen_s = self.on_policy.window(model, window, state.step + 1, ratio, first)
        # Normalise by the valid positions of the whole global batch (sampled micro-batches count their generated
        # positions), so the summed micro-batch losses of all ranks equal the loss of that batch in one piece.
        (num_valid,) = all_reduce_sum(
            [sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window)], self.runtime.device
        )
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        stats: dict[str, float] = {}
        tokens = 0
        for batch, on_policy in zip(window, sampled, strict=True):
            terms = self.forward(batch, int(num_valid), with_ce=not on_policy)
            self.backend.backward(terms.total)
            for key, value in (("loss", terms.total), ("ce", terms.ce), ("kd", terms.kd)):
                sums[key] += float(value.detach())
            for key, value in terms.stats.items():
                stats[key] = stats.get(key, 0.0) + value / self.micro_batches_per_step
            tokens += int(batch["attention_mask"].sum())
            del terms
        grad_norm, lr = self.backend.step()
        # One all-reduce gives the global numbers and lets every rank agree on a Ctrl-C.
        local = [*sums.values(), tokens, float(stop_requested), gen_tokens, gen_s, *stats.values()]
        reduced = all_reduce_sum(local, self.runtime.device)
        sums = dict(zip(sums, reduced[:3], strict=True))
        tokens, stopping = int(reduced[3]), reduced[4] > 0
        gen_tokens, gen_s = int(reduced[5]), reduced[6] / self.world.world_size
        stats = dict(zip(stats, reduced[7:], strict=True))
        record = {
            "loss": sums["loss"],
            "kd": sums["kd"],
            "ce": sums["ce"],
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(1e-9, time.perf_counter() - started),
            "gen_tokens": gen_tokens,  # sampled by the student this step, all processes
            "gen_s": gen_s,  # seconds of this step spent sampling (mean over processes)
        }
        if ratio is not None:
            record["on_policy_ratio"] = ratio
        return record, stats, tokens, stopping

    # --- eval

    def score(self) -> dict[str, float] | None:
        """The eval set's scores (`evaluate`); None without one. Every rank scores the whole eval set: under
        ZeRO-3 each forward is a collective all ranks join."""
        eval_set, size = self.parts.eval_set, self.recipe.train.eval_batch_size
        if eval_set is None or len(eval_set) == 0:
            return None
        order = by_length(eval_set)  # a token-weighted mean: the order is free, and like lengths pad least
        batches = (self.collate([eval_set[i] for i in order[lo : lo + size]]) for lo in range(0, len(order), size))
        model, teacher, width = self.backend.model, self.parts.teacher, self.parts.width
        return evaluate(model, teacher, batches, self.objective, self.runtime, width, head=self.heads.student)

    # --- checkpoints

    def save(self, folder: RunFolder, state: TrainingState) -> Path:
        write = self.backend.save
        keep = self.recipe.train.keep_checkpoints
        # Before the first checkpoint there is none to measure: fp32 weights and AdamW's two moments.
        needed = 12 * count_parameters(self.parts.student)
        return save_checkpoint(folder, state, write, self.world, keep, self.micro_batches_per_step, needed=needed)

    def adapt(self, state: TrainingState) -> None:
        """After an eval during training: `schedule: adaptive` may raise the on-policy ratio (`next_ratio`)."""
        if self.on_policy is None or self.on_policy.cfg.schedule != "adaptive":
            return
        ratio = self.on_policy.ratio(state.on_policy_ratio)
        state.on_policy_ratio = next_ratio(ratio, state.evals, state.step, self.on_policy.cfg.adaptive_step)

    def restore(self, checkpoint: Path) -> TrainingState:
        return load_checkpoint(checkpoint, lambda folder: self.backend.load(folder, self.runtime.device), self.world)


def forward(
    model: torch.nn.Module,
    teacher: TeacherSource,
    batch: Batch,
    objective: Objective,
    runtime: Runtime,
    width: int,
    num_valid: int | None = None,
    *,
    with_ce: bool = True,
    head: FusedHead | None = None,
) -> ObjectiveTerms:
    """The one forward of training and eval: the teacher's targets, the student's logits (or, with the fused
    `head`, its hidden states), the objective (`with_ce=False` for a batch the student sampled: see `Objective`)."""
    targets = teacher.targets(batch)
    student_logits = (
        projected_logits_of(head, batch, runtime, width) if head else logits_of(model, batch, runtime, width)
    )
    return objective(student_logits, targets, batch["labels"], num_valid=num_valid, with_ce=with_ce)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    teacher: TeacherSource,
    batches: Iterable[Batch],
    objective: Objective,
    runtime: Runtime,
    width: int,
    *,
    head: FusedHead | None = None,
) -> dict[str, float]:
    """Token-weighted mean of the objective and its parts over the batches."""
    was_training = model.training
    model.eval()
    sums = {"eval_loss": 0.0, "eval_ce": 0.0, "eval_kd": 0.0}
    count = 0
    for batch in batches:
        valid = int((batch["labels"] != IGNORE_INDEX).sum())
        if valid == 0:
            continue
        terms = forward(model, teacher, batch, objective, runtime, width, head=head)
        sums["eval_loss"] += float(terms.total) * valid
        sums["eval_ce"] += float(terms.ce) * valid
        sums["eval_kd"] += float(terms.kd) * valid
        count += valid
    model.train(was_training)
    return {key: value / max(1, count) for key, value in sums.items()} | {"eval_tokens": count}


def _heads(recipe: Recipe, parts: Prepared, ds_config: dict[str, Any] | None) -> Heads:
    """`loss.fused` for this run: the student's head, and the online teacher's where it runs whole on this process."""
    why_not = "the student trains under DeepSpeed, whose engine owns its forward" if ds_config else None
    teacher = getattr(parts.teacher, "inner", parts.teacher)  # across tokenizers: the source of the records
    online = isinstance(teacher, OnlineTeacher) and not (recipe.deepspeed and recipe.deepspeed.teacher_zero3)
    heads = choose_heads(recipe.loss.fused, parts.student, teacher.model if online else None, why_not)
    if isinstance(teacher, OnlineTeacher):
        teacher.head = heads.teacher
    return heads


def _window(recipe: Recipe, world: World) -> int:
    """Examples per optimizer step, all processes."""
    return recipe.train.batch_size * recipe.train.grad_accum * world.world_size


def _collate_to(collate: Callable[[Sequence[Any]], Batch], runtime: Runtime, rows: Sequence[Any]) -> Batch:
    return runtime.to_device(collate(rows))
