"""How `kd cache-teacher` scores a batch's labelled positions: the local teacher's forward, or the served teacher's
prompt log-probs. Both give the same `SparseTeacher` records: top-K, the label's log-prob and the tail mass."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kdcli.cache import format as fmt
from kdcli.cache.fingerprint import loss_temperature
from kdcli.hardware import Runtime

if TYPE_CHECKING:
    import torch

    from kdcli.losses import SparseTeacher
    from kdcli.models.served import ServedTeacher
    from kdcli.recipe import Recipe

Scorer = Callable[[dict[str, "torch.Tensor"]], "SparseTeacher"]  # a padded batch → its labelled positions' records


def local_scorer(model: torch.nn.Module | None, runtime: Runtime, manifest: dict[str, Any], recipe: Recipe) -> Scorer:
    """The teacher's forward, reduced to top-K on the labelled rows only (the softmax over V is the writer's whole
    overhead)."""
    import torch

    from kdcli.losses import SparseTeacher
    from kdcli.models import logits_of

    assert model is not None
    top_k, vocab, temperature = manifest["writer"]["top_k"], manifest["writer"]["vocab"], loss_temperature(recipe)

    def score(batch: dict[str, torch.Tensor]) -> SparseTeacher:
        on_device = runtime.to_device(batch)
        with torch.no_grad():
            logits = logits_of(model, on_device, runtime)
        labelled = (batch["labels"] != fmt.IGNORE_INDEX).to(runtime.device)
        return SparseTeacher.from_logits(
            logits[..., :vocab][labelled], on_device["labels"][labelled], top_k, temperature
        ).to("cpu")

    return score


def served_scorer(served: ServedTeacher, top_k: int) -> Scorer:
    """The served teacher's prompt log-probs of each sequence, the same records (`ServedTeacher.sparse`)."""

    def score(batch: dict[str, torch.Tensor]) -> SparseTeacher:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return served.sparse(batch["input_ids"], lengths, batch["labels"], top_k)

    return score
