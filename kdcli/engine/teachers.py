"""Where the teacher's targets come from: a model run online, a model behind a server (`teacher.server`), or (see
`kdcli.cache`) a stored top-K cache.

The training loop asks a `TeacherSource` for the targets of each batch and never cares which one it has, so a
recipe switches between them with one key (`teacher.cache`, `teacher.server`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from kdcli.hardware import Runtime
from kdcli.losses import AlignedTeacher, ProjectedLogits, SparseTeacher, records_at
from kdcli.models import FusedHead, logits_of, projected_logits_of
from kdcli.models.served import ServedTeacher

Batch = dict[str, torch.Tensor]
Targets = torch.Tensor | ProjectedLogits | SparseTeacher | AlignedTeacher


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

    @torch.no_grad()
    def records(self, batch: Batch, k: int, temperature: float) -> SparseTeacher:
        """Across tokenizers: the top-k records of the teacher's labelled positions, from its own tokens."""
        own = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}
        return records_at(self.targets(own), batch["teacher_labels"], k, temperature)


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

    @torch.no_grad()
    def records(self, batch: Batch, k: int, temperature: float) -> SparseTeacher:
        """Across tokenizers: the served top-K of the teacher's labelled positions, from its own tokens."""
        lengths = batch["teacher_attention_mask"].sum(dim=1).tolist()
        return self.served.sparse(batch["teacher_input_ids"].cpu(), lengths, batch["teacher_labels"].cpu(), self.top_k)


class RecordSource(Protocol):
    description: str
    num_parameters: int

    def records(self, batch: Batch, k: int, temperature: float) -> SparseTeacher:
        """The teacher's records ([P, ≥ k], at `temperature`) of the batch's teacher positions, in order."""
        ...


class AlignedSource:
    """A teacher of another tokenizer (`loss.cross_tokenizer`): the records `inner` gives of the teacher's own
    positions, laid out on the student's by the batch's `pair` (`AlignedTeacher.from_records`), its tokens mapped to
    the student's by `shared` (`kdcli.models.shared_vocabulary`)."""

    def __init__(self, inner: RecordSource, shared: list[int], k: int, temperature: float) -> None:
        self.inner = inner
        self.shared = torch.tensor(shared, dtype=torch.long)
        self.k, self.temperature = k, temperature
        self.description = inner.description
        self.num_parameters = inner.num_parameters

    @property
    def model(self) -> torch.nn.Module | None:  # what `place_teacher` moves: the online teacher's model
        return getattr(self.inner, "model", None)

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        self.inner.model = model  # type: ignore[attr-defined]

    @torch.no_grad()
    def targets(self, batch: Batch) -> AlignedTeacher:
        records = self.inner.records(batch, self.k, self.temperature)
        pair = batch["pair"]
        return AlignedTeacher.from_records(records, pair, self.shared.to(pair.device), self.k, self.temperature)
