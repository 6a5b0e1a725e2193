"""The run folder, `<output_dir>/<name>/`: every rule about it lives here.

    recipe.yaml      the resolved recipe (its presence makes a folder a kd run)
    run.json         the run record (`RunRecord`), written last
    metrics.jsonl    one line per logged step and per eval
    checkpoints/     resumable states (`kdcli.engine.checkpoint` writes what goes inside)
    student/         the distilled student, a Hugging Face folder
    eval/            what `kd eval` writes (its default eval folder)
    tensorboard/     with `train.report_to: tensorboard` (or `--report-to`): event files (`kdcli.loggers`)
    wandb/           with `wandb`: the offline W&B runs, and `run_id`, the one W&B run they all continue

`kd distill` creates a folder through `RunFolder.create` (which refuses to replace a non-empty one unless asked),
`--resume` opens one through `RunFolder.existing`, and `kd compare` reads the typed `RunRecord`.

What a killed run or a damaged disk leaves is decided here too: `read_record`, `read_metrics` and `check_student`
name the broken file and the fix in one line, and a metrics line cut off by a kill is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcli.durable import FolderLock, append_text, json_lines, write_json, write_text_atomic
from kdcli.errors import KdError, KdWarning
from kdcli.recipe import Recipe

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STUDENT_DIR = "student"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


@dataclass
class RunRecord:
    """What `run.json` holds. Reading tolerates missing keys (runs of older kd versions) and keeps unknown ones."""

    name: str | None = None
    seed: int | None = None
    device: str | None = None
    processes: int = 1
    deepspeed: dict[str, Any] | None = None
    torch_threads: int | None = None
    precision: str | None = None
    divergence: str | None = None
    fused_head: bool | None = None  # `loss.fused`: the loss was taken from hidden states, never whole logits
    parameters: dict[str, int] = field(default_factory=dict)  # {"teacher": n, "student": n}
    # `student.layers: {keep: N, by: ...}`: the kept indices, every layer's score and what they were computed on
    student_layers: dict[str, Any] | None = None
    steps: int | None = None
    resumed_from: int | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    tokens_seen: int | None = None
    tokens_per_s: float | None = None
    train_seconds: float | None = None
    gen_tokens: int | None = None  # tokens the student sampled for on-policy batches (0: none), all processes
    gen_seconds: float | None = None  # training seconds spent sampling them
    wall_seconds: float | None = None
    final: dict[str, Any] = field(default_factory=dict)  # the last step's metrics
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    evals: list[dict[str, float]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = RUN_FILE) -> RunRecord:
        """Missing keys take their defaults; a known key of the wrong type is a `KdError` naming `source`."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key in sorted(known & set(data)):
            if data[key] is not None and not _has_type(data[key], hints[key]):
                raise KdError(
                    f"{source}: '{key}' is {_short(data[key])}, not {_type_name(hints[key])}. The file is damaged: "
                    "restore it from a copy, or re-run kd distill --overwrite."
                )
        # A null is the default of every optional field, and stands for "nothing" in the others.
        record = cls(**{k: v for k, v in data.items() if k in known and v is not None})
        record.extra = {k: v for k, v in data.items() if k not in known}
        return record

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @property
    def train_loss(self) -> float | None:
        return self.final.get("loss")

    @property
    def teacher_parameters(self) -> int | None:
        return self.parameters.get("teacher")

    @property
    def student_parameters(self) -> int | None:
        return self.parameters.get("student")

    @property
    def student_trainable(self) -> int | None:
        """Parameters that trained: the LoRA adapters, or all of the student (runs before LoRA record none)."""
        return self.parameters.get("student_trainable", self.student_parameters)


class RunFolder:
    """One run folder: where its files are, whether it may be created or resumed, and its record and metrics."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunFolder:
        return cls(Path(recipe.output_dir) / recipe.name)

    @classmethod
    def existing(cls, path: Path, flag: str = "--resume") -> RunFolder:
        """A folder that must already be a kd run (resume, eval, compare)."""
        folder = cls(path)
        if not folder.recipe_file.is_file():
            if folder.looks_like_a_run():
                raise KdError(
                    f"{flag} {path}: {RECIPE_FILE} is missing, and kd needs the recipe the run was made with. "
                    "Restore it from a copy."
                )
            raise KdError(f"{flag} {path}: not a kd run folder (no {RECIPE_FILE}).")
        return folder

    def looks_like_a_run(self) -> bool:
        """Whether the folder holds what only kd distill writes, whatever is missing (its recipe, say)."""
        return any((self.path / name).exists() for name in (RUN_FILE, METRICS_FILE, CHECKPOINTS_DIR))

    def __str__(self) -> str:
        return str(self.path)

    # --- where things are

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def record_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def student_dir(self) -> Path:
        return self.path / STUDENT_DIR

    @property
    def adapter_dir(self) -> Path:
        """A LoRA run's `peft` adapter (`student/` holds it merged)."""
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    # --- creating

    def lock(self) -> FolderLock:
        """Held by the process writing this run (rank 0), from before any check until it ends; a second command
        on the folder, `--overwrite` and `--resume` included, is refused naming the first."""
        return FolderLock(self.path)

    def refuse_existing(self, overwrite: bool) -> None:
        """Raise the one-line refusal `create` would raise, without touching anything (checked before slow work)."""
        if self.path.exists() and not self.path.is_dir():
            raise KdError(f"{self.path}: exists and is not a folder. Choose another `name` or `output_dir`.")
        if not overwrite and self.path.is_dir() and any(self.path.iterdir()):
            raise KdError(
                f"{self.path}: run folder exists and is not empty. Pass --overwrite to replace it, "
                f"or --set name=<new name>."
            )

    def refuse_finished(self, flag: str = "--resume") -> None:
        """A run that wrote its `run.json` has nothing left to resume. (One that does not read as a record was
        damaged by hand or disk, not written by kd, which writes it whole and last: resume rewrites it.)"""
        if not self.record_file.is_file():
            return
        try:
            self.read_record()
        except KdError:
            return
        raise KdError(
            f"{flag} {self.path}: the run is finished ({RUN_FILE} is written); nothing is left to resume. "
            f"Evaluate it with kd eval {self.path}, or train it again with kd distill RECIPE --overwrite."
        )

    def create(self, recipe: Recipe, overwrite: bool) -> RunFolder:
        """Make the folder (replacing a non-empty one only with `overwrite`) and write the resolved recipe."""
        self.refuse_existing(overwrite)
        if self.path.is_dir() and any(self.path.iterdir()):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.recipe_file, recipe_yaml(recipe))
        return self

    def holds(self, recipe: Recipe) -> bool:
        """Whether this folder's recipe.yaml is `recipe`'s run: the same text, or the same once the layers kd chose
        after scoring (`student.layers.indices`) are set aside on both sides."""
        if not self.recipe_file.is_file():
            return False
        text = self.recipe_file.read_text(encoding="utf-8")
        if text == recipe_yaml(recipe):
            return True
        try:
            saved = Recipe.model_validate(yaml.safe_load(text))
        except (yaml.YAMLError, ValueError):  # pydantic's ValidationError is a ValueError
            return False
        return recipe_yaml(saved.unresolved()) == recipe_yaml(recipe.unresolved())

    # --- the record and the metrics

    def write_record(self, record: RunRecord) -> None:
        write_json(self.record_file, record.as_dict())

    def read_record(self) -> RunRecord:
        """`run.json`, which kd distill writes last: absent while a run has not finished."""
        path = self.record_file
        if not path.is_file():
            why = "the run did not finish (it has a recipe.yaml)." if self.recipe_file.is_file() else None
            raise KdError(f"{self.path}: no {RUN_FILE} — {why or 'is this a kd run folder?'} Run kd distill first.")
        fix = "The run did not finish writing it: re-run kd distill --overwrite."
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise KdError(f"{path}: not valid JSON ({_first_line(err)}). {fix}") from None
        if not isinstance(data, dict):
            raise KdError(f"{path}: expected a JSON object. {fix}")
        return RunRecord.from_dict(data, source=str(path))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_json(self.path / name, data)

    def metrics_log(self) -> MetricsLog:
        return MetricsLog(self.metrics_file)

    def read_metrics(self, *, warn: bool = True) -> list[dict[str, Any]]:
        """The records of `metrics.jsonl` ([] before the first). Its last line, when a kill cut it off mid-write, is
        skipped with a warning; any other broken line is a `KdError` naming it, since only a damaged disk or an
        editor makes one, and a guess at what it held would be silently wrong."""
        return [row for _, row in self._metric_lines(warn)]

    def truncate_metrics(self, step: int) -> None:
        """Drop the records a killed run logged after its last checkpoint: the resumed run logs them again."""
        if self.metrics_file.exists():
            kept = [line for line, row in self._metric_lines(warn=False) if row.get("step", 0) <= step]
            write_text_atomic(self.metrics_file, "".join(line + "\n" for line in kept))

    def _metric_lines(self, warn: bool) -> list[tuple[str, dict[str, Any]]]:
        path = self.metrics_file
        if not path.is_file():
            return []
        fix = "Delete or repair that line (kd writes one JSON object per line)."
        # Undecodable bytes become U+FFFD, so that they fail as the JSON of their own line.
        lines = [line for line in json_lines(path.read_text(encoding="utf-8", errors="replace")) if line.strip()]
        rows: list[tuple[str, dict[str, Any]]] = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError as err:
                if number < len(lines):
                    raise KdError(f"{path}: line {number} is not valid JSON ({_first_line(err)}). {fix}") from None
                if warn:
                    message = f"{path}: line {number} was cut off mid-write (the run was killed); skipping it."
                    warnings.warn(message, KdWarning, stacklevel=3)
                break
            if not isinstance(row, dict):
                raise KdError(f"{path}: line {number} is not a JSON object. {fix}")
            if "step" in row and not _has_type(row["step"], int):
                raise KdError(f"{path}: line {number} has step {_short(row['step'])}, not an integer. {fix}")
            rows.append((line, row))
        return rows

    # --- the student

    def check_student(self, flag: str = "TARGET") -> None:
        """Refuse, in one line, a `student/` that a killed or failed run left half-written: no or broken
        config.json, no weights, or a safetensors file shorter than its header says (what a kill mid-save leaves)."""
        student = self.student_dir
        fix = "the run did not finish saving its student. Re-run kd distill with --overwrite."
        config = student / "config.json"
        if not config.is_file():
            raise KdError(f"{flag}: {student} has no config.json: {fix}")
        try:
            if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as err:
            raise KdError(f"{flag}: {config} is not a JSON object ({_first_line(err)}): {fix}") from None
        index = student / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(_index_shards(index, f"{flag}: {index} is damaged: {fix}")))
        elif (student / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        elif any(student.glob("pytorch_model*.bin")):
            return  # an older format kd never writes: transformers checks it on load
        else:
            raise KdError(f"{flag}: {student} has no weights (model.safetensors): {fix}")
        for name in shards:
            problem = _safetensors_problem(student / name)
            if problem:
                raise KdError(f"{flag}: {student / name} {problem}: {fix}")


def _index_shards(index: Path, refusal: str) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise KdError(refusal) from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise KdError(refusal)
    return list(weight_map.values())


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole, from its header alone: 8 bytes of header length, the JSON header, then
    the tensors, the last of which ends where the file must end. Reads the header, not the weights."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"is cut short ({size} bytes, not even its header)"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            return "has a damaged header"
    if 8 + length + end != size:
        return f"is cut short ({size} of {8 + length + end} bytes)"
    return None


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation, to the depth kd's readers rely on (no bool for a number)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is Any:
            return True
        if isinstance(value, bool) and origin is not bool:
            continue
        if origin is float and isinstance(value, int | float):
            return True
        if isinstance(origin, type) and isinstance(value, origin):
            args = typing.get_args(option)
            if origin is list and args and not all(_has_type(item, args[0]) for item in value):
                continue
            return True
    return False


def _type_name(hint: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join(names.get(typing.get_origin(o) or o, str(o)) for o in options if o is not type(None))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class MetricsLog:
    """Append-only `metrics.jsonl`, one whole line per write, so a crashed run keeps what it logged and a full disk
    (`DiskFull`) leaves no torn line behind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        append_text(path, "")  # created at once, as the run starts

    def write(self, record: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(record) + "\n")

    def close(self) -> None:
        pass  # nothing held open between lines
