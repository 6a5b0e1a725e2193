"""The `kd` command line. It parses arguments and renders results; the work happens in the modules it calls.

app.py       the typer app, the one-line error rule (`user_errors`), shared options
train.py     kd distill, kd cache-teacher, kd recipe check|keys, kd losses, kd plan
evaluate.py  kd eval, kd compare
"""

from kdcli.cli.app import app

# Importing a command module registers its commands; `kd --help` lists them in this order.
from kdcli.cli import train  # noqa: F401  isort: skip
from kdcli.cli import evaluate  # noqa: F401  isort: skip

__all__ = ["app", "main"]


def main() -> None:
    app()
