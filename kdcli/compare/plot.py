"""`kd compare --plot out.png`: training loss curves, eval metrics as bars with whiskers at the 95 % interval
over prompts, and the divergences' diagnostics over steps, in one PNG. matplotlib is imported here only, with the
Agg backend, so `kd compare` without --plot and `kd --help` never load it."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from kdcli.compare.core import Comparison
from kdcli.durable import write_bytes_atomic
from kdcli.errors import KdError

_TRAINER_CURVES = frozenset({"loss", "kd", "ce", "grad_norm", "eval_loss"})


def smooth(values: Sequence[float], alpha: float | None = None) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's), with a span of about a tenth of the curve."""
    if alpha is None:
        alpha = min(0.5, 2.0 / (max(10, len(values) // 10) + 1))
    out: list[float] = []
    average = 0.0
    for i, value in enumerate(values, 1):
        average = (1 - alpha) * average + alpha * value
        out.append(average / (1 - (1 - alpha) ** i))
    return out


def check_plot_path(path: Path) -> None:
    """Refuse a bad --plot path before any work is done."""
    if path.suffix.lower() != ".png":
        raise KdError(f"--plot: {path} should end in .png (kd writes a PNG).")
    if not path.parent.is_dir():
        raise KdError(f"--plot: the folder {path.parent} does not exist. Create it or choose another path.")


def write_plot(comparison: Comparison, path: Path) -> Path:
    path = Path(path)
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = comparison.runs
    diagnostics = sorted({key for curves in comparison.curves.values() for key in curves if key not in _TRAINER_CURVES})
    metric_panels = [(s, row) for s in comparison.evaluation for row in s.rows]
    panels = 1 + len(diagnostics) + len(metric_panels)
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]

    ax = flat[0]
    for label, color in zip(runs, colors, strict=True):
        curve = comparison.curves.get(label, {}).get("loss", [])
        if curve:
            steps, values = [s for s, _ in curve], [v for _, v in curve]
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values), color=color, linewidth=1.8, label=label)
        evals = comparison.curves.get(label, {}).get("eval_loss", [])
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o--", color=color, markersize=3, linewidth=0.8)
    ax.set(title="training loss (smoothed; raw faint; eval ○)", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)

    for ax, key in zip(flat[1:], diagnostics, strict=False):
        for label, color in zip(runs, colors, strict=True):
            curve = comparison.curves.get(label, {}).get(key, [])
            if curve:
                steps, values = [s for s, _ in curve], [v for _, v in curve]
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smooth(values), color=color, linewidth=1.8, label=label)
        ax.set(title=key, xlabel="step")
        ax.legend(fontsize=8)

    for ax, (s, row) in zip(flat[1 + len(diagnostics) :], metric_panels, strict=False):
        means, below, above, names, bar_colors = [], [], [], [], []
        for label, color in zip(runs, colors, strict=True):
            cell = row.cells.get(label)
            if cell is not None and math.isfinite(cell.mean):
                means.append(cell.mean)
                # The percentile interval need not be symmetric; a run without generation files has no whisker.
                low, high = cell.ci95 or (cell.mean, cell.mean)
                below.append(max(0.0, cell.mean - low))
                above.append(max(0.0, high - cell.mean))
                names.append(label)
                bar_colors.append(color)
        ax.bar(range(len(means)), means, yerr=[below, above], capsize=4, color=bar_colors)
        ax.set_xticks(range(len(means)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{s.set} ({s.mode}): {row.title}, mean, 95% CI over prompts", fontsize=9)

    for ax in flat[panels:]:
        ax.set_visible(False)
    figure.tight_layout()
    try:
        png = io.BytesIO()
        figure.savefig(png, dpi=110, format="png")
        write_bytes_atomic(path, png.getvalue())  # a failed write: one line naming the path and the space
    finally:
        plt.close(figure)
    return path
