"""Which columns of the rows are the prompt, the optional context and the response.

Known data sets (Dolly, Alpaca, MiniLLM-style) are recognised by their column names; `data.fields` overrides, and
every error names the setting to change and the columns that are there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdcli.errors import KdError, did_you_mean
from kdcli.recipe.schema import DataFields

PROMPT_COLUMNS = ("instruction", "prompt", "question", "query")
CONTEXT_COLUMNS = ("context", "input")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")


@dataclass(frozen=True)
class FieldMap:
    """Which column of the rows holds the prompt, the optional context and the response."""

    prompt: str
    context: str | None
    response: str

    def extract(self, row: Mapping[str, Any], key: str = "data", where: str = "row 1") -> dict[str, str]:
        """`{"prompt", "context", "response"}` of one row as text; `where` names the row (`train.jsonl line 7`).

        The prompt and the response must be present and text (numbers are written out, e.g. a numeric answer read
        from Parquet); a missing or null context is "". Anything else is a `KdError` naming the row, the column
        and the `data.fields` setting to change.
        """
        return {
            "prompt": _text(row, self.prompt, "prompt", key, where),
            "context": _text(row, self.context, "context", key, where) if self.context else "",
            "response": _text(row, self.response, "response", key, where),
        }


_NAMES = {list: "a list", dict: "an object", tuple: "a list"}


def _text(row: Mapping[str, Any], column: str, role: str, key: str, where: str) -> str:
    value = row.get(column)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)  # e.g. a numeric answer column read from Parquet
    if value is None and role == "context":
        return ""  # the context is optional
    fix = f"remove the row, or set data.fields.{role} to the column that holds the {role}s"
    if role == "context":
        fix += ' (or to "" to use no context)'
    if value is None:
        what = f"{where} has no '{column}'" if column not in row else f"{where}: '{column}' is null"
        raise KdError(f"{key}: {what} (the {role}). Fill it in, {fix}.")
    held = _NAMES.get(type(value), f"a {type(value).__name__}")
    raise KdError(f"{key}: {where}: '{column}' holds {held}, not text (the {role}). Make it a string, {fix}.")


def columns_of(rows: Sequence[Mapping[str, Any]], sample: int = 1000) -> list[str]:
    """Column names in order of first appearance over the first `sample` rows (JSON rows may differ in keys)."""
    seen: dict[str, None] = {}
    for row in rows[:sample]:
        seen.update(dict.fromkeys(row))
    return list(seen)


def resolve_fields(columns: Sequence[str], fields: DataFields, key: str, source: str) -> FieldMap:
    """Map prompt/context/response to columns: explicit `data.fields` first, then the usual names.

    Dolly (instruction/context/response), Alpaca (instruction/input/output) and MiniLLM-style (prompt/output)
    data need no settings. `data.fields.context: ""` turns an auto-detected context column off.
    """
    listed = ", ".join(columns) if columns else "none"
    taken: set[str] = set()

    def pick(role: str, explicit: str | None, candidates: tuple[str, ...], required: bool) -> str | None:
        if explicit == "" and not required:
            return None
        if explicit:
            if explicit not in columns:
                raise KdError(
                    f"{key}: column '{explicit}' (data.fields.{role}) is not in {source} (columns: {listed})."
                    f"{did_you_mean(explicit, columns)}"
                )
            taken.add(explicit)
            return explicit
        # Exact names first, then case-insensitive ("Instruction", "OUTPUT"), never a column already used.
        free = [c for c in columns if c not in taken]
        by_lower = {c.lower(): c for c in reversed(free)}
        for name in candidates:
            found = name if name in free else by_lower.get(name)
            if found is not None:
                taken.add(found)
                return found
        if required:
            raise KdError(
                f"{key}: no {role} column in {source} (columns: {listed}). Set data.fields.{role} "
                f"(auto-detected names: {', '.join(candidates)})."
            )
        return None

    # Explicit settings are claimed before any auto-detection so that e.g. `fields.prompt: input` is not
    # also picked up as the context column.
    taken.update(c for c in (fields.prompt, fields.context, fields.response) if c and c in columns)

    prompt = pick("prompt", fields.prompt, PROMPT_COLUMNS, required=True)
    response = pick("response", fields.response, RESPONSE_COLUMNS, required=True)
    context = pick("context", fields.context, CONTEXT_COLUMNS, required=False)
    assert prompt is not None and response is not None  # required=True raised otherwise
    if prompt == response:
        raise KdError(f"{key}: data.fields use column '{prompt}' as both prompt and response. Set them apart.")
    return FieldMap(prompt=prompt, context=context, response=response)
