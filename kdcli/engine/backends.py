"""How the student trains: plain PyTorch in one process, or a DeepSpeed ZeRO engine over several.

The loop in `trainer.distill` is the same for both: forward with `model`, `backward` each micro-batch, `step`
once per accumulation window, `save`/`load` for checkpoints and `full_state_dict` for the export.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch

from kdcli.engine.distributed import World
from kdcli.recipe import TrainConfig

STATE_FILE = "state.pt"
DEEPSPEED_TAG = "deepspeed"


class StudentBackend(Protocol):
    model: torch.nn.Module  # call it for logits; `.train()`/`.eval()` as usual
    world: World

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> tuple[float, float]:
        """Clip, update, advance the schedule; return (grad norm before clipping, lr used)."""
        ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path, device: torch.device) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Weights to export on rank 0, or None to save the module as it is (every rank must call this)."""
        ...


class PlainStudent:
    """One process, AdamW and a LambdaLR schedule, exactly as a torchtune-style loop would write it."""

    def __init__(
        self,
        student: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        cfg: TrainConfig,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.cfg = student, optimizer, scheduler, cfg
        self.world = World()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        params = self.model.parameters()
        if self.cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def save(self, folder: Path) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        with open(folder / STATE_FILE, "wb") as handle:  # a file object: a full disk raises OSError, not RuntimeError
            torch.save(state, handle)

    def load(self, folder: Path, device: torch.device) -> None:
        state = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None


class DeepSpeedStudent:
    """A DeepSpeed engine around the student, with kd's torch AdamW and schedule handed to it.

    Gradient scaling: kd's per-micro-batch loss is already divided by the valid-token count of the whole
    global batch (all ranks, all micro-batches), so the plain sum of every backward is the full-batch loss.
    DeepSpeed would divide that again by gradient_accumulation_steps (`scale_wrt_gas`, turned off here) and
    averages gradients over the data-parallel ranks (divides by world size), so each rank's loss is
    multiplied by the world size: the update then equals the single-process one for the same global batch.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: dict[str, Any],
        world: World,
    ) -> None:
        import deepspeed

        self.world = world
        self.scheduler = scheduler
        self.lr = scheduler.get_last_lr()[0]
        self.engine, *_ = deepspeed.initialize(
            model=student, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.model = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.lr = self.scheduler.get_last_lr()[0]  # before DeepSpeed steps the schedule at the boundary
        self.engine.backward(loss * self.world.world_size, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary

    def step(self) -> tuple[float, float]:
        # The update already happened inside the window's last `backward`; report what it used.
        grad_norm = self.engine.get_global_grad_norm()
        return float(grad_norm) if grad_norm is not None else math.nan, self.lr

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, folder: Path, device: torch.device) -> None:
        # DeepSpeed maps each shard onto the device its engine was placed on.
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.engine.zero_optimization_partition_weights():  # ZeRO-3: gather the shards layer by layer
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None
