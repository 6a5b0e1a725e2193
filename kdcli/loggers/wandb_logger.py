"""Weights & Biases: one W&B run per kd run, offline unless `WANDB_MODE` says otherwise (the `wandb` extra)."""

from __future__ import annotations

import html
import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcli.durable import write_text_atomic
from kdcli.runs import WANDB_DIR

RUN_ID_FILE = "run_id"  # in <run>/wandb/: the W&B run every process of this kd run (resumes, kd eval) continues
DEFAULT_PROJECT = "kd"  # unless WANDB_PROJECT is set


class WandbLogger:
    """`wandb.init(dir=<run>)` writes under `<run>/wandb/`. The W&B run's id is stored in `<run>/wandb/run_id` the
    first time, and every later open (`--resume`, `kd eval --report-to wandb`) continues that run
    (`resume="allow"`). The config is the resolved recipe. `wandb sync <run>/wandb/offline-run-*` uploads."""

    def __init__(self, run_name: str, config: Mapping[str, Any] | None = None) -> None:
        import wandb  # ImportError without the extra: the caller names it

        self.wandb, self.run_name, self.config = wandb, run_name, dict(config) if config is not None else None
        self.run: Any = None

    def open(self, folder: Path, start_step: int = 0) -> None:
        logs = Path(folder) / WANDB_DIR
        logs.mkdir(parents=True, exist_ok=True)
        id_file = logs / RUN_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            write_text_atomic(id_file, run_id + "\n")
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=self.run_name,
            id=run_id,
            resume="allow",
            dir=str(folder),
            config=self.config,
            mode=os.environ.get("WANDB_MODE") or "offline",  # nothing leaves the machine unless the user asks
            settings={"console": "off", "quiet": True},  # kd's terminal stays kd's; W&B says where the run is
        )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self, finished: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if finished else 1)
            self.run = None
