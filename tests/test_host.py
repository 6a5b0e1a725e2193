"""kdcli.host, the one reader of /proc: its fields parsed from files written as Linux writes them, its answers where
/proc is absent, and, on Linux, a child process's peak measured from outside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdcli import host
from kdcli.durable import current_umask
from kdcli.plan import device_memory

STATUS = "Name:\tpython\nUmask:\t0027\nState:\tS (sleeping)\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
MEMINFO = "MemTotal:       24576000 kB\nMemFree:         1000000 kB\nMemAvailable:   20480000 kB\n"
CPUINFO = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
    "flags\t\t: fpu avx2 avx512_bf16 amx_tile\n\nprocessor\t: 1\nmodel name\t: a second core\n"
)


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text(STATUS)
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "status").write_text(STATUS.replace("204800", "4096"))
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    (tmp_path / "loadavg").write_text("1.93 1.71 1.52 3/412 12345\n")
    monkeypatch.setattr(host, "PROC", tmp_path)
    return tmp_path


def test_fields_are_read_as_linux_writes_them(fake_proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert host.process_status("Umask") == "0027"
    assert host.process_memory("VmHWM") == 204800 * 1024
    assert host.process_memory("VmRSS") == 102400 * 1024
    assert host.process_memory("VmHWM", 4242) == 4096 * 1024
    assert host.memory_info("MemAvailable") == 20480000 * 1024
    assert host.memory_info("MemTotal") == 24576000 * 1024
    assert host.cpu_model() == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"  # the first core's, tabs stripped
    assert host.cpu_flags() == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert host.load_average() == "1.93"
    monkeypatch.setattr(host.os, "cpu_count", lambda: 2)
    assert host.machine_summary() == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 2 cores, 23 GiB RAM"
    # the callers that decide from these fields
    assert current_umask() == 0o027
    assert device_memory("cpu") == 20480000 * 1024


def test_a_missing_proc_or_field_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "PROC", tmp_path / "absent")
    assert host.process_status("Umask") is None
    assert host.process_memory("VmHWM") is None
    assert host.memory_info("MemTotal") is None
    assert host.cpu_flags() == frozenset()
    assert host.cpu_model()  # what platform knows
    assert host.load_average() is None
    assert "GiB" not in host.machine_summary()
    assert current_umask() is None
    assert device_memory("cpu") is None
    assert host.reset_peak_memory() is False


def test_a_malformed_field_is_none(fake_proc: Path) -> None:
    (fake_proc / "self" / "status").write_text("Umask:\tnot-octal\nVmHWM:\n")
    assert host.process_memory("VmHWM") is None
    assert current_umask() is None


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_a_childs_peak_is_measured_from_outside() -> None:
    """A child touches 64 MiB and frees it; its VmHWM, read by this process while it waits, holds the 64 MiB
    although its RSS has fallen back."""
    script = "import sys; b = bytearray(64 << 20); del b; print('done', flush=True); sys.stdin.read()"
    command = [sys.executable, "-c", script]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "done"
        peak, now = host.process_memory("VmHWM", p.pid), host.process_memory("VmRSS", p.pid)
        p.stdin.close()
    assert peak is not None and now is not None
    assert peak - now > 60 << 20, (peak, now)
