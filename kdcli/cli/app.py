"""The `kd` app, the one-line error rule, and the options several commands share."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from kdcli.errors import KdError, KdWarning


class _PlainHelp:
    """Help without typer's type marker for flags (`--force <bool>`: a flag takes no value; typer shows an
    option's metavar in place of its type, so a flag's is set empty), and arguments named in capitals (`RECIPE`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if param.metavar is not None:
                continue
            if param.param_type_name == "argument":
                param.metavar = (param.name or "").upper()
            elif getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class KdGroup(_PlainHelp, TyperGroup):
    """`kd` and `kd recipe`."""


class KdCommand(_PlainHelp, TyperCommand):
    """Every kd command. Its usage line writes arguments as `RECIPE`, `[RECIPE]` and `TARGET...`, not as typer's
    `{recipe}` and `{TARGET...}...`; `kd --help` lists it with the first paragraph of its docstring on one line
    (typer keeps the docstring's line breaks there)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.short_help is None and self.help:
            self.short_help = " ".join(inspect.cleandoc(self.help).split("\n\n")[0].split())

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class _KdTyper(typer.Typer):
    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or KdCommand, **kwargs)


app = _KdTyper(
    name="kd",
    cls=KdGroup,
    help="Distill large language models: one YAML recipe, exact AKL/ATKD and classic divergences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = _KdTyper(cls=KdGroup, help="Inspect and validate recipes.", no_args_is_help=True)
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
