"""Where the teacher's targets come from: a model run online, or (see `kdcli.cache`) a stored top-K cache.

The training loop asks a `TeacherSource` for the targets of each batch and never cares which one it has, so a
recipe switches between them with one key (`teacher.cache`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from kdcli.hardware import Runtime
from kdcli.losses import SparseTeacher
from kdcli.models import logits_of

Batch = dict[str, torch.Tensor]
Targets = torch.Tensor | SparseTeacher


class TeacherSource(Protocol):
    description: str
    num_parameters: int

    def targets(self, batch: Batch) -> Targets:
        """Dense logits [B, T, width] or a `SparseTeacher` aligned with `batch['labels']`."""
        ...


class OnlineTeacher:
    """Runs the teacher model under no_grad on each batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        runtime: Runtime,
        width: int,
        description: str,
    ) -> None:
        self.model = model.eval()
        self.runtime = runtime
        self.width = width
        self.description = description
        self.num_parameters = sum(p.numel() for p in model.parameters())

    @torch.no_grad()
    def targets(self, batch: Batch) -> torch.Tensor:
        return logits_of(self.model, batch, self.runtime, self.width)
