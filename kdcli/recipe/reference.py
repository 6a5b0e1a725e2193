"""The recipe key reference, generated from the schema so that the docs cannot drift from the code."""

from __future__ import annotations

import json
from typing import Any, get_args

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kdcli.recipe.schema import Recipe


def reference_rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every leaf key, sections expanded in schema order."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(reference_rows(annotation, prefix=f"{key}."))
            continue
        rows.append((key, _default(field), field.description or ""))
        # An optional section (`deepspeed: null` unless given) still lists its keys, with their defaults once set;
        # so does one form of a key that takes several (`student.layers: {keep: N, by: loss}`).
        sections = _sections(annotation)
        if len(sections) == 1:
            rows.extend(reference_rows(sections[0], prefix=f"{key}."))
    return rows


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The sections among a union's members, through `Annotated[...]` wrappers (a discriminated union's tags)."""
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            found.append(arg)
        elif get_args(arg):
            found.extend(_sections(arg))
    return found


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, description in reference_rows():
        escaped = description.replace("|", "\\|")
        lines.append(f"| `{key}` | {default} | {escaped} |")
    return "\n".join(lines) + "\n"


def _default(field: Any) -> str:
    if field.is_required():
        return "*required*"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"
