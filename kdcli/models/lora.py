"""LoRA students through `peft`: adapters on the named linear layers train, every other weight is frozen.

The export is plain Hugging Face: `merged_state_dict` folds each adapter into its base weight (W + (alpha/r)·B·A)
from a state dict alone, so it works the same on a module that holds its weights and on the full weights ZeRO-3
gathers from its shards. The adapter itself is saved by `peft`'s `save_pretrained`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError, did_you_mean

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from kdcli.recipe.student import LoraConfig

ADAPTER = "default"  # peft's name for the one adapter kd trains
_PREFIX = "base_model.model."  # what `get_peft_model` puts before the base model's own keys


def _linear_names(model: torch.nn.Module) -> dict[str, str]:
    """Module name → its last part, for every layer LoRA can adapt (nn.Linear, GPT-2's Conv1D)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear | Conv1D)
    }


def check_targets(model: torch.nn.Module, lora: LoraConfig) -> None:
    """Every `target_modules` entry names linear layers of the student (a last name part, or a dotted suffix)."""
    names = _linear_names(model)
    short = sorted(set(names.values()), key=list(names.values()).index)
    for target in lora.target_modules:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            hint = did_you_mean(target, short)
            raise KdError(
                f"student.lora.target_modules: '{target}' is not a linear layer of the student "
                f"({type(model).__name__}).{hint} Its linear layers: {', '.join(short)}."
            )


def apply_lora(student: PreTrainedModel, lora: LoraConfig, seed: int | None) -> torch.nn.Module:
    """`student` wrapped by `peft` with fresh adapters (A seeded by `seed`, B zero): only they require grad.
    `seed=None` leaves the global RNG alone (the meta-device count)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_targets(student, lora)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = get_peft_model(student, config, adapter_name=ADAPTER)
    model.train()
    return model


def trainable_for(config: PretrainedConfig, lora: LoraConfig) -> int:
    """Trainable parameters of the student `config` with `lora`, counted on the meta device (no memory, no weights);
    a target that is not a linear layer of that config is a one-line KdError."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        return count_trainable(apply_lora(model, lora, seed=None))


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def count_trainable(model: torch.nn.Module) -> int:
    """Parameters that train (ZeRO-3's partitioned ones by their full size)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)


def merged_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's own state dict, each adapter folded into its weight, from the peft model's `state_dict`."""
    import torch
    from peft.tuners.lora import LoraLayer

    merged = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        base = merged[f"{name}.base_layer.weight"]
        a = merged.pop(f"{name}.lora_A.{ADAPTER}.weight").to(torch.float32)
        b = merged.pop(f"{name}.lora_B.{ADAPTER}.weight").to(torch.float32)
        delta = (b @ a) * module.scaling[ADAPTER]
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        merged[f"{name}.base_layer.weight"] = (base.to(torch.float32) + delta).to(base.dtype)
    out: dict[str, torch.Tensor] = {}
    for key, value in merged.items():
        if ".lora_" in key:
            continue
        out[key.removeprefix(_PREFIX).replace(".base_layer.", ".")] = value
    return out


def save_adapter(model: Any, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`peft`'s adapter folder (adapter_config.json, adapter_model.safetensors) for `PeftModel.from_pretrained`."""
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
