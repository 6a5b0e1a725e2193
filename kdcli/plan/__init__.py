"""`kd plan`: per-rank memory of a recipe, computed from model configs before anything loads."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kdcli.errors import KdError
from kdcli.host import memory_info
from kdcli.plan.configs import ModelShape, count_params, model_config, model_shape, recipe_shapes, student_config
from kdcli.plan.memory import DEFAULT_CACHE_K, Device, Plan, Settings, build_plan
from kdcli.sizes import format_bytes, parse_size

if TYPE_CHECKING:
    from kdcli.recipe import Recipe

__all__ = [
    "ModelShape",
    "Plan",
    "Settings",
    "build_plan",
    "count_params",
    "default_device",
    "device_memory",
    "format_bytes",
    "model_config",
    "model_shape",
    "parse_size",
    "plan_recipe",
    "recipe_settings",
    "student_config",
]


def default_world_size() -> int:
    """WORLD_SIZE as set by torchrun/deepspeed launchers, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_device(train_device: str = "auto") -> Device:
    """The kind of device a recipe's `train.device` trains on. A named GPU is planned for even on a machine without
    one (plans are made ahead); `auto` asks this machine, as `kd distill` would."""
    if train_device == "auto":
        from kdcli.hardware import cuda_count

        return "cuda" if cuda_count() else "cpu"
    return "cpu" if train_device == "cpu" else "cuda"


def device_memory(device: Device, index: int = 0) -> int | None:
    """Total memory of GPU `index`, or the host's available RAM for CPU training (what a new process can use)."""
    if device == "cuda":
        try:
            import torch

            return int(torch.cuda.get_device_properties(index).total_memory)
        except (ImportError, RuntimeError, AssertionError):
            return None
    return memory_info("MemAvailable")


def _cache_k(recipe: Recipe) -> int | None:
    """Top-K of the teacher cache when `teacher.cache` is set: the recipe's `cache.top_k` (these keys may not exist
    in this version of the schema, hence getattr)."""
    if not getattr(recipe.teacher, "cache", None):
        return None
    value = getattr(getattr(recipe, "cache", None), "top_k", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return DEFAULT_CACHE_K


def _sampled_tokens(recipe: Recipe) -> int:
    """`on_policy.max_new_tokens` when the recipe samples from the student (getattr: older schemas lack it)."""
    on_policy = getattr(recipe, "on_policy", None)
    if on_policy is None or not (on_policy.ratio > 0 or on_policy.schedule == "adaptive"):
        return 0
    return int(on_policy.max_new_tokens)


def recipe_settings(recipe: Recipe, *, world_size: int, device: Device, memory: int | None) -> Settings:
    """The recipe's settings that memory depends on. The `deepspeed:` section and `teacher.cache` are read with
    getattr, so plans work with schemas that have them and those that do not."""
    ds = getattr(recipe, "deepspeed", None)
    train = recipe.train
    precision = train.precision
    ds_bf16 = getattr(ds, "bf16", None)
    chosen = getattr(recipe.loss, "chosen", None)  # a schema without loss.cross_tokenizer: the divergence itself
    divergence, params = chosen() if chosen else (recipe.loss.divergence, recipe.loss.params)
    chunk = params.get("chunk_size")
    return Settings(
        batch_size=train.batch_size,
        seq_len=recipe.data.max_length,
        precision=precision,
        divergence=divergence,
        kd_ratio=recipe.loss.kd_ratio,
        chunk_size=chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else None,
        grad_accum=train.grad_accum,
        world_size=world_size,
        device=device,
        device_memory=memory,
        deepspeed=ds is not None,
        zero_stage=getattr(ds, "zero_stage", None),
        ds_bf16=(precision == "bf16") if ds_bf16 is None else bool(ds_bf16),
        offload_optimizer=bool(getattr(ds, "offload_optimizer", False)),
        offload_param=bool(getattr(ds, "offload_param", False)),
        teacher_zero3=bool(getattr(ds, "teacher_zero3", False)),
        cache_k=_cache_k(recipe),
        activation_checkpointing=bool(getattr(train, "activation_checkpointing", False)),
        optimizer_state_bytes=2 if getattr(train, "optimizer_states", "fp32") == "bf16" else 4,
        sampled_tokens=_sampled_tokens(recipe),
        fused=getattr(recipe.loss, "fused", False),
    )


def plan_recipe(
    recipe: Recipe,
    *,
    world_size: int | None = None,
    device: Device | None = None,
    memory: int | None = None,
) -> Plan:
    """The plan of a recipe: shapes from configs (no weights), settings from the recipe and the machine.

    `memory` is the per-rank limit in bytes; default: this machine's (GPU 0's total, or the available RAM)."""
    world = world_size if world_size is not None else default_world_size()
    if world < 1:
        raise KdError(f"--nproc: must be at least 1, got {world}.")
    dev = device or default_device(recipe.train.device)
    gpu_index = int(recipe.train.device.partition(":")[2] or 0)
    limit = memory if memory is not None else device_memory(dev, gpu_index)
    settings = recipe_settings(recipe, world_size=world, device=dev, memory=limit)
    gbs = getattr(recipe.train, "global_batch_size", None)
    if gbs is not None and gbs != settings.batch_size * settings.grad_accum * world:
        raise KdError(
            f"train.global_batch_size: {gbs} ≠ batch_size {settings.batch_size} × grad_accum {settings.grad_accum} "
            f"× {world} processes = {settings.batch_size * settings.grad_accum * world}; fix one of them or --nproc."
        )
    teacher, student = recipe_shapes(recipe)
    return build_plan(teacher, student, settings)
