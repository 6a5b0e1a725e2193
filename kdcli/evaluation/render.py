"""Rich output for `kd eval`: a progress bar with tokens/s per pass, then the results and judge usage tables."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kdcli.evaluation.baselines import BASELINES, baseline_title
from kdcli.evaluation.judge.failures import JudgeFailures

# (key in metrics, row title, format): the papers' number first.
COLUMNS = (
    ("rougeL", "ROUGE-L", "{:.2f}"),
    ("exact_match", "EM", "{:.1f}"),
    ("length", "length", "{:.1f}"),
    ("stop_rate", "stop rate", "{:.2f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("judge", "judge", "{:.1f}"),
)


class RichEvalObserver:
    def __init__(self, out: Console | None = None) -> None:
        self.console = out or Console()
        self.progress: Progress | None = None
        self.task: Any = None

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(f"[dim]{escape(text)}[/dim]")

    def _start(self, description: str, total: int, unit: str) -> None:
        # One live display for the whole command, a task per pass: stopping and restarting a display per pass
        # leaves blank lines behind.
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold blue]{task.description}"),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                BarColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        self._finish_task()
        self.task = self.progress.add_task(description, total=total, rate="", unit=unit)

    def _finish_task(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def on_pass_start(self, set_name: str, label: str, total: int) -> None:
        self._start(f"{set_name} {label}", total, "examples")

    def on_pass_progress(self, done: int, tokens: int, elapsed: float) -> None:
        if self.progress is not None and self.task is not None:
            rate = f"{tokens / elapsed:.0f} tok/s" if elapsed > 0 else ""
            self.progress.update(self.task, completed=done, rate=rate)

    def on_pass_end(self, set_name: str, label: str, info: dict[str, Any]) -> None:
        self._finish_task()
        if info.get("reused"):
            how = "reused"
        else:
            speed = f", {info['tokens_per_s']:.0f} tok/s" if info.get("tokens_per_s") else ""
            how = f"generated {info.get('tokens', 0)} tokens in {info.get('seconds', 0):.0f} s{speed}"
        out = self.progress.console if self.progress else self.console
        out.print(f"[dim]{escape(set_name)} {label}: {how} · ROUGE-L {info['rougeL']:.2f}[/dim]", highlight=False)

    def on_judge_start(self, set_name: str, label: str, total: int) -> None:
        self._start(f"judge {set_name} {label}", total, "verdicts")

    def on_judge_progress(self, done: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, done)

    def on_judge_end(self, set_name: str, label: str) -> None:
        self._finish_task()

    def on_dry_run(self, prompt: list[dict[str, str]], estimate: dict[str, Any]) -> None:
        self.close()
        self.console.print(dry_run_panel(prompt, estimate))

    def on_end(self, results: dict[str, Any]) -> None:
        self.close()
        self.console.print(results_table(results))
        if results.get("judge_usage"):
            self.console.print(usage_table(results["judge_usage"]))
        for line in judge_failure_lines(results):
            self.console.print(f"[yellow]{escape(line)}[/yellow]", highlight=False, soft_wrap=True)
        self.console.print(f"[dim]results: {escape(results['eval_dir'])}/results.json[/dim]", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None


def _cell(metric: dict[str, Any] | None, fmt: str) -> str:
    if not metric or metric.get("mean") is None or math.isnan(metric["mean"]):
        return "—"
    text = fmt.format(metric["mean"])
    if len(metric.get("per_seed", {})) > 1:
        text += " ± " + fmt.format(metric["std"])
    return text


def _baseline_cell(entry: dict[str, Any], name: str) -> str:
    baseline = (entry.get("baselines") or {}).get(name)
    return "—" if not baseline else f"{baseline['metrics']['rougeL']:.2f}"


def results_table(results: dict[str, Any]) -> Table:
    """The sets evaluated in this run, one column each; a row per metric, mean ± std over the seeds."""
    target = results.get("target", {})
    table = Table(title=f"kd eval · {escape(str(target.get('name', '')))}", header_style="bold")
    table.add_column("metric", style="cyan", no_wrap=True)
    shown = [(name, mode, results["sets"][name][mode]) for name, mode in results.get("evaluated", [])]
    for name, mode, entry in shown:
        passes = "greedy" if mode == "greedy" else f"{len(entry['seeds'])} seeds"
        table.add_column(f"{name}\n{entry['examples']} ex · {passes}", justify="right")
    for key, title, fmt in COLUMNS:
        if any(key in entry["metrics"] or _nothing_judged(entry, key) for _, _, entry in shown):
            cells = ["n/a" if _nothing_judged(e, key) else _cell(e["metrics"].get(key), fmt) for _, _, e in shown]
            table.add_row(title, *cells)
    for name in BASELINES:  # `--baselines`: what answers written without a model score on the same prompts
        if any(name in (entry.get("baselines") or {}) for _, _, entry in shown):
            cells = [_baseline_cell(entry, name) for _, _, entry in shown]
            table.add_row(f"ROUGE-L, {baseline_title(name)}", *cells, style="dim")
    speeds = [entry["generation"].get("tokens_per_s") for _, _, entry in shown]
    if any(speeds):
        table.add_row("tokens/s", *[f"{v:.0f}" if v else "—" for v in speeds], style="dim")
    for _, _, entry in shown:
        if entry.get("judge", {}).get("failed_verdicts"):
            table.add_row("judge failures", *[str(e.get("judge", {}).get("failed_verdicts", "—")) for _, _, e in shown])
            break
    return table


def _nothing_judged(entry: dict[str, Any], key: str) -> bool:
    """The judge was asked on this set, and not one example got both verdicts: its score is not 0 but absent."""
    return key == "judge" and "judge" in entry and "judge" not in entry["metrics"]


def judge_failure_lines(results: dict[str, Any]) -> list[str]:
    """What became of the failed verdicts of each set evaluated in this run: how many, why, one reply."""
    lines = []
    for name, mode in results.get("evaluated", []):
        data = (results["sets"][name][mode].get("judge") or {}).get("failures")
        failures = JudgeFailures.from_dict(data) if data else None
        if failures and failures.failed:
            lines.append(f"judge on {name} ({mode}): {failures.describe()}")
    return lines


def usage_table(usage: dict[str, int]) -> Table:
    table = Table(title="judge usage (this run)", header_style="bold", show_header=False)
    table.add_column("", style="cyan")
    table.add_column("", justify="right")
    table.add_row("requests sent", f"{usage['requests']:,} (retries: {usage['retries']:,})")
    table.add_row("cache hits", f"{usage['cache_hits']:,}")
    table.add_row("unparseable replies", f"{usage['unparseable']:,} (each asked once more)")
    table.add_row("failed verdicts", f"{usage['failures']:,}", style="red" if usage["failures"] else None)
    table.add_row("prompt tokens", f"{usage['prompt_tokens']:,}")
    table.add_row("completion tokens", f"{usage['completion_tokens']:,}")
    if usage.get("cached_prompt_tokens") or usage.get("cached_completion_tokens"):
        saved = usage["cached_prompt_tokens"] + usage["cached_completion_tokens"]
        table.add_row("tokens not paid again (cache)", f"{saved:,}", style="dim")
    return table


def dry_run_panel(prompt: list[dict[str, str]], estimate: dict[str, Any]) -> Panel:
    parts = [f"[bold]{m['role']}[/bold]\n{escape(m['content'])}" for m in prompt] or ["(no requests)"]
    summary = (
        f"[bold]{estimate['requests']}[/bold] requests to {escape(estimate['model'])} "
        f"({estimate['cached']} already cached)  ·  ≈ {estimate['prompt_tokens']:,} prompt tokens  ·  "
        f"≤ {estimate['completion_tokens_max']:,} completion tokens. Nothing was sent."
    )
    return Panel(Group(*parts, "", summary), title="judge dry run: first request", expand=False)
