"""Turning the recipe's `teacher` and `student` sections into models and tokenizers.

Every failure the user can cause (a typo in a path, an offline Hub id, a bad layer index, a student from another
tokenizer family) becomes a one-line KdError naming the recipe field, before any training work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError, did_you_mean
from kdcli.hub import check_reachable, is_offline, looks_like_path
from kdcli.models.builtin import Message, builtin_model_dir, ensure_pad_token, is_builtin
from kdcli.models.layers import kept_layers, num_layers_key, per_layer_keys, pruned_config, pruned_copy

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from kdcli.recipe.schema import TeacherConfig
    from kdcli.recipe.student import StudentConfig

# Reads a model spec's config, called as `read(spec, field=...)`: `load_config`, or `kd plan`'s weight-free reader.
ConfigReader = Callable[..., "PretrainedConfig"]

BUILTIN_HINT = "Give a local folder or builtin:smollm2-135m-instruct."
# `name` or `org/name`, as the Hub spells repository ids; anything else that does not exist is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_local(spec: str) -> bool:
    if looks_like_path(spec) or (os.altsep and os.altsep in spec):
        return True
    return not _HUB_ID.match(spec) or ".." in spec


def resolve_model(spec: str, *, field: str = "teacher.model", on_message: Message | None = None) -> str:
    """What to hand to `from_pretrained`: a converted builtin folder, a local folder, or a Hub id (returned as is).

    A Hub id is checked only for a Hub that cannot be reached (`check_reachable`, one quick request per process);
    whether the model exists or is cached is known when loading (see `load_*`).
    """
    if is_builtin(spec):
        try:
            return str(builtin_model_dir(spec, on_message=on_message))
        except KdError as err:
            raise KdError(f"{field}: {err}") from None
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KdError(f"{field}: '{spec}' is a file; give a model folder (with config.json) or a Hugging Face id.")
        if not (path / "config.json").is_file():
            raise KdError(
                f"{field}: folder '{spec}' has no config.json; give a Hugging Face model folder "
                "(config.json, weights and tokenizer files)."
            )
        return str(path)
    if _looks_local(spec):
        raise KdError(f"{field}: no such folder '{spec}'. {BUILTIN_HINT}")
    check_reachable(spec, field=field)
    return spec


def _load_error(field: str, spec: str, resolved: str, err: BaseException) -> KdError:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if resolved != spec or Path(resolved).exists():  # a local or builtin folder that is there but does not load
        return KdError(f"{field}: could not load '{spec}': {first_line}")
    if is_offline():
        reason = "not a local folder and not in the Hugging Face cache; this machine is offline"
    else:
        reason = f"not a local folder, and the Hugging Face Hub did not provide it: {first_line}"
    return KdError(f"{field}: could not load '{spec}' ({reason}). {BUILTIN_HINT}")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed load raises: OSError for missing files/Hub, ValueError for an unknown model type,
    SafetensorError for a truncated or corrupt weight file."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:
        pass
    return tuple(errors)


def load_config(spec: str, *, field: str = "teacher.model", on_message: Message | None = None) -> PretrainedConfig:
    from transformers import AutoConfig

    resolved = resolve_model(spec, field=field, on_message=on_message)
    try:
        return AutoConfig.from_pretrained(resolved)
    except _hub_errors() as err:
        raise _load_error(field, spec, resolved, err) from err


def load_tokenizer(
    spec: str, *, field: str = "teacher.model", on_message: Message | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec, always with a pad token (taken from its own vocabulary when absent)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(spec, field=field, on_message=on_message)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except _hub_errors() as err:
        raise _load_error(field, spec, resolved, err) from err
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(
    spec: str, dtype: torch.dtype, *, field: str = "teacher.model", on_message: Message | None = None
) -> PreTrainedModel:
    """A causal LM from a model spec (builtin, folder or Hub id) in `dtype`, as `from_pretrained` leaves it; a
    failure is a KdError naming `field`."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(spec, field=field, on_message=on_message)
    try:
        return AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    except _hub_errors() as err:
        raise _load_error(field, spec, resolved, err) from err


def load_teacher(cfg: TeacherConfig, dtype: torch.dtype, *, on_message: Message | None = None) -> PreTrainedModel:
    """The frozen teacher: eval mode, no gradients. (Whether to load it at all when `cfg.cache` is set is the
    caller's decision: `kd cache-teacher` needs it, training from a cache does not.)"""
    model = load_model(cfg.model, dtype, field="teacher.model", on_message=on_message)
    model.eval()
    model.requires_grad_(False)
    return model


def _apply_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> PretrainedConfig:
    if not overrides:
        return config
    config_dict = config.to_dict()
    valid = sorted(set(config_dict) | set(config.attribute_map))
    for key in overrides:
        if key not in valid:
            raise KdError(
                f"student.overrides: '{key}' is not a field of the {config.model_type} config."
                f"{did_you_mean(key, valid)}"
            )
    changes = {config.attribute_map.get(k, k): v for k, v in overrides.items()}
    n_key = num_layers_key(config)
    old_layers = config_dict.get(n_key)
    if n_key in changes and changes[n_key] != old_layers and isinstance(old_layers, int):
        for key in per_layer_keys(config_dict, old_layers):
            if key in changes:
                continue
            values = config_dict[key]
            if len(set(map(str, values))) == 1 and isinstance(changes[n_key], int):
                config_dict[key] = [values[0]] * changes[n_key]
            else:  # a pattern (e.g. sliding every 6th layer): let the config class derive it for the new depth
                del config_dict[key]
    # head_dim is stored derived (hidden_size / heads); keep it derived when the user changes either side.
    if (
        "head_dim" in config_dict
        and "head_dim" not in changes
        and {"hidden_size", "num_attention_heads"} & set(changes)
    ):
        hidden, heads = config_dict.get("hidden_size"), config_dict.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads and config_dict["head_dim"] == hidden // heads:
            del config_dict["head_dim"]
    config_dict.update(changes)
    try:
        return type(config).from_dict(config_dict)
    except (*_hub_errors(), TypeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
        raise KdError(f"student.overrides: {first_line}") from err


def student_config(
    cfg: StudentConfig,
    teacher: PretrainedConfig | Callable[[], PretrainedConfig],
    *,
    read: ConfigReader = load_config,
) -> PretrainedConfig:
    """The student's config as `build_student` makes it, from configs alone: no weights are loaded.

    `teacher` is the teacher's config, or a function that reads it, called only when the student derives from it
    (not for `init: pretrained`, nor `init: random` on its own `student.model`), so training from a cache needs no
    teacher then. `read(spec, field=...)` gives the config of `student.model` where the recipe names one; `kd plan`
    passes a reader that never converts a built-in model.
    """

    def teacher_config() -> PretrainedConfig:
        return teacher() if callable(teacher) else teacher

    if cfg.init == "pretrained":
        assert cfg.model is not None  # the schema requires it
        return read(cfg.model, field="student.model")
    if cfg.init == "random":
        base = read(cfg.model, field="student.model") if cfg.model else teacher_config()
        return _apply_overrides(base, cfg.overrides)
    # init: teacher — the same layer cut `pruned_copy` makes, on the config only.
    config = teacher_config()
    return pruned_config(config, kept_layers(cfg.layers, config.num_hidden_layers))


def student_tokenizer(
    cfg: StudentConfig, teacher_spec: str, *, on_message: Message | None = None
) -> PreTrainedTokenizerBase:
    """The student's tokenizer, without weights: its own for `init: pretrained`, the teacher's otherwise."""
    if cfg.init == "pretrained":
        assert cfg.model is not None  # the schema requires it
        return load_tokenizer(cfg.model, field="student.model", on_message=on_message)
    return load_tokenizer(teacher_spec, on_message=on_message)


def build_student(
    cfg: StudentConfig,
    teacher_spec: str,
    dtype: torch.dtype,
    seed: int,
    teacher: PreTrainedModel | None = None,
    *,
    on_message: Message | None = None,
) -> PreTrainedModel:
    """The student (train mode); its tokenizer is `student_tokenizer`'s.

    `teacher` is reused for `init: teacher` to avoid loading it twice; its tensors are copied, never shared.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.init == "pretrained":
        assert cfg.model is not None  # the schema requires it
        student = load_model(cfg.model, dtype, field="student.model", on_message=on_message)
    elif cfg.init == "teacher":
        if teacher is None:
            teacher = load_model(teacher_spec, dtype, field="teacher.model", on_message=on_message)
        if getattr(cfg.layers, "indices", False) is None:
            raise KdError("student.layers: the layers to keep are not chosen yet; kd distill scores them first.")
        kept = kept_layers(cfg.layers, teacher.config.num_hidden_layers)
        student = pruned_copy(teacher, kept, dtype)
    else:
        source, field = (cfg.model, "student.model") if cfg.model else (teacher_spec, "teacher.model")
        config = _apply_overrides(load_config(source, field=field, on_message=on_message), cfg.overrides)
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.train()
    student.requires_grad_(True)
    return student


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the token→id map: equal fingerprints mean the two tokenizers number tokens the same way."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def _output_rows(config: PretrainedConfig) -> int:
    return int(config.get_text_config().vocab_size)


def check_tokenizers(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    teacher_config: PretrainedConfig,
    student_config: PretrainedConfig,
    *,
    cross_tokenizer: bool = False,
) -> int:
    """Refuse a student whose vocabulary differs from the teacher's (unless the recipe distils across tokenizers,
    `cross_tokenizer`); return how many of the student's logit columns the loss reads.

    Output layers padded past the tokenizer (config.vocab_size ≥ len(tokenizer), e.g. Qwen2.5 0.5B vs 7B) are
    accepted when the token→id maps agree; the returned width is the smaller one, so the caller slices both
    models' logits to `[..., :width]` when they differ. Across tokenizers each model keeps its whole output layer
    (the student's width is returned; the teacher's is its config's).
    """
    t_rows, s_rows = _output_rows(teacher_config), _output_rows(student_config)
    t_len, s_len = len(teacher_tok), len(student_tok)
    same = teacher_tok is student_tok or vocab_fingerprint(teacher_tok) == vocab_fingerprint(student_tok)
    if not same and not cross_tokenizer:
        if t_len == s_len:
            t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
            token = next(t for t in sorted(t_vocab, key=t_vocab.__getitem__) if s_vocab.get(t) != t_vocab[t])
            detail = (
                f"both {t_len} tokens, but {token!r} is id {t_vocab[token]} for the teacher "
                f"and {s_vocab.get(token)} for the student"
            )
        else:
            detail = f"teacher {t_len} tokens, student {s_len}"
        raise KdError(
            f"student.model: vocabulary differs from the teacher's ({detail}). Distillation over logits needs the "
            "same tokenizer: pick a student from the teacher's family, or set loss.cross_tokenizer: {method: uld} "
            "(or hybrid) to distil across tokenizers."
        )
    for field, rows, length in (("teacher.model", t_rows, t_len), ("student", s_rows, s_len)):
        if rows < length:
            raise KdError(
                f"{field}: the model's output layer has {rows} rows but its tokenizer has {length} tokens; "
                "some tokens would have no logit."
            )
    return s_rows if cross_tokenizer else min(t_rows, s_rows)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE = 1 << 20  # bytes hashed at the start, middle and end of each weight file


def weights_fingerprint(model: str) -> str | None:
    """A cheap fingerprint of a local model's weights: name, size and three 1 MiB samples of each weight file.

    Enough to notice that `kd distill --overwrite` replaced a student (every tensor changes), without reading
    gigabytes; and unlike mtimes it survives copying the run folder. None for Hub ids (not local files).
    """
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            for offset in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()


def parameters_of(config: PretrainedConfig) -> int:
    """The parameters of a causal LM built from `config`, counted on the meta device (nothing is allocated): a
    teacher kd never loads (`teacher.server`) is still reported by size."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def count_parameters(model: PreTrainedModel) -> int:
    """Distinct parameters: tied input/output embeddings count once; LoRA adapters not at all (the merged model's)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)
