"""Loggers as the engine's observers: `TrainingLog` turns `on_step`/`on_eval` into scalars, `Fanout` sends each
event to several observers (the terminal view and the loggers). The engine knows neither: it reports through
`kdcli.engine.observer.Observer`, and only rank 0 has a real one (the others get a `SilentObserver`), so only rank
0 logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcli.loggers.base import Logger, eval_scalars, train_scalars
from kdcli.recipe import TrainConfig


class TrainingLog:
    """Sends a training run to its loggers: each step `metrics.jsonl` records (`train.log_every`, and the last)
    as `train/<key>`, each eval as `eval/<key>`. Opened by `on_start` (the run folder exists by then), ended by
    `on_end`, or by `close` when the run failed or was interrupted."""

    def __init__(self, loggers: Sequence[Logger], train: TrainConfig) -> None:
        self.loggers, self.train = list(loggers), train
        self.start_step = 0
        self.opened = False

    def message(self, text: str) -> None:
        pass

    def on_start(self, info: Mapping[str, Any]) -> None:
        self.start_step = int(info.get("start_step") or 0)
        for logger in self.loggers:
            logger.open(Path(info["run_dir"]), self.start_step)
        self.opened = True

    def on_step(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        if not self.opened or step <= self.start_step:  # a resumed run logged those before its checkpoint
            return
        if not self.train.logs_step(step, int(record["total_steps"])):
            return
        self._send(step, train_scalars(record))

    def on_eval(self, record: Mapping[str, Any]) -> None:
        if self.opened:
            self._send(int(record["step"]), eval_scalars(record))

    def on_end(self, summary: Mapping[str, Any]) -> None:
        self._close(finished=True)

    def close(self) -> None:
        self._close(finished=False)

    def _send(self, step: int, values: dict[str, float]) -> None:
        if values:
            for logger in self.loggers:
                logger.scalars(step, values)

    def _close(self, finished: bool) -> None:
        if self.opened:
            for logger in self.loggers:
                logger.close(finished)
            self.opened = False


class Fanout:
    """One observer that forwards every event to each of `observers`, in order; `close` closes those that can."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def message(self, text: str) -> None:
        for observer in self.observers:
            observer.message(text)

    def on_start(self, info: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.on_start(info)

    def on_step(self, record: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.on_step(record)

    def on_eval(self, record: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.on_eval(record)

    def on_end(self, summary: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.on_end(summary)

    def close(self) -> None:
        for observer in self.observers:
            if hasattr(observer, "close"):
                observer.close()
