"""What Linux says about this machine and a process: the one place kd, its benchmarks and its tests read /proc.

Each reader returns None (an empty set for the flags) where /proc or the field is absent, as on macOS, so that the
caller decides what "unknown" means. Nothing here imports torch: `kd plan` and the recipe checks run without it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

PROC = Path("/proc")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _field(text: str | None, key: str) -> str | None:
    """The value of the first `key: value` line (cpuinfo pads its keys with tabs before the colon)."""
    for line in (text or "").splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip() == key:
            return value.strip()
    return None


def _kib_as_bytes(value: str | None) -> int | None:
    """'12345 kB' → bytes; /proc writes these fields in KiB whatever the unit's spelling."""
    try:
        return int(value.split()[0]) * 1024 if value else None
    except (ValueError, IndexError):
        return None


def process_status(key: str, pid: int | str = "self") -> str | None:
    """One field of /proc/<pid>/status as written there: `Umask` → '0022', `VmHWM` → '123456 kB'."""
    return _field(_read(PROC / str(pid) / "status"), key)


def process_memory(key: str, pid: int | str = "self") -> int | None:
    """A memory field of /proc/<pid>/status in bytes: `VmRSS` (resident now) or `VmHWM` (its high-water mark).
    Read from outside a process (a pid other than "self"), it measures that process as the kernel saw it."""
    return _kib_as_bytes(process_status(key, pid))


def reset_peak_memory() -> bool:
    """Reset this process's VmHWM to its current RSS (writing 5 to clear_refs); False where the kernel refuses."""
    try:
        (PROC / "self" / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_info(key: str) -> int | None:
    """A field of /proc/meminfo in bytes: `MemTotal`, or `MemAvailable` (what a new process can use)."""
    return _kib_as_bytes(_field(_read(PROC / "meminfo"), key))


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    """The first CPU's instruction-set flags (`avx512_bf16`, `amx_bf16`, ...), from /proc/cpuinfo or `cpuinfo`."""
    return frozenset((_field(_read(cpuinfo or PROC / "cpuinfo"), "flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name, or what `platform` knows where /proc/cpuinfo has none (ARM, macOS)."""
    return _field(_read(PROC / "cpuinfo"), "model name") or platform.processor() or platform.machine()


def machine_summary() -> str:
    """'<CPU model>, <N> cores, <M> GiB RAM', as the benchmarks print the machine they ran on."""
    total = memory_info("MemTotal")
    ram = f", {total / 2**30:.0f} GiB RAM" if total else ""
    return f"{cpu_model()}, {os.cpu_count()} cores{ram}"


def load_average() -> str | None:
    """The one-minute load average, as /proc/loadavg writes it."""
    text = _read(PROC / "loadavg")
    return text.split()[0] if text else None
