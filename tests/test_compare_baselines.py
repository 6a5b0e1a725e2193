"""kd compare beside the answers written without a model (`kd eval --baselines`): their columns, the runs that do
not beat them marked, and the stop rate, against values computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from compare_fixtures import add_eval, example, make_run, quality_answers

from kdcli.compare import compare_runs, load_runs, render_text
from kdcli.evaluation import EvalItem
from kdcli.evaluation.baselines import baseline_entry, baseline_rows, frequent_words

EXAMPLES = 30


def items() -> list[EvalItem]:
    return [EvalItem(str(example(i)["instruction"]), str(example(i)["prompt"]), (str(example(i)["reference"]),))
            for i in range(EXAMPLES)]  # fmt: skip


def add_baselines(run: Path) -> dict[str, dict]:
    """What `kd eval --baselines` adds to a set: the pass files and the results.json entry."""
    entries = {}
    for name, rows in baseline_rows(items(), lambda text: len(text.split())).items():
        entry = baseline_entry(name, rows)
        (run / "eval" / "starter" / f"{entry['label']}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        entries[name] = entry
    path = run / "eval" / "results.json"
    results = json.loads(path.read_text())
    results["sets"]["starter"]["sampling"]["baselines"] = entries
    path.write_text(json.dumps(results))
    return entries


@pytest.fixture()
def runs(tmp_path: Path) -> tuple[Path, Path]:
    good, salad = make_run(tmp_path, "good"), make_run(tmp_path, "salad")
    add_eval(good, quality_answers(0.9, "good"), examples=EXAMPLES)
    # "Word salad": the fixed string of frequent words, whatever the prompt, cut off at the token cap.
    fixed = frequent_words(items())
    add_eval(salad, lambda seed, index: (fixed, len(fixed.split())), examples=EXAMPLES)
    for path in (salad / "eval" / "starter").glob("seed-*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["stopped"] = "max_new_tokens" if row["index"] % 3 else "eos"  # 10 of 30 stop
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return good, salad


def test_reference_columns_and_the_run_that_does_not_beat_them(runs: tuple[Path, Path]) -> None:
    good, salad = runs
    entries = add_baselines(good)
    comparison = compare_runs(load_runs([good, salad]), resamples=2000)
    (starter,) = comparison.evaluation
    assert starter.references == ["prompt copied (no model)", "frequent words (no model)"]
    rouge = next(row for row in starter.rows if row.metric == "rougeL")
    for name, title in (("copy_prompt", "prompt copied (no model)"), ("frequent_words", "frequent words (no model)")):
        assert rouge.cells[title].mean == pytest.approx(entries[name]["metrics"]["rougeL"], abs=1e-9)
    # The salad run answers exactly the fixed string: its difference is 0 on every resample, so it does not beat it.
    assert rouge.cells["salad"].mean == pytest.approx(rouge.cells["frequent words (no model)"].mean, abs=1e-9)
    assert "frequent words (no model)" in rouge.cells["salad"].not_above
    assert rouge.cells["good"].not_above == []
    # The difference behind each mark is kept, with its interval: the good run's excludes 0, the salad's is 0.
    for title in starter.references:
        delta, ci = rouge.cells["good"].versus_references[title]
        assert delta == pytest.approx(rouge.cells["good"].mean - rouge.cells[title].mean, abs=1e-9)
        assert ci is not None and 0 < ci[0] <= delta <= ci[1]
    assert rouge.cells["salad"].versus_references["frequent words (no model)"][0] == pytest.approx(0.0, abs=1e-9)
    assert not rouge.cells["frequent words (no model)"].best  # a reference row is never the best run
    stop = next(row for row in starter.rows if row.metric == "stop_rate")
    assert stop.cells["good"].mean == 1.0 and stop.cells["salad"].mean == pytest.approx(10 / 30)
    assert stop.cells.get("prompt copied (no model)") is None  # nothing was generated, so nothing stopped
    text = render_text(comparison, "markdown")
    assert "not above: prompt copied (no model), frequent words (no model))" in text and "| stop rate |" in text
    assert rouge.cells["frequent words (no model)"].delta is None  # a reference is not tested against the baseline
    assert any("answers written without any model" in note for note in starter.notes)
    csv = render_text(comparison, "csv")
    assert "frequent words (no model)" in csv and ",not_above" in csv.splitlines()[0]


def test_without_baselines_there_are_no_reference_columns(runs: tuple[Path, Path]) -> None:
    comparison = compare_runs(load_runs(list(runs)), resamples=500)
    assert comparison.evaluation[0].references == []
    assert all(not cell.not_above for row in comparison.evaluation[0].rows for cell in row.cells.values() if cell)


def test_an_eval_folder_is_a_column_beside_the_runs(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """`kd compare runs/a evals/teacher`: the teacher's eval (no recipe, no training) as one more column."""
    from compare_fixtures import add_eval

    good, salad = runs
    teacher = tmp_path / "evals" / "teacher"
    teacher.mkdir(parents=True)
    add_eval(teacher, quality_answers(0.95, "teacher"), examples=EXAMPLES)
    # add_eval writes under <folder>/eval, as into a run; an eval folder is that folder itself.
    for item in (teacher / "eval").iterdir():
        item.rename(teacher / item.name)
    (teacher / "eval").rmdir()
    for pool in (False, True):
        columns = [good, teacher] if pool else [good, salad, teacher]  # the fixture's two runs share a seed
        comparison = compare_runs(pool_or_not(load_runs(columns), pool), resamples=500)
        assert comparison.runs == [p.name for p in columns]
        assert all("teacher" not in row.values for row in comparison.setup)
        rouge = next(row for row in comparison.evaluation[0].rows if row.metric == "rougeL")
        assert rouge.cells["teacher"] is not None and rouge.cells["teacher"].delta is not None
        train_ce = next(row for row in comparison.training if row.key == "eval_ce")
        assert train_ce.values["teacher"] is None
    assert "teacher" in render_text(comparison, "markdown")


def pool_or_not(loaded: list, pool: bool) -> list:
    from kdcli.compare.arms import pool_seeds

    return pool_seeds(loaded) if pool else loaded
