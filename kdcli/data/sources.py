"""Where rows come from: builtin data sets, local files, or Hugging Face data sets.

Every source ends as a plain `list[dict]`, so the formatting code never cares where rows were read from. Local
files are read with the standard library / pyarrow rather than `datasets.load_dataset`: that is faster for the
sizes a distillation run uses, writes nothing to the cache, and lets errors name the exact line that is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from kdcli.durable import json_lines
from kdcli.errors import KdError, did_you_mean
from kdcli.hub import check_reachable, is_offline, looks_like_path

Split = Literal["train", "eval"]

# Builtin data sets live in `kdcli/data/<name>/{train,eval}.jsonl` and are read through importlib.resources so
# they resolve the same in an editable checkout, an installed wheel or a zipped install.
BUILTIN_DATASETS: dict[str, str] = {
    "starter": "a small instruction-following set shipped with kd (fields: instruction, context, response)",
}
BUILTIN_PREFIX = "builtin:"

LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv")
# Suffixes that clearly name a file even when it is not one we can read: used to tell "missing/unsupported
# file" apart from "Hugging Face id" for specs that do not exist on disk.
_FILE_LIKE_SUFFIXES = (*LOCAL_SUFFIXES, ".txt", ".gz", ".zip", ".xlsx", ".arrow", ".yaml", ".yml", ".pq")
# `org/name`, `name`, optionally with `:split`. Repo ids may contain letters, digits, `-`, `_` and `.`.
_HF_ID = re.compile(r"^(?P<id>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?::(?P<split>[\w.\-\[\]%:]+))?$")
# Preferred Hugging Face splits when the spec names none. Eval prefers held-out splits and never falls back to
# `train`: silently evaluating on training data would make every eval number meaningless.
_HF_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "eval": ("test", "validation", "valid", "eval", "dev"),
}


class Rows(list[dict[str, Any]]):
    """The rows of one source, a plain list that also knows where each row came from, for error messages.

    `lines`: the 1-based line each row starts on (JSON lines, CSV); without them rows are counted as `unit`s
    ("item" of a JSON list, "row" of a table), from 1. A slice is a plain list again (see `place_of`).
    """

    def __init__(
        self, rows: Iterable[dict[str, Any]] = (), name: str = "", lines: list[int] | None = None, unit: str = "row"
    ) -> None:
        super().__init__(rows)
        self.name, self.lines, self.unit = name, lines, unit

    def place(self, index: int) -> str:
        """Where row `index` (0-based) is, e.g. `line 7` or `item 3`."""
        if self.lines is not None and 0 <= index < len(self.lines):
            return f"line {self.lines[index]}"
        return f"{self.unit} {index + 1}"


def place_of(rows: Sequence[Any], index: int) -> str:
    """`line 7` / `item 3` for rows read by `load_rows`, `row N` (1-based) for any other sequence."""
    return rows.place(index) if isinstance(rows, Rows) else f"row {index + 1}"


def load_rows(spec: str, split: Split, key: str) -> list[dict[str, Any]]:
    """Read every row of the data source `spec` as a list of dicts (a `Rows`, which knows each row's line).

    `spec` is `builtin:<name>` (the `split` file of a packaged data set), a local `.jsonl`/`.json`/`.parquet`/
    `.csv`/`.tsv` file, or a Hugging Face dataset id `org/name` or `org/name:split`. `key` is the recipe path of
    the setting (e.g. `data.train`); every failure is a `KdError` that starts with it.
    """
    spec = spec.strip()
    if not spec:
        raise KdError(f"{key}: empty data source. Give a file, a Hugging Face dataset id or builtin:starter.")
    if spec.startswith(BUILTIN_PREFIX):
        return _load_builtin(spec, split, key)

    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, spec, key)
    if _looks_local(spec):
        raise KdError(f"{key}: no such file '{spec}'. Check the path (relative paths start from the current folder).")
    match = _HF_ID.match(spec)
    if match is None:
        raise KdError(
            f"{key}: '{spec}' is neither an existing file nor a Hugging Face dataset id (org/name or org/name:split)."
        )
    return _load_hub(match["id"], match["split"], split, key)


def source_name(spec: str) -> str:
    """A short name of the source for messages: the file name of local files, the spec itself otherwise."""
    if spec.startswith(BUILTIN_PREFIX):
        return spec
    path = Path(spec).expanduser()
    return path.name if path.exists() or _looks_local(spec) else spec


def _looks_local(spec: str) -> bool:
    return looks_like_path(spec) or spec.lower().endswith(_FILE_LIKE_SUFFIXES)


# --- builtin -------------------------------------------------------------------------------------------------


def _load_builtin(spec: str, split: Split, key: str) -> list[dict[str, Any]]:
    # `builtin:starter` follows the requested split; `builtin:starter:eval` pins one (e.g. to train on eval rows).
    name, _, pinned = spec[len(BUILTIN_PREFIX) :].partition(":")
    if name not in BUILTIN_DATASETS:
        choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
        hint = did_you_mean(name, BUILTIN_DATASETS)
        raise KdError(f"{key}: unknown builtin data set '{spec}'.{hint} Builtin data sets: {choices}.")
    if pinned and pinned not in ("train", "eval"):
        raise KdError(f"{key}: '{spec}': builtin data sets have the splits 'train' and 'eval', not '{pinned}'.")
    file_name = f"{pinned or split}.jsonl"
    resource = resources.files("kdcli.data").joinpath(name, file_name)
    if not resource.is_file():
        raise KdError(
            f"{key}: the builtin data file kdcli/data/{name}/{file_name} is missing from this kd installation. "
            "Reinstall kd, or point the setting at your own data file."
        )
    text = resource.read_text(encoding="utf-8")
    return _parse_jsonl(json_lines(text), f"{spec} ({file_name})", key)


# --- local files ---------------------------------------------------------------------------------------------


def _load_local(path: Path, spec: str, key: str) -> list[dict[str, Any]]:
    if path.is_dir():
        raise KdError(f"{key}: '{spec}' is a folder. Give one {', '.join(LOCAL_SUFFIXES)} file.")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise KdError(
            f"{key}: cannot read '{path.name}': unsupported file type '{suffix or '(none)'}'. "
            f"Use one of {', '.join(LOCAL_SUFFIXES)}."
        )
    try:
        if path.stat().st_size == 0:
            raise KdError(f"{key}: '{path.name}' is empty (0 bytes). Point {key} at a file with examples.")
        if suffix == ".parquet":
            rows = _read_parquet(path, key)
        else:
            text = _decode(path.read_bytes(), path.name, key)
            if suffix in (".jsonl", ".ndjson"):
                rows = _parse_jsonl(json_lines(text), path.name, key)
            elif suffix == ".json":
                rows = _parse_json(text, path.name, key)
            else:
                rows = _read_csv(text, path.name, key, delimiter="\t" if suffix == ".tsv" else ",")
    except OSError as err:
        raise KdError(f"{key}: cannot read '{spec}': {err.strerror or err}.") from err
    if not rows:
        raise KdError(f"{key}: '{path.name}' has no rows. Point {key} at a file with examples.")
    return rows


_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def _decode(data: bytes, name: str, key: str) -> str:
    """The text of a data file. Binary, UTF-16 and other non-UTF-8 files are errors that say where."""

    def line_of(offset: int) -> int:
        return data.count(b"\n", 0, offset) + 1

    if data.startswith(_UTF16_32_BOMS):
        raise KdError(f"{key}: '{name}' is UTF-16 (or UTF-32) text, not UTF-8. Re-save it as UTF-8.")
    # Files saved by Windows editors often start with a BOM that json.loads rejects: drop it.
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text, bad = data[skip:].decode("utf-8"), None
    except UnicodeDecodeError as err:
        text, bad = "", skip + err.start
    nul = data.find(b"\x00")
    if nul >= 0:  # NUL is valid UTF-8 but never in a text data file: a binary file (or a mislabelled one)
        at = nul if bad is None else min(nul, bad)
        raise KdError(
            f"{key}: '{name}' is not UTF-8 text but looks like a binary file (byte {at}, line {line_of(at)}). "
            f"Point {key} at a UTF-8 JSON lines, JSON or CSV file, or at a .parquet file."
        )
    if bad is not None:
        raise KdError(f"{key}: '{name}' is not UTF-8 text (byte {bad}, line {line_of(bad)}). Re-save it as UTF-8.")
    return text


def _parse_jsonl(lines: Iterable[str], name: str, key: str) -> Rows:
    rows = Rows(name=name, lines=[], unit="line")
    assert rows.lines is not None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) are harmless
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise KdError(
                f"{key}: {name} line {number} is not valid JSON ({err.msg} at column {err.colno}). "
                "Each line must be one JSON object; fix that line."
            ) from err
        if not isinstance(row, dict):
            raise KdError(
                f"{key}: {name} line {number} is a JSON {_json_type(row)}, not an object. "
                'Each line must be one object like {"instruction": ..., "response": ...}.'
            )
        rows.append(row)
        rows.lines.append(number)
    return rows


def _parse_json(text: str, name: str, key: str) -> Rows:
    if not text.strip():
        return Rows(name=name)  # whitespace only: reported as a file without rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            # A `.json` file holding one object per line: read it as JSON lines rather than failing.
            return _parse_jsonl(json_lines(text), name, key)
        raise KdError(
            f"{key}: {name} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). Fix it there."
        ) from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # a common wrapper: {"data": [...], "version": ...}
    if isinstance(data, dict):
        # One object: a JSON-lines file with a single line (or a wrapper we do not know).
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if lists:
            raise KdError(
                f"{key}: {name} is a JSON object; expected a list of examples. "
                f"It has list fields {', '.join(lists)}: save that list alone, or as JSON lines."
            )
        data = [data]
    if not isinstance(data, list):
        raise KdError(
            f"{key}: {name} holds a JSON {_json_type(data)}; expected a list of objects. "
            'Save the examples as [{"instruction": ..., "response": ...}, ...], or as JSON lines.'
        )
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise KdError(
                f"{key}: {name} item {index + 1} is a JSON {_json_type(row)}; expected a list of objects "
                'like {"instruction": ..., "response": ...}. Fix or remove that item.'
            )
    return Rows(data, name=name, unit="item")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message: `KdError`s are shown as one line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _read_parquet(path: Path, key: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return Rows(pq.read_table(path).to_pylist(), name=path.name)
    except pa.ArrowException as err:
        raise KdError(f"{key}: '{path.name}' is not a readable Parquet file ({first_line(err)}).") from err


def _read_csv(text: str, name: str, key: str, delimiter: str) -> Rows:
    # The csv module keeps every value a string (pyarrow would turn a numeric answer column into ints) and
    # reports the line of a malformed row. `csv.reader` (not DictReader) so that each row's first line is known
    # exactly: a quoted cell may span lines, and blank lines come back as empty rows instead of being skipped.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows = Rows(name=name, lines=[], unit="line")
    assert rows.lines is not None
    try:
        while True:
            start = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                break
            if not cells:
                continue
            if header is None:
                header = cells
                continue
            if len(cells) > len(header):
                raise KdError(
                    f"{key}: {name} line {start} has {len(cells) - len(header)} more cell(s) than the header "
                    f"({', '.join(header)}). Quote values that contain '{delimiter}'."
                )
            # Short rows get "" for their missing cells, as csv.DictReader gives them.
            rows.append(dict(zip(header, [*cells, *[""] * (len(header) - len(cells))], strict=True)))
            rows.lines.append(start)
    except csv.Error as err:
        raise KdError(f"{key}: {name} line {reader.line_num}: malformed CSV ({first_line(err)}).") from err
    return rows


# --- Hugging Face Hub ----------------------------------------------------------------------------------------


def _load_hub(dataset_id: str, pinned: str | None, split: Split, key: str) -> list[dict[str, Any]]:
    check_reachable(dataset_id, field=key, repo_type="dataset")
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - `datasets` is a dependency
        raise KdError(f"{key}: loading '{dataset_id}' needs the `datasets` package: pip install datasets.") from err

    datasets.disable_progress_bars()  # kd prints its own progress; tqdm bars would interleave with it
    try:
        if pinned:
            dataset = datasets.load_dataset(dataset_id, split=pinned)
        else:
            loaded = datasets.load_dataset(dataset_id)
            names = list(loaded.keys())
            chosen = next((s for s in _HF_SPLITS[split] if s in loaded), None)
            if chosen is None:
                wanted = " or ".join(f"'{s}'" for s in _HF_SPLITS[split])
                raise KdError(
                    f"{key}: dataset '{dataset_id}' has no {wanted} split (splits: {', '.join(names)}). "
                    f"Name one explicitly, e.g. {dataset_id}:{names[0]}."
                )
            dataset = loaded[chosen]
    except KdError:
        raise
    except ValueError as err:
        # `datasets` reports an unknown split as ValueError("Unknown split ... Should be one of [...]").
        if pinned and "split" in str(err).lower():
            raise KdError(f"{key}: dataset '{dataset_id}' has no split '{pinned}' ({first_line(err)}).") from err
        raise _hub_error(dataset_id, key, err) from err
    except Exception as err:  # the hub raises many unrelated types; all mean "could not load"
        raise _hub_error(dataset_id, key, err) from err
    if not isinstance(dataset, datasets.Dataset):
        raise KdError(f"{key}: '{dataset_id}' is a streaming/iterable dataset; kd needs a regular one.")
    if len(dataset) == 0:
        raise KdError(f"{key}: dataset '{dataset_id}' has no rows in that split.")
    return Rows(dataset.to_list(), name=dataset_id)


def _hub_error(dataset_id: str, key: str, err: Exception) -> KdError:
    if is_offline("dataset"):
        why = "not a local file and not in the Hugging Face cache; this machine is offline"
        fix = "Download it once with network access, or point the setting at a local file."
    else:
        why = f"not a local file, and the Hugging Face Hub says: {type(err).__name__}: {first_line(err)}"
        fix = "Check the id (org/name), or use a local file."
    return KdError(f"{key}: could not load dataset '{dataset_id}' ({why}). {fix}")
