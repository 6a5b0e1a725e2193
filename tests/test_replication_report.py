"""docs/replication.md's Results section is what the study's committed files render (issue 25: a clean clone
re-renders every table byte for byte), and `bench/replication.py --check`, which says so, notices a difference."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "replication.py"


def _replication() -> ModuleType:
    spec = importlib.util.spec_from_file_location("replication_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_doc_holds_what_the_committed_files_render() -> None:
    """No data and no weights: the report reads only the runs' committed records and evals."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--stage", "report", "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "is what the committed files render" in done.stdout


def test_check_finds_a_changed_number_and_a_missing_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    replication = _replication()
    rendered = "## Results\n\n| arm | ROUGE-L |\n| --- | --- |\n| fkl | 6.84 |\n"
    monkeypatch.setattr(replication, "report", lambda args, draw=True: rendered)
    doc = tmp_path / "replication.md"
    monkeypatch.setattr(replication, "DOC", doc)
    args = replication.arguments().parse_args(["--stage", "report", "--check"])

    doc.write_text(f"# Study\n\nhand-written\n\n{rendered}\n## Verdict\n\nby hand\n", encoding="utf-8")
    assert replication.check(args) == 0

    doc.write_text(f"# Study\n\n{rendered.replace('6.84', '6.85')}\n## Verdict\n", encoding="utf-8")
    assert replication.check(args) == 1
    shown = capsys.readouterr().out
    assert "-| fkl | 6.85 |" in shown and "+| fkl | 6.84 |" in shown and "differs" in shown

    doc.write_text("# Study\n\n## Verdict\n", encoding="utf-8")
    assert replication.check(args) == 1


def test_check_goes_with_the_report_stage_only() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--stage", "train", "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "--check" in done.stderr and "Traceback" not in done.stderr
