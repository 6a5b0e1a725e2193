"""Reading a recipe: YAML file + `--set` overrides -> validated `Recipe`, with one-line errors."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from kdcli.errors import KdError, did_you_mean
from kdcli.recipe.schema import Recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, grid: Sequence[str] = ()) -> Recipe:
    """Load, override and validate a recipe. Every failure is a `KdError` that names the key and where its value
    came from: the file, a `--set` item (`overrides`), or a `--grid` point's `key=value` (`grid`, applied last)."""
    path = Path(path)
    raw = read_yaml(path)
    given: list[tuple[str, str]] = []  # (key, the flag and item that set it)
    for flag, item in [*(("--set", item) for item in overrides or []), *(("--grid", item) for item in grid)]:
        key, value = parse_set(item)
        apply_set(raw, key, value, flag=flag)
        given.append((key, f"{flag} {item if item.isprintable() and len(item) <= 80 else _short(item)}"))
    source = f"--grid point {' '.join(grid)}: {path}" if grid else str(path)
    return validate_recipe(raw, source=source, given=given)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise KdError(f"{path}: no such file. Check the path, or start from recipes/quickstart.yaml.")
    if path.is_dir():
        raise KdError(f"{path}: is a folder; give the recipe's YAML file.")
    try:
        raw = _parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise KdError(f"{path}: invalid YAML {_yaml_problem(err)}. Fix the syntax there.") from err
    except UnicodeDecodeError as err:
        raise KdError(f"{path}: not a UTF-8 text file.") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KdError(
            f"{path}: a recipe is a YAML mapping (name:, teacher:, student:, ...), not a {type(raw).__name__}."
        )
    return raw


def parse_set(item: str) -> tuple[str, Any]:
    """`train.max_steps=10` -> ("train.max_steps", 10). Values are parsed as YAML, so `[0, 2]` is a list."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise KdError(f"--set {_short(item)}: expected key.path=value, for example --set train.max_steps=10.")
    try:
        value = _parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise KdError(
            f"--set {_short(item)}: the value is not valid YAML {_yaml_problem(err)}. Quote it if it is a string."
        ) from err
    return key, value


class _TooDeep(yaml.YAMLError):
    def __str__(self) -> str:
        return "nested too deeply"


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except RecursionError:
        # PyYAML recurses once per nesting level: `[[[[...` a few hundred deep exhausts the stack.
        raise _TooDeep() from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what, on one line: PyYAML's own message spans several, with a caret drawing."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark
        where = f"at line {mark.line + 1}, column {mark.column + 1}" if mark else "at an unknown position"
        return f"{where}: {err.problem or err.context}"
    lines = str(err).strip().splitlines()
    return f"({lines[0] if lines else type(err).__name__})"


def apply_set(raw: dict[str, Any], key: str, value: Any, *, flag: str = "--set") -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or `deepspeed: null`: a section that is off until a key sets it
            child = node[part] = {}
        if not isinstance(child, dict):
            raise KdError(f"{flag} {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], source: str = "recipe", given: Sequence[tuple[str, str]] = ()) -> Recipe:
    """The recipe `raw` validated; the first problem is a `KdError` that starts with where it came from: `source`,
    or the last of `given` (key, flag and item) that set its key or a section holding it."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        problems = [_describe(error, raw) for error in errors]
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        where = ".".join(str(part) for part in _keys_of(errors[0]["loc"], raw))
        origin = next((item for key, item in reversed(given) if f"{where}.".startswith(f"{key}.")), source)
        raise KdError(f"{origin}: {problems[0]}{more}") from err


def _describe(error: Any, raw: dict[str, Any]) -> str:
    loc = _keys_of(error["loc"], raw)
    key = ".".join(_show_key(part) for part in loc) if loc else "(top level)"
    kind = error["type"]
    value = _lookup(raw, loc)
    if kind == "extra_forbidden":
        parent = _section_model([str(part) for part in loc[:-1]])
        choices = list(parent.model_fields) if parent else []
        hint = did_you_mean(str(loc[-1]), choices) or (f" Valid keys: {', '.join(choices)}." if choices else "")
        return f"{key}: unknown key.{hint}"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a tuple such as train.betas, given too short
        return (
            f"{'.'.join(_show_key(part) for part in loc[:-1])}: too few items (got {_short(_lookup(raw, loc[:-1]))})."
        )
    if kind == "missing":
        return f"{key}: required; add it to the recipe."
    message = str(error["msg"]).removeprefix("Value error, ")
    shown = f" (got {_short(value)})" if value is not _MISSING and not isinstance(value, dict) else ""
    return f"{key}: {message}{shown}."


_MISSING = object()


def _keys_of(loc: tuple[Any, ...], raw: dict[str, Any]) -> list[Any]:
    """The recipe keys of an error's location, without pydantic's union member tags (`literal[...]`, `list[int]`)
    that name which alternative of `student.layers` failed: they are not keys the user can find in the file."""
    keys: list[Any] = []
    node: Any = raw
    for part in loc:
        child = _child(node, part)
        if child is _MISSING and isinstance(part, str) and ("[" in part or not isinstance(node, (dict, list))):
            continue
        node = child
        keys.append(part)
    return keys


def _show_key(part: Any) -> str:
    # A key with spaces, dots or invisible characters is quoted, so that `lr ` and `lr` read differently.
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else repr(text)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _lookup(raw: Any, loc: list[Any]) -> Any:
    node = raw
    for part in loc:
        node = _child(node, part)
    return node


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return _MISSING


def _section_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        # An optional section (`deepspeed: DeepSpeedConfig | None`) is its model too.
        options = get_args(field.annotation) or (field.annotation,) if field else ()
        sections = [arg for arg in options if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if len(sections) != 1:
            return None
        model = sections[0]
    return model
