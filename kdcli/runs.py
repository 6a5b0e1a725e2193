"""The run folder, `<output_dir>/<name>/`: every rule about it lives here.

    recipe.yaml      the resolved recipe (its presence makes a folder a kd run)
    run.json         the run record (`RunRecord`), written last
    metrics.jsonl    one line per logged step and per eval
    checkpoints/     resumable states (`kdcli.engine.checkpoint` writes what goes inside)
    student/         the distilled student, a Hugging Face folder
    eval/            what `kd eval` writes (its default eval folder)

`kd distill` creates a folder through `RunFolder.create` (which refuses to replace a non-empty one unless asked),
`--resume` opens one through `RunFolder.existing`, and `kd compare` reads the typed `RunRecord`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcli.durable import FolderLock, write_json, write_text_atomic
from kdcli.errors import KdError
from kdcli.recipe import Recipe

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STUDENT_DIR = "student"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"


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
    parameters: dict[str, int] = field(default_factory=dict)  # {"teacher": n, "student": n}
    steps: int | None = None
    resumed_from: int | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    tokens_seen: int | None = None
    tokens_per_s: float | None = None
    train_seconds: float | None = None
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
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
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
            raise KdError(f"{flag} {path}: not a kd run folder (no {RECIPE_FILE}).")
        return folder

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

    def create(self, recipe: Recipe, overwrite: bool) -> RunFolder:
        """Make the folder (replacing a non-empty one only with `overwrite`) and write the resolved recipe."""
        self.refuse_existing(overwrite)
        if self.path.is_dir() and any(self.path.iterdir()):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.recipe_file, recipe_yaml(recipe))
        return self

    # --- the record and the metrics

    def write_record(self, record: RunRecord) -> None:
        write_json(self.record_file, record.as_dict())

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_json(self.path / name, data)

    def metrics_log(self) -> MetricsLog:
        return MetricsLog(self.metrics_file)

    def truncate_metrics(self, step: int) -> None:
        """Drop the records a killed run logged after its last checkpoint: the resumed run logs them again."""
        if self.metrics_file.exists():
            lines = self.metrics_file.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _record_step(line) <= step]
            write_text_atomic(self.metrics_file, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return 1 << 62  # a line cut off by the kill


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def environment_info() -> dict[str, Any]:
    import torch
    import transformers

    from kdcli import __version__

    return {
        "kdcli": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The commit of the kd checkout, when kd runs from one (editable install)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class MetricsLog:
    """Append-only `metrics.jsonl`, flushed per line so a crashed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
