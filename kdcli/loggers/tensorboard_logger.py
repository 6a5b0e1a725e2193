"""TensorBoard: event files in `<run>/tensorboard/`, written by torch's SummaryWriter (the `tensorboard` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcli.runs import TENSORBOARD_DIR


class TensorBoardLogger:
    """Scalars and text through `torch.utils.tensorboard.SummaryWriter`.

    Each write is flushed, so a killed run keeps every step it logged. A resumed run opens a new event file in the
    same folder with `purge_step` set to its first step: TensorBoard then hides what the killed process logged
    after the checkpoint, and each step keeps one value."""

    def __init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the extra: the caller names it

        self._writer_class = SummaryWriter
        self.writer: Any = None

    def open(self, folder: Path, start_step: int = 0) -> None:
        purge = start_step + 1 if start_step else None
        self.writer = self._writer_class(log_dir=str(Path(folder) / TENSORBOARD_DIR), purge_step=purge)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, global_step=step)
        self.writer.flush()

    def close(self, finished: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
