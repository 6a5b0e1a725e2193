"""Rich tables for `kd plan`. Only formatting: every number comes from `kdcli.plan.memory`."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from kdcli.plan.memory import Plan, Row, cache_bytes_per_token
from kdcli.sizes import format_bytes

OK, NO = "[green]✓[/green]", "[bold red]✗[/bold red]"


def _fit_mark(plan: Plan, nbytes: int) -> str:
    fits = plan.fits(nbytes)
    return "?" if fits is None else (OK if fits else NO)


def _mb(n: int) -> str:
    """Compact binary units for the wide table, so that it fits an 80-column terminal: 466M, 1.44G."""
    if not n:
        return "-"
    return format_bytes(n).replace(" KiB", "K").replace(" MiB", "M").replace(" GiB", "G").replace(" TiB", "T")


def header(plan: Plan) -> Text:
    s, t, st = plan.settings, plan.teacher, plan.student
    limit = format_bytes(s.device_memory) if s.device_memory is not None else "unknown"
    lines = [
        f"teacher {t.params / 1e6:,.1f}M params ({t.layers} layers, hidden {t.hidden}, vocab {t.vocab:,})  →  "
        f"student {st.params / 1e6:,.1f}M params ({st.layers} layers, hidden {st.hidden})"
        + (f", {st.trainable:,} trainable (LoRA)" if st.trainable is not None else ""),
        f"micro-batch {s.batch_size} × {s.seq_len} tokens (max_length: padded batches are often shorter)"
        + (f" + {s.sampled_tokens} sampled on-policy" if s.sampled_tokens else "")
        + ", "
        f"grad_accum {s.grad_accum}, precision {s.precision}, divergence {s.divergence}, kd_ratio {s.kd_ratio:g}",
        f"world size {s.world_size}, device {s.device}, memory per rank {limit}",
    ]
    return Text("\n".join(lines))


def parts_table(plan: Plan) -> Table:
    """What does not depend on the ZeRO stage: activations, teacher and logits, for the plain engine."""
    row = plan.rows[0]
    logits = row.logits
    table = Table(title="per micro-batch (kd's PyTorch engine)", show_header=True, header_style="bold")
    table.add_column("component")
    table.add_column("memory", justify="right")
    table.add_column("how")
    s = plan.settings
    table.add_row("student activations", format_bytes(row.activations), "saved for backward, all layers")
    if row.generation:
        table.add_row(
            "student sampling (on-policy)",
            format_bytes(row.generation),
            f"KV cache of {s.seq_len + s.sampled_tokens} positions, prefill, logits",
        )
    if row.teacher.cached:
        k = s.cache_k or 0
        table.add_row("teacher (cache)", format_bytes(row.teacher.activations), f"top-{k} targets of the batch")
        table.add_row(
            "cache reads / step",
            format_bytes(row.teacher.cache_io),
            f"{cache_bytes_per_token(k)} B/token × {s.tokens * s.grad_accum:,} tokens",
        )
    else:
        table.add_row("teacher weights", format_bytes(row.teacher.weights), f"inference, {s.precision}")
        table.add_row("teacher activations", format_bytes(row.teacher.activations), "no grad: one layer at a time")
        if logits.fused is None:
            table.add_row("teacher logits", format_bytes(logits.teacher), "[B·T, V]")
    if logits.fused is not None:
        table.add_row(
            "[bold]logits: fused head[/bold]",
            f"[bold]{format_bytes(logits.fused)}[/bold]",
            f"{logits.fused_chunk_rows:,} rows × V per chunk, no [B·T, V] tensor",
        )
        table.add_row("logits, plain path", format_bytes(logits.common + logits.chunked), "loss.fused: false")
        table.add_row("loss workspace, naive", format_bytes(logits.naive), "full fp32 [B·T, V] softmaxes")
        return table
    table.add_row("student logits + grad", format_bytes(logits.student + logits.grad), "[B·T, V] each")
    if logits.ce:
        table.add_row("cross-entropy", format_bytes(logits.ce), "fp32 copy + saved log-softmax")
    table.add_row("loss workspace, naive", format_bytes(logits.naive), "full fp32 [B·T, V] softmaxes")
    table.add_row(
        "loss workspace, kd chunked",
        format_bytes(logits.chunked),
        f"{logits.chunk_rows:,} rows × V per chunk",
    )
    table.add_row(
        "[bold]logits total[/bold]",
        f"[bold]{format_bytes(logits.total_chunked)}[/bold]",
        f"naive: {format_bytes(logits.total_naive)}",
    )
    return table


def _row_cells(plan: Plan, row: Row) -> list[str]:
    label = f"[bold]{row.label} ◀[/bold]" if row.chosen else row.label
    teacher = row.teacher.weights + row.teacher.activations
    return [
        label,
        _mb(row.states.params),
        _mb(row.states.grads),
        _mb(row.states.optimizer),
        _mb(row.activations),
        _mb(teacher),
        _mb(row.logits.total_chunked),
        f"{_mb(row.total)} {_fit_mark(plan, row.total)}",
        _mb(row.total_naive) if plan.fits(row.total_naive) is not False else f"[red]{_mb(row.total_naive)}[/red]",
        _mb(row.states.host),
    ]


def stages_table(plan: Plan) -> Table:
    # Compact box and no edge padding: ten columns still fit an 80-column terminal.
    table = Table(
        title="per rank: kd's engine and DeepSpeed ZeRO 0-3",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0),
    )
    offload = any(r.states.host for r in plan.rows)
    names = ["config", "params", "grads", "optim", "acts", "teacher", "logits", "total", "naive"]
    for name in names + (["host"] if offload else []):
        table.add_column(name, justify="left" if name == "config" else "right", no_wrap=True)
    for row in plan.rows:
        cells = _row_cells(plan, row)
        table.add_row(*(cells if offload else cells[:-1]))
    return table


def footer(plan: Plan) -> Text:
    # Short lines: the table is sized for 80 columns, and so is its legend.
    lines = [
        "◀ the recipe's configuration.  total: with kd's chunked losses.",
        "naive: with full-softmax losses.  host: offloaded to CPU memory.",
        "✓ / ✗ (red): fits / exceeds the memory per rank (--device-memory).",
    ]
    if any(plan.fits(r.total) is False for r in plan.rows):
        lines.append("Too big: raise the ZeRO stage or --nproc, offload, shrink batch_size or")
        lines.append("max_length, or cache the teacher (kd cache-teacher).")
    lines.append("Upper bound: all parts counted as alive at once. Formulas: docs/plan.md.")
    return Text("\n".join(lines), style="dim")


def plan_view(plan: Plan) -> Group:
    return Group(header(plan), Text(""), parts_table(plan), Text(""), stages_table(plan), footer(plan))
