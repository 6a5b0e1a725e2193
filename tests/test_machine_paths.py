"""No committed file holds a path of the machine it was made on: every tracked file is scanned for this checkout's
absolute path, this user's home and temporary folders, and the usual machine-local roots, and a hit names the file
and the line."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# This file holds example paths on purpose.
SKIPPED = (Path(__file__).resolve().relative_to(REPO).as_posix(),)
# Lines in files others are editing now (docs/benchmarks.md, bench/replication.py), each the exact path it may hold;
# any other machine path in those files still fails.
KNOWN = {
    ("bench/replication.py", "/tmp/rep"),  # the smoke test's --out in its usage text
    ("docs/benchmarks.md", "/tmp/vt20"),
    ("docs/benchmarks.md", "/tmp/vt32"),
}

# Roots that only ever name one machine's folders: checkouts and workspaces, a user's home, temporary files.
_ROOTS = "|".join(("work", "root", "tmp", "var/tmp", r"home/[^/\s'\"`]+", r"Users/[^/\s'\"`]+"))
_END = r"(?=[/\s'\"`),;\]]|$)"  # a path ends at a separator, a space, a quote or a closing bracket
_GENERIC = re.compile(rf"(?<![\w.~/$-])/(?:{_ROOTS}){_END}(?:/[^\s'\"`),;\]]*)?")


def machine_paths(text: str, here: list[str]) -> list[tuple[int, str]]:
    """(line number, path) of every absolute path in `text` that names a folder of this machine: one under `here`
    (this checkout, the home and temporary folders) or under a root that is never shared between machines."""
    hits = []
    specific = re.compile("|".join(r"(?<![\w.~/$-])" + re.escape(p.rstrip("/")) + _END for p in here if len(p) > 1))
    for number, line in enumerate(text.splitlines(), 1):
        found = {m.start(): m.group(0) for m in _GENERIC.finditer(line)}
        for match in specific.finditer(line) if here else ():
            found.setdefault(match.start(), match.group(0))
        hits += [(number, found[start]) for start in sorted(found)]
    return hits


def this_machine() -> list[str]:
    return sorted({str(REPO), str(Path.home()), tempfile.gettempdir(), os.path.realpath(REPO)} - {"/"})


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode().strip()}")
    return [name for name in listed.stdout.decode().split("\0") if name and not name.startswith(SKIPPED)]


def test_no_tracked_file_holds_a_path_of_this_machine() -> None:
    problems = []
    here = this_machine()
    for name in tracked_files():
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the work tree, not yet in the index
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for number, found in machine_paths(data.decode("utf-8", errors="replace"), here):
            if (name, found) not in KNOWN:
                problems.append(f"{name}:{number}: {found}")
    assert not problems, "paths of the machine these files were made on:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("out = '/tmp/kd-bench' + name", ["/tmp/kd-bench"]),
        ("python -m venv /work/trl-env", ["/work/trl-env"]),
        ("see /home/alice/models and /Users/bob/x.", ["/home/alice/models", "/Users/bob/x."]),
        ("cd /root", ["/root"]),
        ("https://example.org/tmp/x and docs/tmp/y and ~/tmp and $HOME/work/z", []),
        ("runs/q/checkpoints/step-00000006 and /dev/full", []),
    ],
)
def test_the_scan_finds_machine_paths_and_nothing_else(line: str, expected: list[str]) -> None:
    assert [path for _, path in machine_paths(line, [])] == expected


def test_the_scan_finds_this_checkout_wherever_it_lies() -> None:
    assert machine_paths("cache: /var/tmp-other/x and data/tmp", ["/tmp"]) == []  # not /tmp
    assert machine_paths("first line\nmodel: /srv/ci/kd/runs/x/student\n", ["/srv/ci/kd"]) == [(2, "/srv/ci/kd")]
    assert machine_paths("/srv/ci/kd-other and /srv/ci/kdx", ["/srv/ci/kd"]) == []  # other folders
