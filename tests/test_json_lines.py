"""Every JSON-lines file kd writes reads back whole when a string holds a line separator other than "\\n".

json.dumps(..., ensure_ascii=False) leaves U+2028, U+2029, U+0085 and the ASCII separators 0x1C-0x1E unescaped,
and str.splitlines splits on them. The study's teacher wrote an answer with U+2028 in it, and kd eval then called
its own pass file damaged.
"""

from __future__ import annotations

import json
from pathlib import Path

from compare_fixtures import add_eval, make_run
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.durable import json_lines
from kdcli.evaluation.judge.cache import CachedReply, ReplyCache
from kdcli.evaluation.results import write_jsonl
from kdcli.models.passes import read_generations
from kdcli.runs import RunFolder

SEPARATORS = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c\r"
TEXT = f"first{SEPARATORS}last"


def test_json_lines_splits_on_newline_only() -> None:
    text = "".join(json.dumps({"text": TEXT}, ensure_ascii=False) + "\n" for _ in range(3))
    assert len(text.splitlines()) > 3  # the trap this guards against
    assert [json.loads(line)["text"] for line in json_lines(text) if line] == [TEXT] * 3


def test_a_pass_file_with_separators_in_an_answer_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "seed-1.jsonl"
    rows = [{"index": i, "response": TEXT, "tokens": 3, "stopped": "eos"} for i in range(4)]
    write_jsonl(path, rows)
    assert read_generations(path) == rows


def test_the_judge_cache_keeps_a_reply_with_separators(tmp_path: Path) -> None:
    path = tmp_path / "judge-cache.jsonl"
    ReplyCache.open(path).add("k", "gpt-4", CachedReply(TEXT, 10, 5))
    assert [r.text for r in ReplyCache.open(path).replies("k")] == [TEXT]


def test_compare_and_metrics_read_separators(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", steps=2)
    add_eval(run, lambda seed, index: (f"answer {index}{SEPARATORS}end", 4), examples=6)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps({"step": 3, "loss": 1.0, "note": TEXT}, ensure_ascii=False) + "\n")
    assert RunFolder(run).read_metrics()[-1]["note"] == TEXT
    result = CliRunner().invoke(app, ["compare", str(run), "--format", "json", "--resamples", "100"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["evaluation"][0]["examples"] == 6
