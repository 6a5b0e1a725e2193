"""Rich rendering for the terminal: progress bars and summary tables. No training logic lives here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class RichObserver:
    """Shows a training run: a progress bar with loss, tokens/s and ETA, then a summary table."""

    def __init__(self, out: Console | None = None) -> None:
        self.console = out or console
        self.progress: Progress | None = None
        self.task: Any = None
        self.elapsed: float | None = None  # the last step's elapsed_s, to time the next one

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(f"[dim]{text}[/dim]")

    def on_start(self, info: dict[str, Any]) -> None:
        params = info["parameters"]
        self.console.print(
            f"[bold]kd distill[/bold] → {info['run_dir']}  ·  divergence [cyan]{info['divergence']}[/cyan]  ·  "
            f"teacher {params['teacher'] / 1e6:.1f}M → student {params['student'] / 1e6:.1f}M params  ·  "
            f"{info['train_examples']} train / {info['eval_examples']} eval examples"
        )
        self.progress = Progress(
            TextColumn("[bold blue]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss [yellow]{task.fields[loss]}[/yellow]"),
            TextColumn("kd {task.fields[kd]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[gen]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], loss="-", kd="-", tps="-", gen="")
        if info.get("last_step"):  # a resumed run starts where its last checkpoint left it
            self.on_step(info["last_step"])

    def on_step(self, record: dict[str, Any]) -> None:
        if self.progress is None:
            return
        self.progress.update(
            self.task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            kd=f"{record['kd']:.4f}",
            tps=f"{record['tokens_per_s']:.0f}",
            gen=self._generation_share(record),
        )

    def _generation_share(self, record: dict[str, Any]) -> str:
        """On-policy runs: the share of the last step spent sampling from the student."""
        before, self.elapsed = self.elapsed, record.get("elapsed_s")
        gen_s = record.get("gen_s") or 0.0
        if "on_policy_ratio" not in record or before is None or self.elapsed is None or self.elapsed <= before:
            return ""
        return f"gen {min(1.0, gen_s / (self.elapsed - before)):.0%}"

    def on_eval(self, record: dict[str, Any]) -> None:
        self.message(
            f"eval @ step {record['step']}: loss {record['eval_loss']:.4f}  ce {record['eval_ce']:.4f}  "
            f"kd {record['eval_kd']:.4f}  ({record['eval_tokens']} tokens)"
        )

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.console.print(summary_table(summary))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"run {summary['name']}", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for key, label in (("eval_loss", "eval loss"), ("eval_ce", "eval CE"), ("eval_kd", "eval KD")):
        if key in before or key in after:
            table.add_row(label, _fmt(before.get(key)), _fmt(after.get(key)))
    final = summary.get("final") or {}
    table.add_row("train loss (last step)", "", _fmt(final.get("loss")))
    table.add_row("steps", "", str(summary["steps"]))
    table.add_row("tokens/s", "", f"{summary['tokens_per_s']:.0f}")
    table.add_row("wall time", "", f"{summary['wall_seconds']:.0f} s")
    table.add_row("student", "", f"{summary['run_dir']}/student")
    return table


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def keys_table(rows: Iterable[tuple[str, str, str]]) -> Table:
    table = Table(title="recipe keys", show_lines=False, header_style="bold")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("default")
    table.add_column("meaning")
    for key, default, description in rows:
        table.add_row(key, default.strip("`"), description.replace("`", ""))
    return table


def losses_table(
    specs: Iterable[Any], title: str = "divergences (loss.divergence)", params_key: str = "loss.params"
) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column("name", style="cyan", no_wrap=True)
    table.add_column("divergence")
    table.add_column(f"parameters ({params_key})")
    table.add_column("from")
    for spec in specs:
        params = ", ".join(f"{key}={value}" for key, value in spec.params.items())
        table.add_row(spec.name, spec.description, params, spec.paper)
    return table
