"""Console rendering for `kd cache-teacher`: a progress bar (tokens/s, ETA) and the summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table


class CacheProgress:
    """One bar per (phase, split); the speed column is tokens/s while caching and examples/s while generating."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold blue]{task.description}"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.progress.start()

    def message(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}[/dim]")

    def update(self, phase: str, split: str, done: int, total: int) -> None:
        key = (phase, split)
        unit = "tokens" if phase == "cache" else "examples"
        if key not in self.tasks:
            label = f"{'caching' if phase == 'cache' else 'generating'} {split}"
            self.tasks[key] = self.progress.add_task(label, total=total, completed=done, unit=unit, rate="")
        task = self.tasks[key]
        self.progress.update(task, completed=done, total=total)
        speed = self.progress.tasks[self.tasks[key]].speed
        self.progress.update(task, rate=f"{speed:,.0f} {unit}/s" if speed else "")

    def close(self) -> None:
        self.progress.stop()


def summary_table(manifest: dict[str, Any], out: str) -> Table:
    stats, writer = manifest["stats"], manifest["writer"]
    table = Table(title=f"teacher cache {out}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for split, entry in manifest["splits"].items():
        table.add_row(
            split, f"{entry['examples']} examples, {entry['tokens']:,} tokens in {len(entry['shards'])} shards"
        )
    dense = stats["dense_fp16_bytes_per_position"]
    table.add_row("labelled positions", f"{stats['positions']:,} (teacher records are stored for these)")
    table.add_row(
        "bytes / position",
        f"{stats['bytes_per_position']:.1f} at K={writer['top_k']} vs {dense:,} dense fp16 (2·V): "
        f"{stats['fraction_of_dense']:.2%}",
    )
    table.add_row("cache size", f"{stats['bytes'] / 1e6:,.1f} MB")
    table.add_row("top-K teacher mass", f"{stats['topk_mass_mean']:.4f} (mean over positions)")
    table.add_row("wall time", f"{stats['wall_seconds']:.1f} s")
    return table
