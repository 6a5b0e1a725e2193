"""Where the teacher's targets come from: a model run online, a model behind a server (`teacher.server`), or (see
`kdcli.cache`) a stored top-K cache.

The training loop asks a `TeacherSource` for the targets of each batch and never cares which one it has, so a
recipe switches between them with one key (`teacher.cache`, `teacher.server`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from kdcli.hardware import Runtime
from kdcli.losses import ProjectedLogits, SparseTeacher
from kdcli.models import FusedHead, logits_of, projected_logits_of
from kdcli.models.served import ServedTeacher

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


class ServedTeacherSource:
    """Asks a served teacher for each batch's top-K log-probs (`kdcli.models.served`): the records a cache holds,
    laid out on the batch's labels, for the data's micro-batches and the student's sampled ones alike."""

    def __init__(self, served: ServedTeacher, top_k: int, description: str) -> None:
        self.served = served
        self.top_k = top_k
        self.description = description
        self.num_parameters = 0  # a served teacher does not say

    @torch.no_grad()
    def targets(self, batch: Batch) -> SparseTeacher:
        labels = batch["labels"]
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        records = self.served.sparse(batch["input_ids"].cpu(), lengths, labels.cpu(), self.top_k)
        return records.placed(labels)
