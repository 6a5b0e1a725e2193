"""The `kd` app, the one-line error rule, and the options several commands share."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcli.errors import KdError, KdWarning

app = typer.Typer(
    name="kd",
    help="Distill large language models: one YAML recipe, exact AKL/ATKD and classic divergences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Inspect and validate recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

_state = {"debug": False}


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input becomes one line on stderr and exit code 2 (or the error's own `exit_code`: a job whose rank
    failed ends with that rank's); `kd --debug` shows the traceback instead."""
    try:
        yield
    except KdError as err:
        if _state["debug"]:
            raise
        from rich.markup import escape

        from kdcli.ui import err_console

        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(getattr(err, "exit_code", 2)) from None


RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe key, e.g. --set train.max_steps=10 --set loss.divergence=rkl. Repeatable.",
        show_default=False,
    ),
]


# The LLM judge's options, shared by `kd eval` and `kd compare`.
JudgeModelOpt = Annotated[str, typer.Option("--judge-model", help="The judge's model name.")]
JudgeUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--judge-url", help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL, else OpenAI).", show_default=False
    ),
]
JudgeConcurrencyOpt = Annotated[int, typer.Option("--judge-concurrency", help="Judge requests in flight.")]
JudgeRetriesOpt = Annotated[int, typer.Option("--judge-retries", help="Retries on 429, 5xx and timeouts.")]
JudgeTimeoutOpt = Annotated[float, typer.Option("--judge-timeout", help="Seconds per judge request.")]


def _version(value: bool) -> None:
    if value:
        from kdcli import __version__

        typer.echo(f"kd {__version__}")
        raise typer.Exit()


def _show_kd_warnings() -> None:
    """What kd skipped (`KdWarning`) is one `warning:` line on stderr, like its errors; other warnings (those of
    torch, transformers) keep Python's format."""
    shown = warnings.showwarning
    if getattr(shown, "kd", False):
        return

    def show(message: Any, category: type[Warning], filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, KdWarning):
            shown(message, category, filename, lineno, *args, **kwargs)
            return
        from rich.markup import escape

        from kdcli.ui import err_console

        err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)

    show.kd = True  # type: ignore[attr-defined]
    warnings.showwarning = show


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug
    _show_kd_warnings()
