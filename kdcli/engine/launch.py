"""`kd distill --nproc N`: start N copies of kd under torchrun (PyTorch's own launcher) on this machine.

Every process runs the same `kd distill` command; torchrun gives each its RANK, LOCAL_RANK and WORLD_SIZE.
For several machines use the deepspeed launcher with a hostfile (docs/scale-out.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from kdcli.engine.distributed import free_port


def torchrun_command(nproc: int, kd_args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "kdcli",
        *kd_args,
    ]


def launch(nproc: int, kd_args: list[str]) -> int:
    """Run the command under torchrun and return its exit code.

    torchrun starts in its own session, so a Ctrl-C reaches it once, from here; it passes SIGINT on to each
    worker, which finishes its step, saves a checkpoint and exits.
    """
    env = dict(os.environ)
    # One thread per process unless the recipe says otherwise: N processes share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = subprocess.Popen(torchrun_command(nproc, kd_args), env=env, start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
