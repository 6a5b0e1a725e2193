"""Rendering a `Comparison` for people: rich tables for the terminal, Markdown for a README or paper (`export` has
JSON and CSV for machines). Nothing is computed here beyond formatting."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kdcli.compare.core import Comparison, HeadToHead, ValueRow
from kdcli.compare.evalset import MetricCell, MetricRow, SetComparison
from kdcli.compare.ranking import HIGHER, LOWER
from kdcli.compare.seeds import TESTED, SeedTest, unpaired

MISSING = "—"
BEST = "★"
BELOW = "not above:"  # a run's ROUGE-L does not beat an answer written without a model
ARROWS = {HIGHER: "↑", LOWER: "↓"}
_BLOCKS = "▁▂▃▄▅▆▇█"


def legend(comparison: Comparison) -> str:
    arms = ""
    if comparison.arms:
        arms = (
            f"arms ({', '.join(f'{label}: {len(paths)} runs' for label, paths in comparison.arms.items())}): mean over "
            "the arm's training runs; training seeds ±: 95% Student t interval over the runs' values; the arm's CI, "
            "its Δ's CI and p: Student t on the prompt bootstrap's variance plus the training seeds' "
            "(Welch–Satterthwaite degrees of freedom); an arm's Δ against the baseline arm is paired by training "
            "seed where they share two or more (the mean of the per-seed differences, with their variance in place "
            "of the two arms'), else by Welch's sum · "
        )
    return arms + (
        "mean over seeds [95% CI over prompts: percentile bootstrap, the prompts resampled once per draw for every "
        "seed] · seeds ±: 95% Student t interval over the per-seed values (seed-to-seed spread only; none with one "
        f"seed) · Δ run − baseline {comparison.baseline} [95% CI, same bootstrap] · p: two-sided paired bootstrap "
        f"over prompts (one resample for both runs and every seed; {comparison.resamples:,} resamples), adjusted "
        f"for the number of tests in its table as that table's footer says · * p < 0.05, n.s. not significant · "
        f"{BEST} best · ↑ higher is better, ↓ lower is better, no arrow: neither"
    )


# ------------------------------------------------------------------------------------------------ formatting


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """The curve in `width` block characters (bucket means), scaled between its own min and max."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    if len(finite) > width:
        edges = [round(i * len(finite) / width) for i in range(width + 1)]
        finite = [sum(finite[a:b]) / (b - a) for a, b in itertools.pairwise(edges) if b > a]
    low, high = min(finite), max(finite)
    span = high - low
    return "".join(_BLOCKS[0 if span == 0 else min(7, int((v - low) / span * 8))] for v in finite)


def _number(value: float | None, fmt: str = "{:.4g}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if fmt == "{:.4g}" and abs(value) >= 1e4:
        return f"{value:,.0f}"
    return fmt.format(value)


def _text(value: str | None) -> str:
    return MISSING if value is None else value


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _signed(value: float, fmt: str) -> str:
    return ("+" if value >= 0 else "−") + fmt.format(abs(value))


def _mean_text(cell: MetricCell, fmt: str) -> str:
    """The mean and its interval over prompts."""
    text = fmt.format(cell.mean)
    if cell.ci95 is not None:
        text += f" [{fmt.format(cell.ci95[0])}, {fmt.format(cell.ci95[1])}]"
    return text


def _seeds_text(cell: MetricCell, fmt: str) -> str | None:
    """The spread over seeds, kept apart from the interval over prompts: the two answer different questions."""
    if cell.ci95_seeds is None:
        return None
    return f"{'training seeds' if cell.runs > 1 else 'seeds'} ± {fmt.format(cell.ci95_seeds)}"


def _delta_text(cell: MetricCell, fmt: str) -> str | None:
    if cell.delta is None:
        return None
    text = f"Δ {_signed(cell.delta, fmt)}"
    if cell.delta_ci95 is not None:
        text += f" [{_signed(cell.delta_ci95[0], fmt)}, {_signed(cell.delta_ci95[1], fmt)}]"
    if cell.p_value is not None and math.isnan(cell.p_value):
        text += " p n/a (identical in every run)"
    elif cell.p_value is not None:
        shown = cell.p_adjusted if cell.p_adjusted is not None else cell.p_value
        text += f" {_p(shown)} " + ("*" if cell.significant else "n.s.")
    if cell.unpaired and cell.p_value is not None and not math.isnan(cell.p_value):  # all paired: the legend says
        text += pairing_text(cell.pairs, cell.unpaired)
    return text


def pairing_text(pairs: int, left_out: int) -> str:
    """How two arms were paired by training seed, and the runs the pairing left out."""
    unpaired = f"; {left_out} unpaired run{'s' if left_out != 1 else ''} left out" if left_out else ""
    return f" (paired by seed, {pairs} pairs{unpaired})"


def adjusted_how(adjust: str, tests: int, family: str) -> str:
    """How a family's p-values were adjusted for their number (`--adjust`), in words."""
    count = f"{tests} test{'s' if tests != 1 else ''} of {family}"
    if adjust == "none":
        return f"p-values as tested, not adjusted for the {count} (--adjust none)"
    name = {"holm": "Holm", "bonferroni": "Bonferroni"}.get(adjust, adjust)
    return f"p-values {name}-adjusted for the {count} (--adjust {adjust})"


def adjustment_note(s: SetComparison) -> str | None:
    """The footer of an eval table: how its p-values were adjusted for their number."""
    if not s.tests:
        return None
    if s.adjust == "none":
        return adjusted_how(s.adjust, s.tests, "this table") + "."
    return (
        adjusted_how(s.adjust, s.tests, "this table") + ": a star keeps the chance of any false star in the table at "
        "0.05 or below; the intervals are not adjusted."
    )


def seed_text(test: SeedTest, fmt: str = "{:.3f}") -> str:
    """An arm's Δ against the baseline arm across training seeds: interval, adjusted p, and how it was tested."""
    text = f"Δ {_signed(test.delta, fmt)}"
    if test.ci95 is not None:
        text += f" [{_signed(test.ci95[0], fmt)}, {_signed(test.ci95[1], fmt)}]"
    if math.isnan(test.p_value):
        text += f" p n/a ({test.untested})" if test.untested else " p n/a"
    else:
        text += f" {_p(test.p_adjusted)} " + ("*" if test.significant else "n.s.")
    if not test.paired:
        return text + f" (Welch, {test.runs} against {test.baseline_runs} runs)"
    return text + pairing_text(test.pairs, unpaired(test))


def seed_rows(comparison: Comparison) -> dict[str, tuple[str, dict[str, str]]]:
    """By training row key: the row that follows it, its Δ against the baseline arm across training seeds."""
    rows = {}
    for key in dict.fromkeys(test.key for test in comparison.training_tests):
        tests = {test.run: test for test in comparison.training_tests if test.key == key}
        cells = {label: seed_text(tests[label]) if label in tests else MISSING for label in comparison.runs}
        cells[comparison.baseline] = "baseline"
        rows[key] = (seed_row_title(key), cells)
    return rows


def seed_row_title(key: str) -> str:
    return f"{TESTED[key]} Δ, training seeds"


def seed_note(comparison: Comparison) -> str | None:
    """How the training table's Δ rows were tested, and their p-values adjusted (each row a family of its own)."""
    notes = []
    for key in dict.fromkeys(test.key for test in comparison.training_tests):
        row = [test for test in comparison.training_tests if test.key == key]
        tests = sum(1 for test in row if not math.isnan(test.p_value))
        notes.append(
            f"{seed_row_title(key)}: each arm against the baseline arm, one value a training run: Student t on the "
            "differences of runs of the same training seed (the same data order; n − 1 df, n the pairs), Welch's t "
            "where the arms share fewer than two seeds; 95% interval of Δ, not adjusted; "
            f"{adjusted_how(row[0].adjust, tests, 'the row')} (docs/compare.md)."
        )
    return " ".join(notes) or None


def _title(row: MetricRow | ValueRow) -> str:
    arrow = ARROWS.get(row.direction)
    return f"{row.title} {arrow}" if arrow else row.title


def _set_title(s: SetComparison, arms: bool = False) -> str:
    size = f"{len(s.passes)} pass{'es' if len(s.passes) != 1 else ''}" + (" of every run" if arms else "")
    if s.examples is not None:
        size += f" × {s.examples} examples"
    return f"eval · {s.set} ({s.mode}) · {size}"


# ------------------------------------------------------------------------------------------------ rich


def rich_view(comparison: Comparison) -> Group:
    base = escape(comparison.baseline)
    parts: list[Any] = [
        Text.from_markup(f"[bold]kd compare[/bold] · {_columns(comparison)} · baseline [cyan]{base}[/cyan]")
    ]
    parts.append(_setup_table(comparison))
    parts.append(_training_table(comparison))
    parts.extend(_eval_table(comparison, s) for s in comparison.evaluation)
    if comparison.head_to_head:
        parts.append(_h2h_table(comparison))
    notes = notes_of(comparison)
    if notes:
        parts.append(Text("notes", style="bold"))
        parts.extend(Text(f"• {note}", style="yellow") for note in notes)
    parts.append(Text(legend(comparison), style="dim"))
    return Group(*parts)


def _columns(comparison: Comparison) -> str:
    if not comparison.arms:
        return f"{len(comparison.runs)} runs"
    folders = len(comparison.runs) - len(comparison.arms) + sum(len(p) for p in comparison.arms.values())
    return f"{len(comparison.runs)} arms of {folders} runs"


def _setup_table(comparison: Comparison) -> Table | Text:
    if not comparison.setup:
        return Text("setup: the recipes are identical (name and output_dir aside).", style="dim")
    table = Table(title="setup: recipe keys that differ", header_style="bold", title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    for label in comparison.runs:
        table.add_column(escape(label))
    for row in comparison.setup:
        table.add_row(row.key, *[escape(_text(row.values.get(label))) for label in comparison.runs])
    return table


def _training_table(comparison: Comparison) -> Table:
    table = Table(title="training", header_style="bold", title_justify="left")
    table.add_column("", style="cyan", no_wrap=True)
    for label in comparison.runs:
        table.add_column(escape(label), justify="right")
    tested = seed_rows(comparison)
    for row in comparison.training:
        cells = []
        for label in comparison.runs:
            text = _number(row.values.get(label))
            cells.append(f"[bold green]{text} {BEST}[/bold green]" if label in row.best else text)
        table.add_row(_title(row), *cells)
        if row.key in tested:
            title, texts = tested[row.key]
            table.add_row(title, *[escape(texts[label]) for label in comparison.runs])
    curves = [comparison.curves.get(label, {}).get("loss", []) for label in comparison.runs]
    if any(curves):
        lines = [sparkline([v for _, v in curve], width=16) or MISSING for curve in curves]
        table.add_row("loss curve", *lines, style="magenta")
    return table


def _eval_table(comparison: Comparison, s: SetComparison) -> Table:
    note = adjustment_note(s)
    table = Table(
        title=escape(_set_title(s, bool(comparison.arms))),
        header_style="bold",
        title_justify="left",
        caption=escape(note) if note else None,
        caption_justify="left",
    )
    table.add_column("metric", style="cyan", no_wrap=True)
    for label in comparison.runs:
        suffix = " (baseline)" if label == comparison.baseline else ""
        table.add_column(escape(label + suffix), justify="right")
    for title in s.references:
        table.add_column(escape(title), justify="right", style="dim")
    for row in s.rows:
        cells: list[Text | str] = []
        for label in [*comparison.runs, *s.references]:
            cell = row.cells.get(label)
            if cell is None:
                cells.append(Text(MISSING, style="dim"))
                continue
            text = Text(_mean_text(cell, row.format) + (f" {BEST}" if cell.best else ""))
            if cell.best:
                text.stylize("bold green")
            seeds = _seeds_text(cell, row.format)
            if seeds is not None:
                text.append("\n" + seeds, style="dim")
            delta = _delta_text(cell, row.format)
            if delta is not None:
                text.append("\n" + delta, style="bold" if cell.significant else "dim")
            below = _below_text(cell)
            if below is not None:
                text.append("\n" + below, style="bold red")
            cells.append(text)
        table.add_row(_title(row), *cells)
    return table


def _below_text(cell: MetricCell) -> str | None:
    """The answers written without a model that this run does not beat (ROUGE-L)."""
    return f"{BELOW} " + ", ".join(cell.not_above) if cell.not_above else None


def _h2h_table(comparison: Comparison) -> Table:
    table = Table(title="head-to-head judge (run vs baseline, both orders)", header_style="bold", title_justify="left")
    for name in ("run", "set", "pairs", "win", "tie", "loss", "excluded"):
        table.add_column(name, justify="left" if name in ("run", "set") else "right")
    for h in comparison.head_to_head:
        table.add_row(*map(escape, _h2h_cells(h)))
    return table


def _h2h_cells(h: HeadToHead) -> list[str]:
    """A head-to-head row; "n/a" for the rates of one where no pair was judged (every verdict failed)."""
    rates = [f"{rate:.1%}" if rate is not None else "n/a" for rate in (h.wins, h.ties, h.losses)]
    return [f"{h.run} vs {h.baseline}", f"{h.set} ({h.mode})", str(h.pairs), *rates, str(h.excluded)]


def notes_of(comparison: Comparison) -> list[str]:
    notes = list(comparison.notes)
    tested = seed_note(comparison)
    if tested:
        notes.append(tested)
    for s in comparison.evaluation:
        notes.extend(s.notes)
        notes.extend(
            f"{label}: {MISSING} on {s.set} ({s.mode}), not evaluated there. Fill it with: {hint}"
            for label, hint in s.missing.items()
        )
    return notes


def print_table(comparison: Comparison, console: Console) -> None:
    console.print(rich_view(comparison))


# ------------------------------------------------------------------------------------------------ markdown


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def md_stars(text: str) -> str:
    """`text` with each "*" escaped: a bare one would start emphasis in Markdown."""
    return text.replace("*", chr(92) + "*")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    aligned = ["---"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "| " + " | ".join(aligned) + " |"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text


def to_markdown(comparison: Comparison) -> str:
    runs = comparison.runs
    out = [f"## kd compare (baseline: {comparison.baseline})", ""]
    if comparison.setup:
        out += ["### Setup (recipe keys that differ)", ""]
        setup = [[f"`{r.key}`", *[_text(r.values.get(x)) for x in runs]] for r in comparison.setup]
        out.append(_md_table(["key", *runs], setup))
    else:
        out.append("The recipes are identical (name and output_dir aside).")
    out += ["", "### Training", ""]
    tested = seed_rows(comparison)
    rows = []
    for r in comparison.training:
        rows.append([_title(r), *[_bold(_number(r.values.get(x)), x in r.best) for x in runs]])
        if r.key in tested:
            title, texts = tested[r.key]
            rows.append([title, *[md_stars(texts[x]) for x in runs]])
    out.append(_md_table(["", *runs], rows))
    for s in comparison.evaluation:
        out += ["", f"### {_set_title(s, bool(comparison.arms)).removeprefix('eval · ')}", ""]
        rows = []
        for row in s.rows:
            cells = []
            for label in [*runs, *s.references]:
                cell = row.cells.get(label)
                if cell is None:
                    cells.append(MISSING)
                    continue
                text = _bold(_mean_text(cell, row.format), cell.best)
                parts = (_seeds_text(cell, row.format), _delta_text(cell, row.format), _below_text(cell))
                extra = [t for t in parts if t is not None]
                detail = md_stars("; ".join(extra))
                cells.append(f"{text} ({detail})" if detail else text)
            rows.append([_title(row), *cells])
        header = ["metric", *[x + (" (baseline)" if x == comparison.baseline else "") for x in runs], *s.references]
        out.append(_md_table(header, rows))
        note = adjustment_note(s)
        if note:
            out += ["", f"_{note}_"]
    if comparison.head_to_head:
        out += ["", "### Head-to-head judge", ""]
        out.append(
            _md_table(
                ["run", "set", "pairs", "win", "tie", "loss", "excluded"],
                [_h2h_cells(h) for h in comparison.head_to_head],
            )
        )
    notes = notes_of(comparison)
    if notes:
        out += ["", *[f"- {note}" for note in notes]]
    out += ["", f"_{md_stars(legend(comparison))}; best in bold._", ""]
    return "\n".join(out)
