"""Where the teacher's targets come from: a model run online, or (see `kdcli.cache`) a stored top-K cache.

The training loop asks a `TeacherSource` for the targets of each batch and never cares which one it has, so a
recipe switches between them with one key (`teacher.cache`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from kdcli.hardware import Runtime
from kdcli.losses import ProjectedLogits, SparseTeacher
from kdcli.models import FusedHead, logits_of, projected_logits_of

Batch = dict[str, torch.Tensor]
Targets = torch.Tensor | ProjectedLogits | SparseTeacher


class TeacherSource(Protocol):
    description: str
    num_parameters: int

    def targets(self, batch: Batch) -> Targets:
        """Dense logits [B, T, width] (or their projection, `ProjectedLogits`) or a `SparseTeacher` aligned with
        `batch['labels']`."""
        ...


class OnlineTeacher:
    """Runs the teacher model under no_grad on each batch. With a `head` (the fused head, `loss.fused`) it stops at
    the hidden states and the loss projects them a chunk at a time."""

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
        self.head: FusedHead | None = None

    @torch.no_grad()
    def targets(self, batch: Batch) -> torch.Tensor | ProjectedLogits:
        if self.head is not None:
            return projected_logits_of(self.head, batch, self.runtime, self.width)
        return logits_of(self.model, batch, self.runtime, self.width)
