"""What `kd eval TARGET` evaluates: a run folder's student, a model id or folder, or `teacher:RECIPE`.

A target carries the data settings its model was trained with (template, system prompt, eval split), because a
student answers well only when prompted exactly as in training; and the folder its generations and results go to.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from kdcli.errors import KdError
from kdcli.recipe import DataConfig, Recipe, load_recipe, validate_recipe
from kdcli.recipe.load import read_yaml
from kdcli.runs import RECIPE_FILE, STUDENT_DIR, RunFolder

TEACHER_PREFIX = "teacher:"
DEFAULT_OUT_ROOT = Path("evals")  # for targets that are not run folders: evals/<name>/

TargetKind = Literal["run", "model", "teacher"]


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    name: str  # shown in tables and used for the default eval folder
    model: str  # what `resolve_model` / `from_pretrained` takes
    data: DataConfig  # template, system prompt, fields and default eval set
    eval_dir: Path
    recipe: Recipe | None = None

    @property
    def recorded_model(self) -> str:
        """The model as generation.json and results.json record it, free of this machine's paths: a run's student
        relative to its run folder (`student`), so that a run folder copied elsewhere still matches its passes; a
        local model folder relative to the eval folder; a Hub id or `builtin:` name as given. (That the same weights
        made a pass is the `weights` fingerprint's to say.)"""
        if self.kind == "run":
            return STUDENT_DIR
        folder = Path(self.model).expanduser()
        if folder.is_dir():
            return Path(os.path.relpath(folder.resolve(), self.eval_dir.resolve())).as_posix()
        return self.model

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "model": self.recorded_model}


def expand_targets(specs: list[str]) -> list[str]:
    """`kd eval`'s TARGETs with glob patterns (`runs/grid-*`) expanded to the run folders they match, in order and
    without repeats; a pattern that matches no run folder is a one-line error."""
    import glob

    from kdcli.errors import KdError

    out: list[str] = []
    for spec in specs:
        if any(char in spec for char in "*?["):
            matches = sorted(m for m in glob.glob(spec) if _run_dir_of(Path(m)) == Path(m))
            if not matches:
                raise KdError(
                    f"TARGET {spec}: the pattern matches no finished run folder (recipe.yaml and student/). "
                    "Check the pattern, and quote it so the shell leaves it to kd."
                )
            out += matches
        else:
            out.append(spec)
    return list(dict.fromkeys(out))


def resolve_target(spec: str, *, out: Path | None = None, template: str | None = None) -> Target:
    """Turn the TARGET argument into a `Target`. `out` replaces the eval folder; `template` the prompt template."""
    spec = spec.strip()
    if not spec:
        raise KdError("TARGET: empty. Give a run folder, a model id or folder, or teacher:RECIPE.")
    if spec.startswith(TEACHER_PREFIX):
        target = _teacher_target(spec[len(TEACHER_PREFIX) :], out)
    else:
        target = _path_or_id_target(spec, out)
    if template is not None:
        target = _with_template(target, template)
    return target


def _teacher_target(recipe_path: str, out: Path | None) -> Target:
    if not recipe_path:
        raise KdError("TARGET: teacher: needs a recipe, e.g. teacher:recipes/quickstart.yaml.")
    recipe = load_recipe(recipe_path)
    name = f"teacher-{recipe.name}"
    return Target("teacher", name, recipe.teacher.model, recipe.data, out or DEFAULT_OUT_ROOT / name, recipe)


def _path_or_id_target(spec: str, out: Path | None) -> Target:
    path = Path(spec).expanduser()
    if path.is_dir():
        run_dir = _run_dir_of(path)
        if run_dir is not None:
            return _run_target(run_dir, out)
        if (path / RECIPE_FILE).is_file():
            raise KdError(
                f"TARGET: '{spec}' has a {RECIPE_FILE} but no {STUDENT_DIR}/ folder: the run did not finish. "
                f"Re-run kd distill, or evaluate the teacher with teacher:{path / RECIPE_FILE}."
            )
        if not (path / "config.json").is_file() and RunFolder(path).looks_like_a_run():
            # Without its recipe a student would be prompted with another template than it was trained on.
            alone = (
                f", or evaluate its student alone: kd eval {path / STUDENT_DIR}"
                if (path / STUDENT_DIR).is_dir()
                else ""
            )
            raise KdError(f"TARGET: '{spec}' is a kd run folder whose {RECIPE_FILE} is missing. Restore it{alone}.")
        from kdcli.models import resolve_model

        resolve_model(spec, field="TARGET")  # a folder without config.json is reported here
        name = _safe_name(path.resolve().name)
        return Target("model", name, str(path), DataConfig(), out or DEFAULT_OUT_ROOT / name)
    if path.is_file():
        hint = (
            f" To evaluate its teacher use teacher:{spec}; to evaluate its student give the run folder "
            "(<output_dir>/<name>)."
            if path.suffix.lower() in (".yaml", ".yml")
            else ""
        )
        raise KdError(f"TARGET: '{spec}' is a file, not a run folder or model.{hint}")
    from kdcli.models import resolve_model

    resolve_model(spec, field="TARGET")  # mistyped paths and an unreachable Hub are reported here
    name = _safe_name(spec.removeprefix("builtin:").replace("/", "--"))
    return Target("model", name, spec, DataConfig(), out or DEFAULT_OUT_ROOT / name)


def _run_dir_of(path: Path) -> Path | None:
    """The run folder for `path` when it is one, or its `student/` subfolder; else None."""
    folder = RunFolder(path)
    if folder.recipe_file.is_file() and folder.student_dir.is_dir():
        return path
    if path.name == STUDENT_DIR and RunFolder(path.parent).recipe_file.is_file():
        return path.parent
    return None


def _run_target(run_dir: Path, out: Path | None) -> Target:
    folder = RunFolder(run_dir)
    student = folder.student_dir
    folder.check_student("TARGET")  # before anything is written to the eval folder or loaded
    recipe = validate_recipe(read_yaml(folder.recipe_file), source=str(folder.recipe_file))
    name = _safe_name(run_dir.resolve().name)
    return Target("run", name, str(student), recipe.data, out or folder.eval_dir, recipe)


def _with_template(target: Target, template: str) -> Target:
    try:
        data = DataConfig.model_validate({**target.data.model_dump(), "template": template})
    except ValidationError as err:
        message = str(err.errors()[0]["msg"]).removeprefix("Value error, ")
        raise KdError(f"--template: {message} (got {template!r}).") from err
    return Target(target.kind, target.name, target.model, data, target.eval_dir, target.recipe)


def _safe_name(text: str) -> str:
    """A folder name from a model name: letters, digits, '.', '_' and '-' only."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "model"
