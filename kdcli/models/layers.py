"""Cutting a model's decoder layers: which layers a `student.layers` value keeps, and the config and the copy of
the teacher cut to them (`student.init: teacher`). Which layers are worth keeping is `pruning`'s question."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from kdcli.recipe.student import LayerChoice


def num_layers_key(config: PretrainedConfig) -> str:
    """The real `to_dict` key for the layer count (GPT-2 stores `n_layer` and maps `num_hidden_layers` onto it)."""
    return config.attribute_map.get("num_hidden_layers", "num_hidden_layers")


def per_layer_keys(config_dict: dict[str, Any], n_layers: int) -> list[str]:
    """Config entries holding one value per layer, e.g. transformers 5's `layer_types` or SmolLM3's
    `no_rope_layers`: they must shrink with the layer count or the config fails validation."""
    return [
        key
        for key, value in config_dict.items()
        if "layer" in key and isinstance(value, list | tuple) and len(value) == n_layers
    ]


def _decoder_layers_name(model: PreTrainedModel) -> str:
    from torch import nn

    n_layers = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name
    raise KdError(
        f"student.init: teacher: cannot find the decoder layers of {type(model).__name__}; "
        "use `init: pretrained` or `init: random`."
    )


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (`model.layers` for Llama), found by its length."""
    return model.get_submodule(_decoder_layers_name(model))


def kept_layers(layers: str | list[int] | LayerChoice, n_layers: int) -> list[int]:
    """The teacher layers a `student.layers` value keeps, checked against the teacher's `n_layers`.

    A `{keep: N, by: ...}` choice not scored yet keeps its N layers somewhere: the first N stand in for them where
    only the student's shape matters (its config for `kd plan`); `build_student` refuses it unscored.
    """
    from kdcli.recipe.student import LayerChoice

    if layers == "all":
        return list(range(n_layers))
    if layers == "every-other":
        return list(range(0, n_layers, 2))
    if isinstance(layers, LayerChoice):
        if layers.keep >= n_layers:
            raise KdError(
                f"student.layers.keep: {layers.keep} keeps every layer of the teacher's {n_layers}; keep 1 to "
                f"{n_layers - 1} of them, or use `layers: all`."
            )
        if layers.indices is None:
            return list(range(layers.keep))
        return _in_range(layers.indices, n_layers, "student.layers.indices")
    assert isinstance(layers, list)
    return _in_range(layers, n_layers, "student.layers")


def _in_range(indices: list[int], n_layers: int, key: str) -> list[int]:
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise KdError(f"{key}: index {bad[0]} is out of range; the teacher has {n_layers} layers (0..{n_layers - 1}).")
    return list(indices)


def pruned_config(config: PretrainedConfig, kept: list[int]) -> PretrainedConfig:
    """`config` cut to the layers `kept`, per-layer entries included."""
    n_layers = config.num_hidden_layers
    config_dict = config.to_dict()
    for key in per_layer_keys(config_dict, n_layers):
        config_dict[key] = [config_dict[key][i] for i in kept]
    config_dict[num_layers_key(config)] = len(kept)
    return type(config).from_dict(config_dict)


def pruned_copy(teacher: PreTrainedModel, kept: list[int], dtype: torch.dtype) -> PreTrainedModel:
    """A fresh model with the teacher's config cut to `kept` layers, and the teacher's weights copied in.

    Building a new model (rather than deep-copying the teacher and dropping layers) gives attention modules
    `layer_idx` 0..k-1 by construction, so the KV cache works for generation, and a clean training state
    (no frozen flags, hooks or eval mode inherited from the teacher).
    """
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(pruned_config(teacher.config, kept), dtype=dtype)

    prefix = _decoder_layers_name(teacher) + "."
    new_index = {old: new for new, old in enumerate(kept)}
    state: dict[str, Any] = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        state[key] = tensor
    # load_state_dict copies into the student's own parameters: nothing is shared with the frozen teacher.
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student
