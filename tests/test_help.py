"""Every command's --help reads as help: no `<bool>` after a flag, arguments in the usage line as `RECIPE`,
`[RECIPE]` or `TARGET...` (not typer's `{TARGET...}...` or `[recipe]`), and `kd --help` gives each command's summary
on one line."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from kdcli.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "400"}  # no wrapping: a line break in the output is one kd wrote


def command_paths(command: typer.core.TyperGroup | typer.core.TyperCommand, path: tuple[str, ...] = ()) -> list:
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            paths += command_paths(sub, (*path, name))
    return paths


PATHS = command_paths(typer.main.get_command(app))
USAGE = re.compile(r"kd( [a-z-]+)* \[OPTIONS\]( COMMAND \[ARGS\]\.\.\.| [A-Z]+(\.\.\.)?| \[[A-Z]+(\.\.\.)?\])*")


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path in PATHS}
    assert {"", "distill", "eval", "compare", "plan", "cache-teacher", "losses", "recipe check", "recipe keys"} <= names


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "kd")
def test_help_has_no_stray_markers(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"], prog_name="kd", env=WIDE)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    (usage,) = [line.split("Usage:", 1)[1].strip() for line in result.output.splitlines() if "Usage:" in line]
    assert USAGE.fullmatch(usage), usage


def test_the_command_list_gives_each_summary_on_one_line() -> None:
    result = runner.invoke(app, ["--help"], prog_name="kd", env=WIDE)
    group = typer.main.get_command(app)
    lines = result.output.splitlines()
    for name, command in group.commands.items():
        summary = " ".join((command.help or "").split("\n\n")[0].split())
        assert any(line.strip("│ ").startswith(f"{name} ") and summary in line for line in lines), name
