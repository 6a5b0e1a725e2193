"""Fingerprints: what a cache was computed from, so that a stale cache is refused instead of silently used.

Two groups are recorded. The *setup* (tokenizer, template, max_length, data, temperature, teacher id, generation
settings) decides which tokens and targets exist; training checks it against its recipe. The *writer settings*
(K, dtypes, shard size, batch size, the teacher's weight hash) decide the bytes; a resumed write must match them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from kdcli.recipe import Recipe

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token->id map plus what changes the rendered tokens: chat template, BOS and EOS."""
    from kdcli.models import vocab_fingerprint

    return _sha256_json(
        {
            "vocab": vocab_fingerprint(tokenizer),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        }
    )


def rows_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    """Content hash of the data rows as read (the source name alone would miss an edited file)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def teacher_fingerprint(spec: str, model: torch.nn.Module) -> dict[str, str]:
    """Id plus a hash of where the weights came from: the built-in's GGUF, a folder's weight files, or (Hub ids,
    whose files live in a cache kd does not own) the loaded tensors themselves."""
    from kdcli.models import builtin_fingerprint, is_builtin

    if is_builtin(spec):
        return {"id": spec, "sha256": builtin_fingerprint(spec.split(":", 1)[1]), "of": "gguf file"}
    folder = Path(spec).expanduser()
    files = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    digest = hashlib.sha256()
    if files:
        from kdcli.cache.format import sha256_file

        for path in files:
            digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
        return {"id": spec, "sha256": digest.hexdigest(), "of": "weight files"}
    import torch

    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"id": spec, "sha256": digest.hexdigest(), "of": "loaded weights"}


def loss_temperature(recipe: Recipe) -> float:
    """The cache must hold log-probs at the temperature the loss uses (see `kdcli.losses.sparse`)."""
    return float(recipe.loss.chosen()[1].get("temperature", 1.0))


def data_fingerprint(recipe: Recipe, split: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    spec, limit = recipe.data.spec(split), recipe.data.max_examples(split)
    return {"source": spec, "sha256": rows_hash(rows), "max_examples": limit}


def setup_of(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Everything besides the data rows that decides the cached tokens and targets."""
    data = recipe.data
    return {
        "teacher": recipe.teacher.model,
        "tokenizer": tokenizer_hash(tokenizer),
        "template": data.template,
        "system_prompt": data.system_prompt,
        "fields": data.fields.model_dump(),
        "max_length": data.max_length,
        "temperature": loss_temperature(recipe),
        "responses": data.responses,
        "generation": recipe.generation.model_dump() if data.responses == "teacher" else None,
        # A cache written through a server holds that served model's answers: another one's recipe is refused.
        "served_model": recipe.teacher.server.model if recipe.teacher.server is not None else None,
    }


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, cache value, recipe value) for each key that differs; nested dicts are compared key by key."""
    rows: list[tuple[str, str, str]] = []
    for key in [*wanted, *(k for k in recorded if k not in wanted)]:
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            rows.extend(differences(old, new, f"{prefix}{key}."))
        elif old != new:
            rows.append((f"{prefix}{key}", _short(old), _short(new)))
    return rows


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:18] + "…" + text[-18:]


def mismatch_error(head: str, rows: list[tuple[str, str, str]], fix: str) -> KdError:
    """A refusal with a small table: one line per differing key, the cache's value against the recipe's."""
    width = max(len("key"), *(len(r[0]) for r in rows))
    cache_width = max(len("cache"), *(len(r[1]) for r in rows))
    lines = [head, f"  {'key':<{width}}  {'cache':<{cache_width}}  recipe"]
    lines += [f"  {key:<{width}}  {old:<{cache_width}}  {new}" for key, old, new in rows]
    lines.append(fix)
    return KdError("\n".join(lines))
