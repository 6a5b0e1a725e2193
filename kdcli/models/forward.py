"""The one forward pass kd runs to get a causal LM's logits: teacher online, student in training, cache writing.

It sits in the models layer, below both the engine and the cache, so all of them share one way of calling the
model (keyword inputs, the precision's autocast, the slice to the shared vocabulary) and cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kdcli.hardware import Runtime


def logits_of(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    runtime: Runtime,
    width: int | None = None,
) -> torch.Tensor:
    """Logits [B, T, V] of `batch['input_ids']` under `batch['attention_mask']`, in `runtime`'s autocast.

    `width` keeps the first columns only: a padded output layer may be wider than the vocabulary teacher and
    student share (see `check_tokenizers`). Gradients are the caller's choice: wrap the call in `torch.no_grad()`
    for a teacher, leave it bare for the student being trained.
    """
    with runtime.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits if width is None else logits[..., :width]
