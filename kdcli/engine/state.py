"""What a run has done so far, saved whole in every checkpoint and restored whole on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingState:
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    train_seconds: float = 0.0  # training time before this process started (resumed runs) plus its own
    # Wall time of every process that worked on the run, up to its last checkpoint (set-up and evals included; what
    # a killed process did after that checkpoint is redone, and counted, by the one that resumes).
    wall_seconds: float = 0.0
    last_step: dict[str, Any] = field(default_factory=dict)  # the last step's metrics: run.json's `final`
    eval_before: dict[str, float] | None = None
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step": s, **scores} for every eval so far
    # On-policy training (`on_policy`): the ratio now (it moves under `schedule: adaptive`; None: not in use) and
    # what the student generated so far, all processes.
    on_policy_ratio: float | None = None
    gen_tokens: int = 0
    gen_seconds: float = 0.0

    def to_checkpoint(self, micro_batches_per_step: int) -> dict[str, Any]:
        # The data position is recorded for readers of the checkpoint; resume derives it from `step`.
        return {
            **dataclasses.asdict(self),
            "micro_batches_consumed": self.step * micro_batches_per_step,
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> TrainingState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})
