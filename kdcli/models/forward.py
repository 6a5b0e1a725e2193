"""The one forward pass kd runs to get a causal LM's logits: teacher online, student in training, cache writing;
and its fused twin, which stops at the hidden states and leaves the projection to the loss (`loss.fused`).

It sits in the models layer, below both the engine and the cache, so all of them share one way of calling the
model (keyword inputs, the precision's autocast, the slice to the shared vocabulary) and cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kdcli.hardware import Runtime
    from kdcli.losses import ProjectedLogits


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


# Model types whose causal-LM forward turns the decoder's last hidden state into logits with nothing but the
# output layer and the config's scale or soft-capping (read by `fused_head`), so that the fused head computes
# exactly their logits. Another type keeps the plain path: its forward may do more (a bias, a different scale).
FUSED_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "cohere",
        "smollm3",
    }
)


@dataclass(frozen=True)
class FusedHead:
    """What the fused head needs of a causal LM: its decoder (hidden states) and how its forward makes logits."""

    decoder: Any  # torch.nn.Module returning `.last_hidden_state`
    weight: Any  # the output layer's weight parameter [V, d] (the embedding's when tied)
    scale: float = 1.0
    softcap: float | None = None


def fused_head(model: Any) -> FusedHead | str:
    """The model's `FusedHead`, or a short reason why its logits cannot be fused ("its output layer has a bias")."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA (peft) student
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_HEAD_MODEL_TYPES:
        return f"model type {model_type!r} is not one kd knows the output layer of"
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "its output layer is not a linear layer"
    if head.bias is not None:
        return "its output layer has a bias"
    if not hasattr(base, "get_decoder"):
        return "it has no decoder to take hidden states from"
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None and model_type == "cohere":
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None and model_type == "granite":
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return FusedHead(base.get_decoder(), head.weight, scale, float(softcap) if softcap else None)


def projected_logits_of(
    head: FusedHead,
    batch: Mapping[str, torch.Tensor],
    runtime: Runtime,
    width: int,
) -> ProjectedLogits:
    """The logits of `batch` as hidden states and the recipe to project them (`logits_of`'s fused twin): the
    decoder runs in `runtime`'s autocast, the projection is left to the loss, a chunk of rows at a time."""
    from kdcli.losses import OutputLayer, ProjectedLogits

    with runtime.autocast():
        hidden = head.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    dtype = runtime.product_dtype(head.weight.dtype)
    return ProjectedLogits(hidden, OutputLayer(head.weight, width, dtype, head.scale, head.softcap))
