"""Processes and DeepSpeed: who this process is, the DeepSpeed config a recipe maps to, and the backends the
training loop drives.

kd writes no parallelism of its own. Several processes means DeepSpeed ZeRO; one process without a
`deepspeed:` section means plain PyTorch, and then nothing here imports DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from kdcli.errors import KdError
from kdcli.recipe import Recipe
from kdcli.recipe.schema import DeepSpeedConfig

T = TypeVar("T")

# The keys DeepSpeed owns that kd's recipe already decides; a raw config may repeat them only with equal values.
OPTIMIZER_KEYS = ("optimizer", "scheduler")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The launcher's view (torchrun and the deepspeed launcher both set these); one process otherwise."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def uses_deepspeed(recipe: Recipe, world: World) -> bool:
    return recipe.deepspeed is not None or world.world_size > 1


def check_global_batch(recipe: Recipe, world_size: int) -> None:
    """global batch = micro-batch x accumulation x world size, or one line saying which key to change."""
    cfg = recipe.train
    actual = cfg.batch_size * cfg.grad_accum * world_size
    if cfg.global_batch_size is None or cfg.global_batch_size == actual:
        return
    per_step = cfg.batch_size * world_size
    fix = (
        f"set train.grad_accum={cfg.global_batch_size // per_step}"
        if cfg.global_batch_size % per_step == 0
        else "change train.batch_size, train.grad_accum or the process count"
    )
    raise KdError(
        f"train.global_batch_size={cfg.global_batch_size} but train.batch_size ({cfg.batch_size}) x "
        f"train.grad_accum ({cfg.grad_accum}) x processes ({world_size}) = {actual}: {fix}."
    )


def deepspeed_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this recipe: the recipe's keys, merged over `deepspeed.config` when given.

    A key both set differently is a contradiction and refused, so what the recipe says is what runs.
    """
    check_global_batch(recipe, world_size)
    ds = recipe.deepspeed or DeepSpeedConfig()
    cfg = recipe.train
    raw = _read_raw_config(ds.config) if ds.config else {}
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    clipping = ds.gradient_clipping if ds.gradient_clipping is not None else cfg.max_grad_norm
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16 if ds.bf16 is not None else cfg.precision == "bf16"},
        "gradient_clipping": clipping or 0.0,
    }
    for path, value in _leaves(ours):
        theirs = _lookup(raw, path)
        if theirs is not None and theirs != "auto" and theirs != value:
            dotted = ".".join(path)
            raise KdError(
                f"deepspeed.config: {dotted}={json.dumps(theirs)} in {ds.config} contradicts the recipe, which "
                f"gives {json.dumps(value)} ({_recipe_key(path)}); remove it from the JSON or change the recipe."
            )
    merged = _merge(raw, ours)
    # kd passes a torch AdamW (no JIT-compiled DeepSpeed optimizer), also when optimizer states are offloaded.
    merged.setdefault("zero_force_ds_cpu_optimizer", False)
    merged.setdefault("steps_per_print", 1 << 30)  # kd prints its own progress
    merged.setdefault("wall_clock_breakdown", False)
    return merged


def _read_raw_config(path: str) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdError(f"deepspeed.config: {path} not found (paths are relative to the working directory).") from None
    except (OSError, ValueError) as err:
        raise KdError(f"deepspeed.config: {path} is not a readable JSON file: {err}") from None
    if not isinstance(raw, dict):
        raise KdError(f"deepspeed.config: {path} must hold a JSON object.")
    for key in OPTIMIZER_KEYS:
        if key in raw:
            raise KdError(
                f"deepspeed.config: remove `{key}` from {path}; kd builds AdamW and its schedule from `train` "
                "(lr, betas, weight_decay, schedule, warmup_steps)."
            )
    return raw


def _recipe_key(path: tuple[str, ...]) -> str:
    names = {
        "train_micro_batch_size_per_gpu": "train.batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
        "train_batch_size": "train.batch_size x train.grad_accum x processes",
        "zero_optimization": "deepspeed.zero_stage / offload_*",
        "bf16": "deepspeed.bf16 or train.precision",
        "gradient_clipping": "deepspeed.gradient_clipping or train.max_grad_norm",
    }
    return names[path[0]]


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_deepspeed(world: World, cpu: bool = False) -> torch.device:
    """Join the process group on the accelerator DeepSpeed detects (nccl on CUDA, gloo on CPU), or on the CPU
    when `cpu` is set (`train.device: cpu`).

    Returns the device this rank computes on.
    """
    if cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips the probe for GPUs and its warning
    # With the rank environment set DeepSpeed does not try MPI discovery; a lone process gets a free port.
    for key, value in (
        ("RANK", world.rank),
        ("LOCAL_RANK", world.local_rank),
        ("WORLD_SIZE", world.world_size),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, str(value))
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO uses all_gather_into_tensor, which torch now flags on every rank; nothing for a user to do.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # The shared-memory all-reduce is a C++ op compiled on first use (30-55 s); plain gloo needs no compile.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        accelerator.set_device(world.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    return torch.device(accelerator.current_device_name())


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum over processes (float64, so counts stay exact); the values themselves in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def on_main_then_shared(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its result sent to every rank (pickled); just `compute()` in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return compute()
    box: list[Any] = [compute() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# What every node of a job must share, in the order a disagreement is named, with the fix for each.
AGREED = {
    "kd": "install the same kd version on every node",
    "recipe": "give every node the same recipe file (and --set overrides)",
    "data": "give every node the same data files (and tokenizer)",
}


def node_name() -> str:
    """This process's machine as the launchers number it (torchrun's GROUP_RANK, the deepspeed launcher's CROSS_RANK,
    SLURM's SLURM_NODEID), with its host name."""
    env = os.environ
    index = env.get("GROUP_RANK") or env.get("CROSS_RANK") or env.get("SLURM_NODEID")
    host = socket.gethostname()
    return f"node {index} ({host})" if index is not None else f"host {host}"


def check_nodes_agree(settings: dict[str, str]) -> None:
    """Every rank's `settings` (the keys of `AGREED`) must equal rank 0's: nodes that read another recipe or other
    data would train apart, or wait forever in collectives the others never make. Every rank gathers all views and
    raises the same one-line `KdError` naming the node that differs; nothing happens in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    views: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(views, {"node": node_name(), **settings})
    problem = disagreement(views)
    if problem:
        raise KdError(problem)


def disagreement(views: list[dict[str, str]]) -> str | None:
    """The first setting a rank holds differently from rank 0 (`views[r]` is rank r's), as one line, or None."""
    first = views[0]
    for key, fix in AGREED.items():
        for rank, view in enumerate(views):
            if view.get(key) != first.get(key):
                return (
                    f"the nodes of this job disagree on {key}: {view['node']} (rank {rank}) has "
                    f"{_short(view.get(key))}, {first['node']} (rank 0) has {_short(first.get(key))}; {fix}."
                )
    return None


def _short(value: str | None) -> str:
    return "nothing" if value is None else value if len(value) <= 16 else value[:12] + "…"


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, save and exit.

    The handler only sets a flag: raising inside a step could leave the other processes waiting in a
    collective. A second signal aborts at once.
    """

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        def handle(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def place_teacher(teacher: Any, device: torch.device, ds_config: dict[str, Any] | None, zero3: bool) -> None:
    """Put an online teacher on this rank's device, or shard it over all ranks with ZeRO-3 inference.

    Each rank runs the teacher in inference mode on its own shard of the data. With `zero3`, the weights are
    partitioned and gathered layer by layer in each forward, for teachers too big for one device.
    """
    model = getattr(teacher, "model", None)
    if zero3 and ds_config:
        if model is None:
            raise KdError("deepspeed.teacher_zero3: needs a teacher model run online, not a teacher cache.")
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,
        }
        engine, *_ = deepspeed.initialize(model=model, config=config)
        teacher.model = engine.module.eval()
    elif model is not None and device.type != "cpu":
        teacher.model = model.to(device)
