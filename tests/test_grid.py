"""`kd distill --grid`: the product of overrides, the name check before any work, states, skip/resume on re-run,
a failed run reported while the grid goes on, and the compare table at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_distill import runner, tiny_recipe

from kdcli.cli import app
from kdcli.errors import KdError
from kdcli.grid import GridPoint, parse_axes, plan_grid, run_grid


def grid_recipe(tmp_path: Path, teacher: Path, **sections: dict) -> Path:
    recipe = tiny_recipe(
        tmp_path,
        teacher,
        train={"max_steps": 2, "save_every": 1, "eval_every": None, **sections.pop("train", {})},
        data={"max_train_examples": 16, "max_eval_examples": 8},
        **sections,
    )
    text = recipe.read_text().replace("name: tiny", "name: tiny-{divergence}-s{seed}")
    recipe.write_text(text)
    return recipe


def test_axes_read_values_as_yaml_and_split_outside_brackets() -> None:
    axes = parse_axes(["loss.divergence=fkl,rkl", "loss.params={mu: 0.5, temperature: 2.0},{}", "seed=0,1,2"])
    assert [a.key for a in axes] == ["loss.divergence", "loss.params", "seed"]
    assert axes[1].values == ["{mu: 0.5, temperature: 2.0}", "{}"]
    assert axes[2].values == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["seed="], "no empty value"),
        (["seed=0,,1"], "no empty value"),
        (["seed=0,1", "seed=2"], "given twice"),
        (["seed=1,1"], "listed twice"),
        (["=1,2"], "key.path=value"),
        (["seed=[1,2"], "not valid YAML"),
    ],
)
def test_bad_axes_are_one_line_errors(items: list[str], message: str) -> None:
    with pytest.raises(KdError, match=message):
        parse_axes(items)


def test_name_must_name_every_gridded_key_before_any_work(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    result = runner.invoke(app, ["distill", str(recipe), "--grid", "loss.kd_ratio=0.3,0.7"])
    assert result.exit_code == 2, result.output
    assert "does not name loss.kd_ratio" in result.output and "{loss.kd_ratio}" in result.output
    assert not (tmp_path / "runs").exists()
    named = runner.invoke(
        app,
        ["distill", str(recipe), "--grid", "loss.kd_ratio=0.3,0.7", "--set", "name=t-{loss.kd_ratio}", "--dry-run"],
    )
    assert named.exit_code == 0, named.output
    assert "t-0.3" in named.output and "t-0.7" in named.output


def test_a_mistyped_grid_key_is_named_before_the_name_template(tmp_path: Path, tiny_teacher: Path) -> None:
    """The name check would suggest adding the typo to the name: the key is checked first, as --set's is."""
    recipe = grid_recipe(tmp_path, tiny_teacher)
    result = runner.invoke(app, ["distill", str(recipe), "--grid", "loss.divergnce=fkl,akl"])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line == "error: --grid loss.divergnce=fkl: loss.divergnce: unknown key. Did you mean 'divergence'?"
    assert not (tmp_path / "runs").exists()


def test_a_bad_point_is_refused_before_any_run(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    result = runner.invoke(app, ["distill", str(recipe), "--grid", "loss.divergence=fkl,nope"])
    assert result.exit_code == 2, result.output
    assert "--grid point loss.divergence=nope" in result.output
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_the_product_in_order(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    points = plan_grid(recipe, [], parse_axes(["loss.divergence=fkl,rkl", "seed=0,1"]))
    assert [p.recipe.name for p in points] == ["tiny-fkl-s0", "tiny-fkl-s1", "tiny-rkl-s0", "tiny-rkl-s1"]
    assert {p.state for p in points} == {"new"}
    result = runner.invoke(app, ["distill", str(recipe), "--grid", "loss.divergence=fkl,rkl", "--dry-run"])
    assert result.exit_code == 0 and "tiny-rkl-s0" in result.output and "new" in result.output
    assert not (tmp_path / "runs").exists()


def test_failed_runs_are_reported_and_the_grid_goes_on(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    points = plan_grid(recipe, [], parse_axes(["seed=0,1,2"]))
    calls: list[list[str]] = []
    codes = iter([2, 0, 0])
    done = run_grid(recipe, [], points, lambda args: calls.append(args) or next(codes))
    assert [p.outcome for p in done] == ["failed (exit 2)", "finished", "finished"]
    assert len(calls) == 3 and all(c[:2] == ["distill", str(recipe)] for c in calls)
    assert calls[1][-2:] == ["--set", "seed=1"]


def test_an_interrupted_run_stops_the_grid(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    points = plan_grid(recipe, [], parse_axes(["seed=0,1"]))
    done = run_grid(recipe, [], points, lambda args: 130)
    assert [p.outcome for p in done] == ["interrupted", None]


def test_grid_runs_skips_finished_resumes_killed_and_compares(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    args = ["distill", str(recipe), "--grid", "loss.divergence=fkl,rkl", "--grid", "seed=0,1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    runs = tmp_path / "runs"
    names = ["tiny-fkl-s0", "tiny-fkl-s1", "tiny-rkl-s0", "tiny-rkl-s1"]
    assert all((runs / name / "run.json").is_file() for name in names)
    records = {name: json.loads((runs / name / "run.json").read_text()) for name in names}
    assert {r["divergence"] for r in records.values()} == {"fkl", "rkl"} and {r["seed"] for r in records.values()} == {
        0,
        1,
    }
    # The seed axis repeats each divergence: the table compares the two arms, each the mean of its two runs.
    assert "kd compare · 2 arms of 4 runs" in first.output and "grid outcome" in first.output
    assert "tiny-fkl-s{0,1}" in first.output and "training seeds ±" in first.output

    # One run killed after its first checkpoint (no run record, no student), one never started, one foreign folder.
    (runs / "tiny-fkl-s1" / "run.json").unlink()
    shutil.rmtree(runs / "tiny-fkl-s1" / "student")
    shutil.rmtree(runs / "tiny-rkl-s0")
    stamp = (runs / "tiny-rkl-s1" / "run.json").stat().st_mtime_ns
    points = plan_grid(recipe, [], parse_axes(["loss.divergence=fkl,rkl", "seed=0,1"]))
    assert [p.state for p in points] == ["finished", "resume", "new", "finished"]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (runs / "tiny-rkl-s1" / "run.json").stat().st_mtime_ns == stamp  # skipped, not run again
    assert (runs / "tiny-fkl-s1" / "run.json").is_file() and (runs / "tiny-rkl-s0" / "run.json").is_file()
    assert json.loads((runs / "tiny-fkl-s1" / "run.json").read_text())["resumed_from"] == 2


def test_a_folder_holding_something_else_is_left_alone(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    foreign = tmp_path / "runs" / "tiny-fkl-s0"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    points = plan_grid(recipe, [], parse_axes(["seed=0"]))
    assert points[0].state == "conflict"
    done = run_grid(recipe, [], points, lambda args: pytest.fail("a conflicting folder must not be run"))
    assert done[0].outcome == "left alone (conflict)"
    assert (foreign / "notes.txt").read_text() == "mine"


def test_grid_point_folder_follows_the_recipe(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    point: GridPoint = plan_grid(recipe, [], parse_axes(["seed=3"]))[0]
    assert point.folder.path == tmp_path / "runs" / "tiny-fkl-s3"


def test_eval_takes_several_runs_or_a_glob_and_skips_finished_passes(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    assert runner.invoke(app, ["distill", str(recipe), "--grid", "loss.divergence=fkl,rkl"]).exit_code == 0
    runs = tmp_path / "runs"
    pattern = str(runs / "tiny-*-s0")
    args = ["eval", pattern, "--seeds", "1", "--max-examples", "2", "--max-new-tokens", "4"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    passes = sorted((runs).glob("tiny-*-s0/eval/**/seed-1*"))
    assert {p.relative_to(runs).parts[0] for p in passes} == {"tiny-fkl-s0", "tiny-rkl-s0"}
    stamps = {p: p.stat().st_mtime_ns for p in passes}
    again = runner.invoke(app, [*args[:1], str(runs / "tiny-rkl-s0"), str(runs / "tiny-fkl-s0"), *args[2:]])
    assert again.exit_code == 0, again.output
    assert again.output.count("seed-1: reused") == 2
    assert {p: p.stat().st_mtime_ns for p in passes} == stamps
    # A pattern that matches nothing, and --out with several targets, are one-line errors before any work.
    none = runner.invoke(app, ["eval", str(runs / "nothing-*")])
    assert none.exit_code == 2 and "matches no finished run folder" in none.output
    both = runner.invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "--out names one eval folder" in both.output


def test_eval_of_several_targets_goes_on_after_a_failed_one(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = grid_recipe(tmp_path, tiny_teacher)
    assert runner.invoke(app, ["distill", str(recipe), "--grid", "seed=0,1"]).exit_code == 0
    first, second = (tmp_path / "runs" / name for name in ("tiny-fkl-s0", "tiny-fkl-s1"))
    args = ["--seeds", "1", "--max-examples", "2"]
    assert runner.invoke(app, ["eval", str(first), *args, "--max-new-tokens", "4"]).exit_code == 0
    # The first run's eval folder holds passes of other settings, which kd eval refuses to overwrite.
    result = runner.invoke(app, ["eval", str(first), str(second), *args, "--max-new-tokens", "5"])
    assert result.exit_code == 1, result.output
    assert "failed for 1 of 2 targets" in result.output and str(first) in result.output.split("failed for")[1]
    assert list((second / "eval").glob("**/seed-1*"))
    missing = runner.invoke(app, ["eval", str(second), str(tmp_path / "no-such-model"), *args])
    assert missing.exit_code == 2 and "no-such-model" in missing.output


def test_name_placeholders_take_any_key_path() -> None:
    from kdcli.recipe import load_recipe

    quickstart = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    sets = ["name=q-{divergence}-{loss.kd_ratio}-{on_policy.ratio}-{loss.params.mu}-s{seed}", "loss.params={mu: 0.3}"]
    assert load_recipe(quickstart, [*sets, "loss.divergence=akl"]).name == "q-akl-0.5-0.0-0.3-s0"
    with pytest.raises(KdError, match=r"\{loss\.kdratio\} is not a recipe key"):
        load_recipe(quickstart, ["name=q-{loss.kdratio}"])


def test_a_run_killed_before_its_first_metrics_restarts(tmp_path: Path, tiny_teacher: Path) -> None:
    """A folder holding only the point's own recipe.yaml (killed right after it was created) is ours: restart."""
    from kdcli.runs import recipe_yaml

    recipe = grid_recipe(tmp_path, tiny_teacher)
    point = plan_grid(recipe, [], parse_axes(["seed=0"]))[0]
    point.folder.path.mkdir(parents=True)
    point.folder.recipe_file.write_text(recipe_yaml(point.recipe))
    again = plan_grid(recipe, [], parse_axes(["seed=0"]))[0]
    assert again.state == "restart"
    point.folder.recipe_file.write_text(recipe_yaml(point.recipe).replace("max_steps: 2", "max_steps: 3"))
    assert plan_grid(recipe, [], parse_axes(["seed=0"]))[0].state == "conflict"  # another recipe's run
