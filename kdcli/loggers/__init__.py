"""Experiment loggers: `train.report_to: [tensorboard, wandb]` for `kd distill`, `--report-to` for `kd eval` and
`kd compare`. Each is an optional extra (`pip install 'kdcli[tensorboard]'`); a missing one is a one-line error
when the loggers are built, before any slow work.

    loggers = loggers_for(recipe.train.report_to, run_name=recipe.name, config=recipe.model_dump(mode="json"))
    observer = Fanout(RichObserver(), TrainingLog(loggers, recipe.train))   # what kd distill does

Layout: `base` (the `Logger` protocol, metric names), `observer` (loggers as engine observers), one module per
tracker. The engine never imports this package: the CLI composes the observers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kdcli.loggers.base import Logger, check_names, eval_scalars, missing_extra, results_scalars, train_scalars
from kdcli.loggers.observer import Fanout, TrainingLog


def loggers_for(
    names: Iterable[str], *, run_name: str, config: Mapping[str, Any] | None = None, key: str = "train.report_to"
) -> list[Logger]:
    """The loggers `names` asks for, not yet open. Importing each tracker's package here is the check that its
    extra is installed: a `KdError` naming `key`, the extra and the pip command otherwise."""
    loggers: list[Logger] = []
    for name in check_names(names, key):
        try:
            if name == "tensorboard":
                from kdcli.loggers.tensorboard_logger import TensorBoardLogger

                loggers.append(TensorBoardLogger())
            else:
                from kdcli.loggers.wandb_logger import WandbLogger

                loggers.append(WandbLogger(run_name, config))
        except ImportError as err:
            raise missing_extra(name, err, key) from None
    return loggers


def log_once(
    loggers: Iterable[Logger],
    folder: Path,
    step: int,
    scalars: Mapping[str, float],
    texts: Mapping[str, str] | None = None,
) -> None:
    """Add `scalars` and `texts` at `step` to a finished run's logs (what `kd eval` and `kd compare` report)."""
    for logger in loggers:
        logger.open(folder)
        try:
            if scalars:
                logger.scalars(step, scalars)
            for tag, text in (texts or {}).items():
                logger.text(step, tag, text)
        finally:
            logger.close()


__all__ = [
    "Fanout",
    "Logger",
    "TrainingLog",
    "check_names",
    "eval_scalars",
    "log_once",
    "loggers_for",
    "results_scalars",
    "train_scalars",
]
