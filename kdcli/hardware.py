"""What this machine computes fast: whether bf16 is native here, which decides `train.precision: auto`."""

from __future__ import annotations

import functools
from pathlib import Path

# CPU flags of the instruction sets that run bf16 matrix products natively. Without them (AVX2-only CPUs, most
# laptops) PyTorch emulates bf16 and a forward pass is about 5x slower than in fp32.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def native_bf16() -> bool:
    """True on a CUDA GPU with bf16 support, or on a CPU with AVX512-BF16 or AMX; False otherwise (and when unknown)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(NATIVE_BF16_CPU_FLAGS & cpu_flags())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(precision: str) -> str:
    """`auto` becomes `bf16` where bf16 is native and `fp32` elsewhere; `bf16` and `fp32` stay as they are."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"
