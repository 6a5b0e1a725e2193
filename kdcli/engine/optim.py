"""AdamW and its learning-rate schedule: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kdcli.recipe import TrainConfig

# Elements of a parameter that `BF16StatesAdamW` updates at once: its fp32 working copies of the two moments and
# the denominator are this big at most (16 MiB each), whatever the size of the parameter (the embedding's 28M).
BF16_STATES_SLICE = 2**22


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Norms and biases take no weight decay, as in every reference LM recipe.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    # An empty group is left out (LoRA adapters are all matrices): ZeRO drops it, and the schedule would not match.
    groups = [
        {"params": params, "weight_decay": wd} for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if params
    ]
    if cfg.optimizer_states == "bf16":
        return BF16StatesAdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def round_to_bf16_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (bf16) ← src (fp32, overwritten), rounded stochastically: up with the probability of the dropped
    fraction, so that the rounding is unbiased. Why: with round-to-nearest, v · 0.999 rounds back to v for every
    bf16 v (its spacing is 2⁻⁸ relative), so AdamW's second moment would never decay.

    A random 16-bit integer is added to the low half of each float's bits and the half is then cut off; the cut
    float is a bf16 value, so the final cast is exact."""
    bits = src.view(torch.int32)
    bits.add_(torch.randint_like(bits, 0, 1 << 16)).bitwise_and_(-(1 << 16))
    dst.copy_(src)


class BF16StatesAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's update: decoupled weight decay, bias correction, eps outside the square root)
    whose two moments are stored in bf16 (`train.optimizer_states: bf16`): 4 bytes per parameter instead of 8.

    Each step reads the moments into fp32 a slice of at most BF16_STATES_SLICE elements at a time, updates them and
    the parameter in fp32, and writes them back with `round_to_bf16_`. The rounding draws from torch's generator
    of the parameter's device (seeded by the run, saved in its checkpoints)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating state to its parameter's dtype on load (fp32 here): back to bf16.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                step_size = lr / (1.0 - beta1**step)
                root_bc2 = math.sqrt(1.0 - beta2**step)
                p, g = param.view(-1), param.grad.view(-1)
                m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for lo in range(0, p.numel(), BF16_STATES_SLICE):
                    hi = min(lo + BF16_STATES_SLICE, p.numel())
                    grad = g[lo:hi].float()
                    m = m_all[lo:hi].float().lerp_(grad, 1.0 - beta1)
                    v = v_all[lo:hi].float().mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    if decay:
                        p[lo:hi].mul_(1.0 - lr * decay)
                    denom = v.sqrt().div_(root_bc2).add_(eps)
                    p[lo:hi].addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-step_size)
                    round_to_bf16_(m_all[lo:hi], m)
                    round_to_bf16_(v_all[lo:hi], v)
        return loss


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule)
    )
