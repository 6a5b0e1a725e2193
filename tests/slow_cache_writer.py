"""`python tests/slow_cache_writer.py SECONDS ARGS...`: `kd ARGS...` with every shard write slowed by SECONDS.

For the SIGKILL resume test: the kill has to land between two shards, which a tiny model writes in milliseconds.
"""

from __future__ import annotations

import sys
import time

import kdcli.cache.writer as writer
from kdcli.cli import app

delay = float(sys.argv[1])
write_shard = writer._write_shard


def slow_write_shard(*args, **kwargs):  # type: ignore[no-untyped-def]
    time.sleep(delay)
    return write_shard(*args, **kwargs)


writer._write_shard = slow_write_shard
app(sys.argv[2:], prog_name="kd")
