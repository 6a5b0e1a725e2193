"""`kd distill RECIPE --grid KEY=V1,V2 ...`: the Cartesian product of recipe overrides, one run after another.

Each point of the grid is the recipe with `--set KEY=V` for one value of every gridded key (the values read as YAML,
like `--set`), named by the recipe's `name` template, which must name every gridded key so that no two runs share a
folder. Before anything runs, every point's recipe is validated and its folder's state read:

- `finished`: the folder has its run record (`run.json`), so the run is skipped;
- `resume`: a killed run with a complete checkpoint, continued with `kd distill --resume`;
- `restart`: a run killed before its first checkpoint, started again over its folder;
- `new`: no folder yet;
- `conflict`: the folder holds another recipe's run (the recipe file changed since), or files kd did not write; it
  is left alone and reported (give the grid another name, or pass --overwrite to start every run over).

Each run is its own `kd distill` process (`--nproc` applies to each), so that one run's failure, memory or
threads never reach the next; a failed run is reported and the grid goes on. Re-running the same command therefore
picks up where it stopped.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kdcli.engine.checkpoint import latest_checkpoint
from kdcli.errors import KdError
from kdcli.recipe import Recipe, load_recipe, parse_set
from kdcli.recipe.load import read_yaml
from kdcli.recipe.schema import NAME_ALIASES, PLACEHOLDER
from kdcli.runs import RunFolder

STATES = ("finished", "resume", "restart", "new", "conflict")


@dataclass(frozen=True)
class GridAxis:
    key: str
    values: list[str]  # the YAML text of each value, as `--set KEY=VALUE` takes it


@dataclass
class GridPoint:
    overrides: list[str]  # the grid's `--set` items for this point
    recipe: Recipe
    state: str  # one of STATES
    outcome: str | None = None  # after running: "finished", "failed (exit N)", "interrupted"

    @property
    def folder(self) -> RunFolder:
        return RunFolder.for_recipe(self.recipe)


def parse_axes(items: Sequence[str]) -> list[GridAxis]:
    """`--grid loss.divergence=fkl,rkl` → axes; commas inside brackets or quotes do not split (`{mu: 0.5, k: 2}`)."""
    axes: list[GridAxis] = []
    for item in items:
        key, _ = parse_set(item.partition("=")[0] + "=null")  # the key's shape, checked as --set checks it
        values = _split_values(item.partition("=")[2])
        if not values or any(not v.strip() for v in values):
            raise KdError(f"--grid {item}: expected KEY=V1,V2,... with no empty value, e.g. --grid seed=0,1,2.")
        for value in values:
            parse_set(f"{key}={value}")  # each value is valid YAML
        if key in {a.key for a in axes}:
            raise KdError(f"--grid {key}: given twice; list all its values in one --grid {key}=V1,V2.")
        if len(set(values)) != len(values):
            raise KdError(f"--grid {item}: a value is listed twice.")
        axes.append(GridAxis(key, values))
    return axes


def _split_values(text: str) -> list[str]:
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    return [v.strip() for v in values]


def plan_grid(recipe_path: Path, sets: Sequence[str], axes: Sequence[GridAxis]) -> list[GridPoint]:
    """Every point's validated recipe and state, in order (the first axis varies slowest). Refuses, in one line and
    before any run, a bad point (a mistyped key, a bad value: checked as --set's are, so before the name), a name
    template that does not name a gridded key, and two points that resolve to one folder."""
    points: list[GridPoint] = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        overrides = [f"{axis.key}={value}" for axis, value in zip(axes, combo, strict=True)]
        recipe = load_recipe(recipe_path, list(sets), grid=overrides)
        points.append(GridPoint(overrides, recipe, state_of(RunFolder.for_recipe(recipe), recipe)))
    check_name_template(recipe_path, sets, axes)
    folders: dict[Path, GridPoint] = {}
    for point in points:
        other = folders.setdefault(point.folder.path.resolve(), point)
        if other is not point:
            raise KdError(
                f"--grid: {' '.join(other.overrides)} and {' '.join(point.overrides)} both name the run "
                f"{point.recipe.name!r}; put the keys that differ into the recipe's name."
            )
    return points


def check_name_template(recipe_path: Path, sets: Sequence[str], axes: Sequence[GridAxis]) -> None:
    template = read_yaml(recipe_path).get("name")
    for item in sets:
        key, value = parse_set(item)
        if key == "name":
            template = value
    named = {NAME_ALIASES.get(key, key) for key in PLACEHOLDER.findall(str(template or ""))}
    missing = [axis.key for axis in axes if NAME_ALIASES.get(axis.key, axis.key) not in named]
    if missing:
        short = {v: k for k, v in NAME_ALIASES.items()}
        add = "-".join("{" + short.get(key, key) + "}" for key in missing)
        raise KdError(
            f"--grid: the recipe's name {template!r} does not name {', '.join(missing)}, so the runs would share a "
            f"folder; add it to the name, e.g. --set name='{_stem(str(template or 'run'))}-{add}'."
        )


def _stem(template: str) -> str:
    return re.sub(r"[^A-Za-z0-9._{}-]", "", template) or "run"


def state_of(folder: RunFolder, recipe: Recipe) -> str:
    """What re-running this point does: skip it, resume it, start it over, start it, or leave it alone."""
    if not folder.path.is_dir() or not any(folder.path.iterdir()):
        return "conflict" if folder.path.exists() and not folder.path.is_dir() else "new"
    if not folder.holds(recipe):
        return "conflict"  # another recipe's run, a run without its recipe, or files kd did not write
    if folder.record_file.is_file():
        return "finished"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run that resumes reports its damaged checkpoints itself
        has_checkpoint = folder.recipe_file.is_file() and latest_checkpoint(folder) is not None
    return "resume" if has_checkpoint else "restart"


def distill_args(
    recipe_path: Path, sets: Sequence[str], point: GridPoint, nproc: int | None, overwrite: bool = False
) -> list[str]:
    """The `kd distill` arguments that run (or continue) this point."""
    if point.state == "resume" and not overwrite:
        args = ["distill", "--resume", str(point.folder.path)]
    else:
        args = ["distill", str(recipe_path), *[a for item in [*sets, *point.overrides] for a in ("--set", item)]]
        if point.state == "restart" or overwrite:
            args.append("--overwrite")
    return [*args, *(["--nproc", str(nproc)] if nproc else [])]


INTERRUPTED = 130  # kd distill's exit code after Ctrl-C or SIGTERM (it saved a checkpoint)


def run_grid(
    recipe_path: Path,
    sets: Sequence[str],
    points: Sequence[GridPoint],
    run: Callable[[list[str]], int],
    *,
    nproc: int | None = None,
    overwrite: bool = False,
    on_start: Callable[[int, GridPoint], None] | None = None,
) -> list[GridPoint]:
    """Run the points that are not finished, one after another, through `run` (argv → exit code); a failed run is
    recorded and the grid goes on, an interrupted one stops it. `overwrite` starts every point over. Returns the
    points with their outcome."""
    for index, point in enumerate(points):
        if not overwrite and point.state in ("finished", "conflict"):
            point.outcome = "finished before" if point.state == "finished" else "left alone (conflict)"
            continue
        if on_start is not None:
            on_start(index, point)
        code = run(distill_args(recipe_path, sets, point, nproc, overwrite))
        if code == 0:
            point.outcome = "finished"
        elif code == INTERRUPTED:
            point.outcome = "interrupted"
            break
        else:
            point.outcome = f"failed (exit {code})"
    return list(points)
