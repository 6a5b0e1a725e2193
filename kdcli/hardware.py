"""Where models run and in which precision: the one place kd decides the device, the dtypes and autocast.

Every command that runs a model (distill, cache-teacher, eval, sequence-level generation) asks this module, so a
recipe behaves the same in each: `train.device` picks the device (`auto` is the first GPU where there is one) and
`train.precision: auto` is bf16 exactly where bf16 is native *on that device*. What a run records of the machine
and its software (`environment_info`, run.json's `environment`) is here too.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError
from kdcli.host import cpu_flags

if TYPE_CHECKING:
    import torch

# CPU flags of the instruction sets that run bf16 matrix products natively. Without them (AVX2-only CPUs, most
# laptops) PyTorch emulates bf16 and a forward pass is about 5x slower than in fp32.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_spec(spec: object) -> bool:
    """Whether `spec` spells a device choice; checked without touching any GPU (recipes are checked on laptops)."""
    return isinstance(spec, str) and _DEVICE_SPEC.fullmatch(spec.strip()) is not None


def check_device_spec(spec: str, key: str = "train.device") -> str:
    if not is_device_spec(spec):
        raise KdError(f"{key}: '{spec}' is not a device; use {DEVICE_CHOICES}.")
    return spec.strip()


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str = "auto", key: str = "train.device") -> torch.device:
    """`auto` → the first GPU where CUDA is available, else the CPU; `cuda`/`cuda:N` are refused without that GPU."""
    import torch

    spec = check_device_spec(spec, key)
    count = cuda_count()
    if spec == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = int(spec.partition(":")[2] or 0)
    if count == 0:
        raise KdError(f"{key}: '{spec}' asks for a GPU, but torch sees no CUDA device here. Use auto or cpu.")
    if index >= count:
        raise KdError(f"{key}: '{spec}' does not exist; this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}.")
    return torch.device("cuda", index)


@functools.cache
def native_bf16(device_type: str = "auto") -> bool:
    """Whether bf16 matrix products are native on the device: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX. `auto` asks about the device `train.device: auto` would pick."""
    import torch

    if device_type == "auto":
        device_type = "cuda" if cuda_count() else "cpu"
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(NATIVE_BF16_CPU_FLAGS & cpu_flags())


def resolve_precision(precision: str, device: str = "auto", saved: str | None = None) -> str:
    """`auto` → `bf16` where bf16 is native on `device` (a spec such as `cuda:1`, or a device type), else `fp32`.

    `saved`, the precision a model was saved in, refines `auto` on a CPU with native bf16: a model saved in fp32
    (trained in fp32) is run as it was trained. `bf16` and `fp32` stay as they are.
    """
    if precision != "auto":
        return precision
    device_type = device.partition(":")[0]
    if not native_bf16(device_type):
        return "fp32"
    on_gpu = device_type == "cuda" or (device_type == "auto" and cuda_count() > 0)
    if saved is not None and not on_gpu:
        return saved
    return "bf16"


def saved_precision(config: Any) -> str:
    """The precision a Hugging Face config says its weights were saved in."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return "bf16" if str(dtype).removeprefix("torch.") == "bfloat16" else "fp32"


@dataclass(frozen=True)
class Runtime:
    """A resolved device and precision, and what follows from them for every model kd runs.

    `bf16`: models that only infer (teacher, eval, generation) hold bf16 weights; the student keeps fp32 master
    weights and runs under bf16 autocast, so small updates are not rounded away; it is saved in bf16.
    """

    device: torch.device
    precision: str  # "bf16" or "fp32", never "auto"

    @classmethod
    def of(cls, device: str = "auto", precision: str = "auto", key: str = "train.device") -> Runtime:
        resolved = resolve_device(device, key)
        return cls(resolved, resolve_precision(precision, str(resolved)))

    @property
    def inference_dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def product_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype a model's matrix products run in: bf16 under bf16 autocast, else the weight's own."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else weight_dtype

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on this device's type, or nothing in fp32. A fresh context each call: autocast objects
        are not reentrant."""
        import torch

        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # non_blocking only pays from pinned memory; on the CPU it is a no-op, so it costs nothing to ask.
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def describe(self) -> str:
        """The device as run.json records it, with the GPU's name where there is one."""
        if self.device.type != "cuda":
            return str(self.device)
        import torch

        return f"{self.device} ({torch.cuda.get_device_name(self.device)})"


def environment_info() -> dict[str, Any]:
    import torch
    import transformers

    from kdcli import __version__

    return {
        "kdcli": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The commit of the kd checkout, when kd runs from one (editable install)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
