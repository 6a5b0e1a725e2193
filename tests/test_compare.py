"""`kd compare` on synthetic run folders with known numbers: the t interval against scipy, the prompt-level paired
bootstrap against exact enumeration and the normal approximation, the setup diff, every output format, the plot,
missing and partial evals, bad folders, and the head-to-head judge against a fake OpenAI server. The bootstrap's
calibration over many null replications is in test_compare_calibration.py."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from compare_fixtures import add_eval, make_run, quality_answers, recipe
from fake_openai import FakeOpenAI, Reply
from rich.console import Console
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.compare import compare_runs, load_runs, print_table, setup_diff, sparkline, t_quantile, to_markdown
from kdcli.compare.head_to_head import head_to_head, judge_client
from kdcli.compare.plot import write_plot
from kdcli.compare.stats import DistinctStat, MeanStat, RatioStat, observed, paired_bootstrap, prompt_bootstrap
from kdcli.compare.student_t import mean_ci
from kdcli.errors import KdError
from kdcli.evaluation.judge import JudgeSettings
from kdcli.evaluation.metrics import distinct_n, words

runner = CliRunner()


def kd_compare(*args: str | Path):
    return runner.invoke(app, ["compare", *[str(a) for a in args]])


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """fkl (weak answers) and akl (strong answers), both evaluated on the same 3 seeds × 30 examples."""
    fkl = make_run(tmp_path, "fkl")
    akl = make_run(
        tmp_path, "akl", divergence="akl", recipe_changes={"loss__params": {"mu": 0.5}, "train__lr": 2e-4},
        diagnostics={"akl_head_weight": 0.4}, tokens_per_s=1100.0,
    )  # fmt: skip
    add_eval(fkl, quality_answers(0.2, "fkl"))
    add_eval(akl, quality_answers(0.8, "akl"))
    return fkl, akl


# --- arithmetic ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 100, 1000])
@pytest.mark.parametrize("p", [0.975, 0.995, 0.9, 0.6, 0.025])
def test_t_quantile_matches_scipy(df: int, p: float) -> None:
    assert t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9, abs=1e-12)


def test_mean_ci_matches_scipy_t_interval() -> None:
    values = [41.2, 44.9, 43.1, 39.8, 45.5]
    ci = mean_ci(values)
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert ci.mean == pytest.approx(np.mean(values)) and ci.n == 5
    assert ci.half_width == pytest.approx((high - low) / 2, rel=1e-10)
    assert mean_ci([3.0]).half_width is None and mean_ci([3.0]).mean == 3.0  # one seed: no interval


def test_distinct_stat_is_distinct_n_of_the_resampled_corpus() -> None:
    texts = ["the cat sat on the mat", "the dog sat", "a cat , a dog !", "", "the the the", "on the mat again"]
    rng = np.random.default_rng(1)
    counts = rng.multinomial(len(texts), np.full(len(texts), 1 / len(texts)), size=50).astype(float)
    for n in (1, 2):
        stat = DistinctStat([words(t) for t in texts], n)
        got = stat(counts)
        for row, value in zip(counts, got, strict=True):
            corpus = [t for t, c in zip(texts, row, strict=True) for _ in range(int(c))]
            assert value == pytest.approx(distinct_n(corpus, n))
        assert observed(stat) == pytest.approx(distinct_n(texts, n))


def test_ratio_stat_is_the_judge_score() -> None:
    stat = RatioStat([8, 6, 7], [9, 9, 5])
    assert observed(stat) == pytest.approx(100 * 21 / 23)
    assert stat(np.array([[2.0, 0.0, 1.0]]))[0] == pytest.approx(100 * (16 + 7) / (18 + 5))


def _exact_bootstrap_p(passes: list[tuple[list[float], list[float]]]) -> float:
    """P(|δ* − δ̂| ≥ |δ̂|) over every equally likely resample of the prompts, no randomness at all. One resample is
    one tuple of prompt indices, and it applies to every pass (the passes are seeds of the same prompts)."""
    n = len(passes[0][0])
    observed_delta = np.mean([np.mean(b) - np.mean(a) for a, b in passes])
    extreme = total = 0
    for idx in itertools.product(range(n), repeat=n):
        delta = np.mean([np.mean([b[i] - a[i] for i in idx]) for a, b in passes])
        total += 1
        extreme += abs(delta - observed_delta) >= abs(observed_delta) - 1e-12
    return extreme / total


def test_paired_bootstrap_p_matches_exact_enumeration() -> None:
    # Three seeds of the same five prompts; prompt 3 is the run's big win under every seed, as in real evals.
    passes = [
        ([1.0, 0.0, 0.5, 0.2, 0.4], [1.0, 1.0, 0.0, 0.9, 0.5]),
        ([0.8, 0.1, 0.4, 0.1, 0.6], [0.9, 0.7, 0.3, 1.0, 0.4]),
        ([0.9, 0.2, 0.6, 0.0, 0.5], [0.7, 0.8, 0.6, 0.8, 0.4]),
    ]
    exact = _exact_bootstrap_p(passes)
    assert 0.05 < exact < 0.5  # a p-value with room on both sides, so the comparison means something
    result = paired_bootstrap([(MeanStat(a), MeanStat(b)) for a, b in passes], resamples=40_000, seed=3)
    assert result is not None
    assert result.delta == pytest.approx(np.mean([np.mean(b) - np.mean(a) for a, b in passes]))
    # Monte Carlo error of a proportion from 40k draws: sd ≤ 0.0025; allow 4 sd.
    assert result.p_value == pytest.approx(exact, abs=0.01)


def test_repeated_seeds_are_not_new_evidence() -> None:
    """Three copies of one pass are one pass: the same prompts answered the same way carry no more evidence."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, 40), rng.normal(0.3, 1, 40)
    once = paired_bootstrap([(MeanStat(a), MeanStat(b))], resamples=2000, seed=1)
    thrice = paired_bootstrap([(MeanStat(a), MeanStat(b))] * 3, resamples=2000, seed=1)
    assert once is not None and thrice is not None
    assert thrice.p_value == once.p_value and thrice.ci95 == pytest.approx(once.ci95)
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap([(MeanStat(a), MeanStat(b)), (MeanStat(a[:30]), MeanStat(b[:30]))], resamples=200)


def test_bootstrap_intervals_match_the_normal_approximation() -> None:
    """On a mean over many prompts the percentile interval is close to mean ± 1.96 · SE, with SE over prompts of the
    per-prompt mean over seeds (plug-in variance, as the bootstrap's), however small the seed-to-seed noise."""
    rng = np.random.default_rng(11)
    prompt, own = rng.normal(0, 5, 400), rng.normal(0.5, 2, 400)  # `own`: the run's per-prompt effect, every seed
    a = [prompt + rng.normal(0, 1, 400) for _ in range(3)]
    b = [prompt + own + rng.normal(0, 1, 400) for _ in range(3)]
    boot = prompt_bootstrap([[MeanStat(x) for x in a], [MeanStat(x) for x in b]], resamples=20_000, seed=2)
    assert boot is not None
    per_prompt_a = np.mean(a, axis=0)
    low, high = boot.interval(0) or (math.nan, math.nan)
    se = per_prompt_a.std() / math.sqrt(400)
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.05)
    assert (low + high) / 2 == pytest.approx(per_prompt_a.mean(), abs=0.1 * se)
    test = boot.paired(0, 1)
    assert test is not None and test.ci95 is not None
    se_delta = (np.mean(b, axis=0) - per_prompt_a).std() / math.sqrt(400)
    assert (test.ci95[1] - test.ci95[0]) / 2 == pytest.approx(1.96 * se_delta, rel=0.05)


def test_paired_bootstrap_p_agrees_with_paired_t_test_on_a_large_sample() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(50, 10, 400)
    noise = rng.normal(0, 10, 400)
    b = a + noise - noise.mean() + 0.9  # mean difference 0.9, sd ≈ 10, n = 400: t ≈ 1.8
    t_p = scipy.stats.ttest_rel(b, a).pvalue
    result = paired_bootstrap([(MeanStat(a), MeanStat(b))], resamples=20_000)
    assert result is not None and 0.01 < t_p < 0.2  # a regime where both tests have resolution
    assert result.p_value == pytest.approx(t_p, abs=0.02)
    same = paired_bootstrap([(MeanStat(a), MeanStat(a))], resamples=1000)
    far = paired_bootstrap([(MeanStat(a), MeanStat(a + 100))], resamples=1000)
    assert same is not None and math.isnan(same.p_value) and not same.significant  # identical: nothing to test
    assert far is not None and far.p_value == pytest.approx(1 / 1001) and far.significant


# --- setup diff -------------------------------------------------------------------------------------------------


def test_setup_diff_shows_only_differing_keys_dotted() -> None:
    a = recipe("a")
    b = recipe("b", loss__divergence="akl", loss__params={"mu": 0.5}, train__lr=2e-4, student__layers=[0, 2])
    rows = {row.key: row.values for row in setup_diff({"a": a, "b": b})}
    assert rows == {
        "student.layers": {"a": "every-other", "b": "[0, 2]"},
        "loss.divergence": {"a": "fkl", "b": "akl"},
        "loss.params": {"a": "{}", "b": None},
        "loss.params.mu": {"a": None, "b": "0.5"},
        "train.lr": {"a": "0.0001", "b": "0.0002"},
    }  # name differs too, but it is the column title, not the setup
    assert setup_diff({"a": a, "a2": recipe("a2")}) == []


def test_setup_diff_always_shows_the_layers_kd_chose() -> None:
    chosen = {"keep": 2, "by": "loss", "examples": 8, "indices": [0, 3]}
    a, b = recipe("a", student__layers=chosen), recipe("b", student__layers=chosen, train__lr=2e-4)
    rows = {row.key: row.values for row in setup_diff({"a": a, "b": b})}
    assert rows == {
        "student.layers.indices": {"a": "[0, 3]", "b": "[0, 3]"},
        "train.lr": {"a": "0.0001", "b": "0.0002"},
    }


# --- the comparison ---------------------------------------------------------------------------------------------


def test_compare_numbers_against_hand_computation(two_runs: tuple[Path, Path]) -> None:
    fkl, akl = two_runs
    comparison = compare_runs(load_runs([fkl, akl]))
    assert comparison.baseline == "fkl"
    (starter,) = comparison.evaluation
    assert starter.passes == ["seed-10", "seed-20", "seed-30"] and starter.examples == 30
    rows = {row.metric: row for row in starter.rows}
    assert list(rows) == ["rougeL", "exact_match", "distinct_1", "distinct_2", "length", "stop_rate"]
    # Length: mean tokens per pass, then the spread over the three passes, mean ± t·s/√n, checked against scipy;
    # and the interval over prompts, checked against the normal approximation over the 30 per-prompt means.
    per_prompt = {}
    for run in (fkl, akl):
        tokens = []
        for seed in (10, 20, 30):
            lines = (run / "eval" / "starter" / f"seed-{seed}.jsonl").read_text().splitlines()
            tokens.append([json.loads(line)["tokens"] for line in lines])
        per_seed, per_prompt[run.name] = np.mean(tokens, axis=1), np.mean(tokens, axis=0)
        cell = rows["length"].cells[run.name]
        assert cell is not None and cell.seeds == 3 and cell.ci95 is not None
        low, high = scipy.stats.t.interval(0.95, 2, loc=np.mean(per_seed), scale=scipy.stats.sem(per_seed))
        assert cell.mean == pytest.approx(np.mean(per_seed)) and cell.ci95_seeds == pytest.approx((high - low) / 2)
        se = per_prompt[run.name].std() / math.sqrt(30)
        assert cell.ci95[0] < cell.mean < cell.ci95[1]
        assert (cell.ci95[1] - cell.ci95[0]) / 2 == pytest.approx(1.96 * se, rel=0.15)
    length = rows["length"].cells["akl"]
    assert length is not None and length.delta_ci95 is not None and length.delta is not None
    assert length.delta_ci95[0] < length.delta < length.delta_ci95[1]
    se = (per_prompt["akl"] - per_prompt["fkl"]).std() / math.sqrt(30)
    assert (length.delta_ci95[1] - length.delta_ci95[0]) / 2 == pytest.approx(1.96 * se, rel=0.15)
    # Per-seed values recomputed from the pass files equal what kd eval wrote to results.json.
    results = json.loads((akl / "eval" / "results.json").read_text())["sets"]["starter"]["sampling"]["metrics"]
    akl_em = rows["exact_match"].cells["akl"]
    assert akl_em is not None and akl_em.mean == pytest.approx(results["exact_match"]["mean"])
    base_em = rows["exact_match"].cells["fkl"]
    assert base_em is not None and base_em.delta is None and base_em.p_value is None
    assert akl_em.delta == pytest.approx(akl_em.mean - base_em.mean)
    assert akl_em.p_value is not None and akl_em.p_value < 0.001 and akl_em.significant and akl_em.best
    assert not base_em.best
    assert not any(cell and cell.best for cell in rows["length"].cells.values())  # length has no better side
    training = {row.key: row for row in comparison.training}
    assert training["tokens_per_s"].best == ["akl"] and training["eval_ce"].best == ["fkl"]
    assert training["train_loss"].direction == "none"  # different divergences: losses not ranked
    assert training["akl_head_weight"].values["fkl"] is None
    assert training["akl_head_weight"].values["akl"] == pytest.approx(0.4, abs=0.01)
    assert "valid_positions" not in training


def test_rich_table_capture(two_runs: tuple[Path, Path]) -> None:
    comparison = compare_runs(load_runs(list(two_runs)), resamples=500)
    console = Console(record=True, width=220, color_system=None)
    print_table(comparison, console)
    text = console.export_text()
    assert "setup: recipe keys that differ" in text and "loss.params.mu" in text and "train.lr" in text
    assert "training" in text and "akl_head_weight (mean over steps)" in text
    assert "eval · starter (sampling) · 3 passes × 30 examples" in text and "fkl (baseline)" in text
    assert re.search(r"ROUGE-L ↑ .*\d \[[\d.]+, [\d.]+\] ★", text) and "seeds ± " in text
    # The smallest p of 500 resamples, 1/501, Holm-adjusted for the table's 5 tests: 5/501.
    assert re.search(r"Δ \+\d+\.\d+ \[\+\d+\.\d+, \+\d+\.\d+\] p=0\.010 \*", text)
    assert "p-values Holm-adjusted for the 5 tests of this table" in " ".join(text.split())
    assert "length (tokens)" in text and "n.s." in text  # length differs little: not significant
    curve_line = next(line for line in text.splitlines() if "loss curve" in line)
    assert re.search("[▁▂▃▄▅▆▇█]{16}", curve_line)


def test_sparkline() -> None:
    assert sparkline([3, 2, 1]) == "█▅▁"
    assert len(sparkline(list(range(100)), width=20)) == 20 and sparkline([]) == ""
    assert sparkline([1.0, 1.0]) == "▁▁"


def test_markdown_json_csv_formats(two_runs: tuple[Path, Path]) -> None:
    fkl, akl = two_runs
    result = kd_compare(fkl, akl, "--format", "markdown", "--resamples", "500")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "### Setup (recipe keys that differ)" in lines and "### starter (sampling) · 3 passes × 30 examples" in lines
    table_lines = [line for line in lines if line.startswith("|")]
    assert table_lines and all(line.endswith("|") for line in table_lines)
    assert any("| exact match ↑ |" in line and "**" in line and "Δ +" in line and r"\*)" in line for line in lines)
    assert any("| length (tokens) |" in line and "(seeds ± " in line and "; Δ " in line for line in lines)

    result = kd_compare(fkl, akl, "--format", "json", "--resamples", "500")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["runs"] == ["fkl", "akl"] and data["baseline"] == "fkl"
    em = next(r for r in data["evaluation"][0]["rows"] if r["metric"] == "exact_match")
    assert em["cells"]["akl"]["significant"] is True and em["cells"]["fkl"]["delta"] is None
    low, high = em["cells"]["akl"]["ci95"]
    assert low < em["cells"]["akl"]["mean"] < high and em["cells"]["akl"]["ci95_seeds"] > 0
    assert em["cells"]["akl"]["delta_ci95"][0] > 0 and em["cells"]["fkl"]["delta_ci95"] is None
    assert {row["key"] for row in data["setup"]} >= {"loss.divergence", "train.lr"}

    result = kd_compare(fkl, akl, "--format", "csv", "--resamples", "500")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert {r["section"] for r in rows} == {"setup", "training", "evaluation"}
    em_rows = {r["run"]: r for r in rows if r["section"] == "evaluation" and r["key"] == "exact_match"}
    assert float(em_rows["akl"]["delta"]) == pytest.approx(em["cells"]["akl"]["delta"])
    assert float(em_rows["akl"]["p_value"]) < 0.05 and em_rows["akl"]["best"] == "True"
    assert float(em_rows["akl"]["ci95_low"]) == pytest.approx(low) and float(em_rows["akl"]["ci95_high"]) == high
    assert float(em_rows["akl"]["ci95_seeds"]) == pytest.approx(em["cells"]["akl"]["ci95_seeds"])
    assert float(em_rows["akl"]["delta_ci95_low"]) > 0 and em_rows["fkl"]["delta_ci95_low"] == ""


def test_table_format_through_the_cli_and_bad_format(two_runs: tuple[Path, Path]) -> None:
    result = kd_compare(*two_runs, "--resamples", "200")
    assert result.exit_code == 0, result.output
    assert "kd compare · 2 runs · baseline fkl" in result.output
    result = kd_compare(*two_runs, "--format", "html")
    assert result.exit_code == 2 and "--format: 'html' is not one of table, markdown, json, csv." in result.output


def test_baseline_option_reorders_deltas(two_runs: tuple[Path, Path]) -> None:
    fkl, akl = two_runs
    result = kd_compare(fkl, akl, "--baseline", akl, "--format", "json", "--resamples", "200")
    data = json.loads(result.output)
    assert data["baseline"] == "akl"
    em = next(r for r in data["evaluation"][0]["rows"] if r["metric"] == "exact_match")
    assert em["cells"]["akl"]["delta"] is None and em["cells"]["fkl"]["delta"] < 0


def test_plot_writes_a_png(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare.png"
    result = kd_compare(*two_runs, "--plot", out, "--resamples", "200")
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = kd_compare(*two_runs, "--plot", tmp_path / "nowhere" / "x.png")
    assert result.exit_code == 2 and "does not exist" in result.output
    with pytest.raises(KdError, match=r"\.png"):
        write_plot(compare_runs(load_runs(list(two_runs)), resamples=200), tmp_path / "x.pdf")


def test_missing_eval_shows_dash_and_the_kd_eval_command(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    bare = make_run(tmp_path, "bare")
    comparison = compare_runs(load_runs([*two_runs, bare]), resamples=200)
    (starter,) = comparison.evaluation
    assert all(row.cells["bare"] is None for row in starter.rows)
    assert starter.missing["bare"] == f"kd eval {bare} --data starter=builtin:starter --seeds 10,20,30"
    assert any(note.startswith("bare has no evaluation yet") and f"kd eval {bare}" in note for note in comparison.notes)
    console = Console(record=True, width=250, color_system=None)
    print_table(comparison, console)
    text = console.export_text()
    assert "—" in text and f"kd eval {bare} --data starter=builtin:starter" in text
    assert "bare: — on starter (sampling), not evaluated there" in to_markdown(comparison)


def test_different_seeds_and_sets_are_compared_on_what_they_share(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    add_eval(a, quality_answers(0.5, "a"), seeds=(10, 20, 30), examples=20)
    add_eval(b, quality_answers(0.5, "b"), seeds=(20, 30, 40), examples=25)
    add_eval(a, quality_answers(0.5, "a"), set_name="extra", seeds=(10,), examples=5)
    comparison = compare_runs(load_runs([a, b]), resamples=300)
    starter, extra = comparison.evaluation
    assert starter.passes == ["seed-20", "seed-30"] and starter.examples == 20
    notes = " ".join(starter.notes)
    assert "different passes; compared on the 2 they share (seed-20, seed-30); left out: a seed-10; b seed-40." in notes
    assert "the runs' example sets differ; compared on the 20 examples they share (of up to 25)" in notes
    assert "passes of a run" not in notes
    cell = next(r for r in starter.rows if r.metric == "length").cells["a"]
    assert cell is not None and cell.seeds == 2
    assert extra.set == "extra" and extra.missing == {"b": f"kd eval {b} --data extra=data/extra.jsonl --seeds 10"}


def test_passes_with_different_examples_are_aligned_by_prompt(tmp_path: Path) -> None:
    """One resample of prompts must mean the same prompts in every pass: a pass that lacks examples shrinks every pass
    to the examples all share, and rows are matched by prompt, not by line."""
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    answers = quality_answers(0.5, "a")
    add_eval(a, answers, examples=20, missing={20: {3, 7}})
    add_eval(b, lambda seed, i: (answers(seed, i)[0], answers(seed, i)[1] + 1), examples=20)
    shuffled = b / "eval" / "starter" / "seed-20.jsonl"
    shuffled.write_text("".join(reversed(shuffled.read_text().splitlines(keepends=True))))
    (starter,) = compare_runs(load_runs([a, b]), resamples=300).evaluation
    assert starter.examples == 18
    assert any(
        "the runs' example sets differ and the passes of a run cover different examples (a seed-20 (18)); compared on "
        "the 18 examples they share (of up to 20), the same in every pass." in note
        for note in starter.notes
    )
    kept = [i for i in range(20) if i not in (3, 7)]
    cell = next(r for r in starter.rows if r.metric == "length").cells["b"]
    expected = np.mean([np.mean([answers(seed, i)[1] + 1 for i in kept]) for seed in (10, 20, 30)])
    assert cell is not None and cell.mean == pytest.approx(expected)
    # b is a plus one token on every (prompt, seed): aligned, every resample gives exactly +1.
    assert cell.delta == pytest.approx(1.0) and cell.delta_ci95 == pytest.approx((1.0, 1.0))
    assert cell.p_value == pytest.approx(1 / 301)


def test_judge_is_compared_on_the_examples_judged_in_every_pass(tmp_path: Path) -> None:
    """The judge's ratio of sums, over its own subset: the examples judged in every pass of every run."""
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    add_eval(a, quality_answers(0.5, "a"), judge=lambda seed, i: (5.0 + i % 3, 8.0))
    add_eval(b, quality_answers(0.5, "b"), judge=lambda seed, i: (6.0 + i % 3 + (seed == 20), 8.0))
    judged = b / "eval" / "starter" / "judge-seed-20.jsonl"
    judged.write_text(
        "".join(line for line in judged.read_text().splitlines(keepends=True) if '"index": 4,' not in line)
    )
    (starter,) = compare_runs(load_runs([a, b]), resamples=500).evaluation
    assert starter.examples == 30
    assert any(
        "judge score is compared on the 29 examples judged in every pass of every run" in n for n in starter.notes
    )
    row = next(r for r in starter.rows if r.metric == "judge")
    kept = [i for i in range(30) if i != 4]
    for label, score in (("a", lambda seed, i: 5.0 + i % 3), ("b", lambda seed, i: 6.0 + i % 3 + (seed == 20))):
        cell = row.cells[label]
        expected = np.mean([100 * sum(score(seed, i) for i in kept) / (8.0 * 29) for seed in (10, 20, 30)])
        assert cell is not None and cell.mean == pytest.approx(expected) and cell.ci95 is not None
        assert cell.ci95[0] < cell.mean < cell.ci95[1]
    cell = row.cells["b"]
    assert cell is not None and cell.delta == pytest.approx(100 * (1 + 1 / 3) / 8)
    # b's judge score is a's plus a constant per pass on every example, under a fixed reference score: every
    # resample of prompts gives exactly the same gain, so the p-value is the smallest B resamples allow.
    assert cell.p_value == pytest.approx(1 / 501) and cell.delta_ci95 is not None
    assert cell.delta_ci95[0] > 0


def test_greedy_pass_has_no_seed_spread_but_an_interval_and_a_p_value(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    add_eval(a, quality_answers(0.1, "a"), mode="greedy", examples=40)
    add_eval(b, quality_answers(0.9, "b"), mode="greedy", examples=40)
    (greedy,) = compare_runs(load_runs([a, b]), resamples=500).evaluation
    cell = next(r for r in greedy.rows if r.metric == "exact_match").cells["b"]
    assert greedy.mode == "greedy" and cell is not None and cell.ci95_seeds is None and cell.seeds == 1
    assert cell.ci95 is not None and cell.ci95[0] < cell.mean < cell.ci95[1]  # one pass: still an interval over prompts
    assert cell.p_value is not None and cell.significant


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "run.json").write_text("{not json"), "run.json: not valid JSON"),
        (lambda run: (run / "run.json").unlink(), "no run.json — the run did not finish"),
        (lambda run: (run / "recipe.yaml").write_text("a: [b"), "recipe.yaml: invalid YAML"),
        (lambda run: (run / "eval" / "results.json").write_text("[]"), "results.json: expected a JSON object"),
        (lambda run: (run / "eval" / "starter" / "seed-20.jsonl").write_text('{"a": 1}\nnope\n'),
         "seed-20.jsonl: line 2 is not valid JSON"),
    ],
)  # fmt: skip
def test_corrupt_run_folder_is_one_line_naming_the_file(two_runs: tuple[Path, Path], damage, message: str) -> None:
    fkl, akl = two_runs
    damage(akl)
    result = kd_compare(fkl, akl)
    assert result.exit_code == 2, result.output
    assert message in result.output and str(akl) in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unknown_folders(tmp_path: Path) -> None:
    result = kd_compare(tmp_path / "nope")
    assert result.exit_code == 2 and "no such folder" in result.output
    (tmp_path / "empty").mkdir()
    result = kd_compare(tmp_path / "empty")
    assert result.exit_code == 2 and "no run.json — is this a kd run folder? Run kd distill first." in result.output


def test_missing_generation_files_fall_back_to_results_json(two_runs: tuple[Path, Path]) -> None:
    fkl, akl = two_runs
    (akl / "eval" / "starter" / "seed-10.jsonl").unlink()
    (starter,) = compare_runs(load_runs([fkl, akl]), resamples=200).evaluation
    cell = next(r for r in starter.rows if r.metric == "rougeL").cells["akl"]
    results = json.loads((akl / "eval" / "results.json").read_text())["sets"]["starter"]["sampling"]["metrics"]
    assert cell is not None and cell.mean == pytest.approx(results["rougeL"]["mean"]) and cell.p_value is None
    assert cell.ci95 is None and cell.ci95_seeds is not None  # no generations: the spread over seeds only
    assert any("seed-10.jsonl is missing" in note for note in starter.notes)


# --- head-to-head judge -----------------------------------------------------------------------------------------

KEY = "sk-test-compare"
_ANSWER = re.compile(r"\[The Start of Assistant (\d)'s Answer\]\n(.*?)\n\n\[The End", re.DOTALL)


def _judge_prefers_correct(body: dict) -> Reply:
    """9 for an answer that is the reference, 4 otherwise: deterministic, so the rates can be counted by hand."""
    answers = dict(_ANSWER.findall(body["messages"][-1]["content"]))
    scores = [9 if answers[k].startswith("the answer to question") else 4 for k in ("1", "2")]
    return Reply(f"{scores[0]} {scores[1]}\nreasons")


def test_head_to_head_with_fake_openai(two_runs: tuple[Path, Path]) -> None:
    fkl, akl = two_runs
    expected = {"win": 0, "tie": 0, "loss": 0}
    asked = 0  # identical answers (both the reference) tie without a request
    for seed in (10, 20):
        for i in range(5):
            mine, theirs = quality_answers(0.8, "akl")(seed, i)[0], quality_answers(0.2, "fkl")(seed, i)[0]
            right, their_right = mine.startswith("the answer"), theirs.startswith("the answer")
            expected["win" if right > their_right else "tie" if right == their_right else "loss"] += 1
            asked += mine != theirs
    for path in (fkl, akl):  # judge two passes only, to keep the request count small
        results = json.loads((path / "eval" / "results.json").read_text())
        results["sets"]["starter"]["sampling"]["seeds"] = [10, 20]
        (path / "eval" / "results.json").write_text(json.dumps(results))
    runs = load_runs([fkl, akl])
    with FakeOpenAI(_judge_prefers_correct) as server:
        settings = JudgeSettings(model="judge-model", base_url=server.url, backoff=0.001, timeout=5.0)
        comparison = compare_runs(runs, resamples=200)
        (h2h,) = head_to_head(comparison, runs, judge_client("gpt4", settings, runs[0], KEY), max_examples=5)
        assert len(server.requests) == 2 * asked and asked >= 5  # both orders of each differing pair
        assert (h2h.run, h2h.baseline, h2h.pairs, h2h.excluded) == ("akl", "fkl", 10, 0)
        assert (h2h.wins, h2h.ties, h2h.losses) == pytest.approx(
            (expected["win"] / 10, expected["tie"] / 10, expected["loss"] / 10)
        )
        assert expected["win"] > 0
        # Again through the CLI: every reply comes from the baseline's judge cache; nothing is sent.
        result = runner.invoke(
            app,
            ["compare", str(fkl), str(akl), "--judge", "gpt4", "--judge-url", server.url, "--judge-model",
             "judge-model", "--judge-max-examples", "5", "--format", "json", "--resamples", "200"],
            env={"OPENAI_API_KEY": KEY},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 2 * asked
    (row,) = json.loads(result.output)["head_to_head"]
    assert row["cache_hits"] == 2 * asked and row["requests"] == 0 and row["wins"] == pytest.approx(h2h.wins)
    assert KEY not in (fkl / "eval" / "judge-cache.jsonl").read_text()


def test_head_to_head_needs_a_key(two_runs: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["compare", *map(str, two_runs), "--judge", "gpt4"], env={"OPENAI_API_KEY": ""})
    assert result.exit_code == 2 and "OPENAI_API_KEY is not set" in result.output
    result = kd_compare(*two_runs, "--judge", "claude")
    assert result.exit_code == 2 and "unknown judge 'claude'" in result.output


def test_math_helpers_are_finite() -> None:
    assert math.isnan(mean_ci([]).mean)


def test_head_to_head_with_a_judge_whose_replies_never_parse(tmp_path: Path) -> None:
    """`pairs 0 · win 0.0%` would read as measured: the rates are n/a, a note says what failed and why, and the
    command exits nonzero."""
    fkl, akl = make_run(tmp_path, "fkl"), make_run(tmp_path, "akl", divergence="akl")
    add_eval(fkl, quality_answers(0.0, "fkl"))  # wrong answers that differ: no pair ties without the judge
    add_eval(akl, quality_answers(0.0, "akl"))
    with FakeOpenAI([Reply("Both are good answers.")]) as server:
        args = ["compare", str(fkl), str(akl), "--judge", "gpt4", "--judge-url", server.url, "--judge-model", "m"]
        args += ["--judge-max-examples", "2", "--resamples", "200", "--judge-retries", "0"]
        table = runner.invoke(app, args, env={"OPENAI_API_KEY": KEY})
        as_json = runner.invoke(app, [*args, "--format", "json"], env={"OPENAI_API_KEY": KEY})
    assert table.exit_code == 2 and as_json.exit_code == 2, table.output
    (row,) = [line for line in table.output.splitlines() if line.startswith("│ akl vs fkl")]
    assert row.count("n/a") == 3 and "0.0%" not in row
    output = " ".join(table.output.split())
    assert "verdicts failed (unparseable verdict (2 replies):" in output
    assert "one reply: 'Both are good answers.'" in output and "no verdict succeeded" in output
    (h2h,) = json.loads(as_json.output[: as_json.output.rindex("}") + 1])["head_to_head"]
    assert h2h["pairs"] == 0 and h2h["wins"] is None and h2h["failures"]["failed"] == h2h["failures"]["asked"] > 0
