"""The `kd compare` command's body: validate options, load, compare, judge, render, plot. `kdcli/cli/` only
parses arguments and turns a `KdError` into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from kdcli.compare.core import Comparison, compare_runs
from kdcli.compare.export import FORMATS, render_text
from kdcli.compare.multiple import ADJUSTMENTS, DEFAULT_ADJUSTMENT
from kdcli.compare.render import print_table
from kdcli.compare.runs import load_runs
from kdcli.errors import KdError


def run_compare(
    runs: list[Path],
    console: Console,
    *,
    baseline: Path | None = None,
    plot: Path | None = None,
    fmt: str = "table",
    resamples: int = 10_000,
    judge: str | None = None,
    judge_model: str = "gpt-4",
    judge_url: str | None = None,
    judge_max_examples: int | None = None,
    judge_concurrency: int = 4,
    judge_retries: int = 5,
    judge_timeout: float = 120.0,
    api_key: str | None = None,
    pool_seeds: bool = False,
    adjust: str = DEFAULT_ADJUSTMENT,
) -> Comparison:
    """Compare, print, plot; the comparison is returned (for `--report-to`)."""
    if fmt not in FORMATS:
        raise KdError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}.")
    if adjust not in ADJUSTMENTS:
        raise KdError(f"--adjust: '{adjust}' is not one of {', '.join(ADJUSTMENTS)}.")
    if resamples < 100:
        raise KdError(f"--resamples: at least 100 (got {resamples}); 10000 gives p-values to about ±0.005.")
    if judge_max_examples is not None and judge_max_examples < 1:
        raise KdError(f"--judge-max-examples: must be at least 1 (got {judge_max_examples}).")
    if judge_concurrency < 1 or judge_retries < 0 or judge_timeout <= 0:
        raise KdError("--judge-concurrency must be ≥ 1, --judge-retries ≥ 0 and --judge-timeout > 0.")
    if plot is not None:
        from kdcli.compare.plot import check_plot_path

        check_plot_path(plot)
    paths = list(runs)
    base_label = None
    if baseline is not None:
        match = [p for p in paths if p.resolve() == baseline.resolve()]
        if not match:
            paths.insert(0, baseline)  # a baseline not listed joins the comparison, as its first column
        base_index = paths.index(match[0]) if match else 0
    if pool_seeds and judge is not None:
        raise KdError("--judge compares two runs head to head, one answer against one; drop --pool-seeds for it.")
    loaded = load_runs(paths)
    if baseline is not None:
        base_label = loaded[base_index].label
    if pool_seeds:
        from kdcli.compare.arms import pool_seeds as pool

        base_path = loaded[base_index].path if baseline is not None else None
        loaded = pool(loaded)
        if base_path is not None:
            base_label = next(arm.label for arm in loaded if any(f.path == base_path for f in arm.folders()))
    client = None
    if judge is not None:
        # Checked before the (possibly slow) statistics, so a missing key costs nothing.
        from kdcli.compare.head_to_head import judge_client
        from kdcli.evaluation.judge import JudgeSettings

        settings = JudgeSettings(judge_model, judge_url, judge_concurrency, judge_retries, timeout=judge_timeout)
        base_run = next(r for r in loaded if r.label == (base_label or loaded[0].label))
        client = judge_client(judge, settings, base_run, api_key)
    comparison = compare_runs(loaded, base_label, resamples=resamples, adjust=adjust)
    if client is not None:
        from kdcli.compare.head_to_head import head_to_head

        head_to_head(comparison, loaded, client, max_examples=judge_max_examples)
    if fmt == "table":
        print_table(comparison, console)
    else:
        typer.echo(render_text(comparison, fmt), nl=False)
    if plot is not None:
        from kdcli.compare.plot import write_plot

        write_plot(comparison, plot)
        if fmt == "table":
            console.print(f"[dim]plot: {plot}[/dim]", highlight=False)
    if client is not None and judge is not None:
        from kdcli.evaluation.judge.failures import JudgeFailures, check_some_succeeded

        failures = sum((h.failures for h in comparison.head_to_head), JudgeFailures())
        check_some_succeeded(failures, judge, str(client.cache.path))
    return comparison
