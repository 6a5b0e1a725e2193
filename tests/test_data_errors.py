"""Bad data through `kd distill`: one clear line naming the file, the line or row and the fix; exit 2, no traceback.

Every case goes through the public CLI path on the tiny teacher. Rows whose response is empty are skipped with one
warning that counts them; a data set left with no examples is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_distill import tiny_recipe
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.data import load_rows
from kdcli.errors import KdError

runner = CliRunner()

GOOD = {"instruction": "Name a color.", "response": "Blue."}


def distill(tmp_path: Path, teacher: Path, train: Path, **data: Any) -> Any:
    recipe = tiny_recipe(
        tmp_path / "recipe",
        teacher,
        data={"train": str(train), "eval": None, **data},
        train={"max_steps": 1, "batch_size": 2},
    )
    return runner.invoke(app, ["distill", str(recipe)])


def error_line(result: Any, *parts: str) -> str:
    """The one `error:` line of a failed run, checked for exit code 2, no traceback, and each of `parts`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- reading the file ----------------------------------------------------------------------------------------


def test_jsonl_with_one_broken_line(tmp_path: Path, tiny_teacher: Path) -> None:
    path = jsonl(tmp_path / "train.jsonl", json.dumps(GOOD), "", '{"instruction": "x", "response": }', json.dumps(GOOD))
    result = distill(tmp_path, tiny_teacher, path)
    error_line(result, "data.train", "train.jsonl line 3", "not valid JSON", "fix that line")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "holds a JSON number"),
        ('"just text"', "holds a JSON string"),
        (json.dumps([GOOD, ["a", "list"]]), "train.json item 2 is a JSON list"),
        (json.dumps({"rows": [GOOD], "version": 1}), "list fields rows"),
    ],
    ids=["number", "string", "list-item", "wrapper"],
)
def test_json_that_is_not_a_list_of_objects(tmp_path: Path, tiny_teacher: Path, text: str, expected: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(text, encoding="utf-8")
    line = error_line(distill(tmp_path, tiny_teacher, path), "data.train", "train.json", expected)
    assert "list of objects" in line or "JSON lines" in line, line


@pytest.mark.parametrize(
    ("name", "text", "missing", "columns"),
    [
        ("train.csv", "q,a\nWhy?,Because.\n", "prompt", "columns: q, a"),
        ("train.json", json.dumps([{"question": "Why?", "a": "Because."}]), "response", "columns: question, a"),
        ("train.jsonl", json.dumps({"text": "Why? Because."}) + "\n", "prompt", "columns: text"),
    ],
    ids=["csv", "json", "jsonl"],
)
def test_no_recognisable_columns(
    tmp_path: Path, tiny_teacher: Path, name: str, text: str, missing: str, columns: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    result = distill(tmp_path, tiny_teacher, path)
    error_line(result, "data.train", f"no {missing} column in {name}", columns, f"Set data.fields.{missing}")


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv", "train.tsv", "train.parquet"])
def test_empty_file(tmp_path: Path, tiny_teacher: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    error_line(distill(tmp_path, tiny_teacher, path), "data.train", f"'{name}' is empty", "Point data.train at")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("train.jsonl", "\n\n  \n"),
        ("train.json", "  \n"),
        ("train.json", "[]"),
        ("train.csv", "instruction,response\n"),
    ],
    ids=["blank-jsonl", "blank-json", "empty-list", "header-only-csv"],
)
def test_file_without_rows(tmp_path: Path, tiny_teacher: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    line = error_line(distill(tmp_path, tiny_teacher, path), "data.train", f"'{name}'", "Point data.train at")
    assert "is empty" in line or "has no rows" in line, line


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("train.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "byte 0, line 1"),
        ("train.jsonl", (json.dumps(GOOD) + '\n{"instruction": "caf\xe9"}\n').encode("latin-1"), "line 2"),
        ("train.json", b"\x00" * 64, "binary"),
        ("train.csv", "instruction,response\nfine,ok\ncaf\xe9,ok\n".encode("latin-1"), "line 3"),
        ("train.csv", "instruction,response\n".encode("utf-16"), "UTF-16"),
    ],
    ids=["png", "latin-1-jsonl", "nul-bytes", "latin-1-csv", "utf-16"],
)
def test_binary_or_non_utf8_file(tmp_path: Path, tiny_teacher: Path, name: str, data: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    line = error_line(distill(tmp_path, tiny_teacher, path), "data.train", f"'{name}'", expected)
    assert "UTF-8" in line, line


def test_offsets_count_the_bom_and_unicode_line_separators_stay_in_their_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": "\xff"}\n')
    with pytest.raises(KdError, match=r"byte 10, line 1\)"):
        load_rows(str(path), "train", "data.train")
    # JSON allows U+2028 / U+2029 unescaped in strings (json.dumps(ensure_ascii=False) writes them): not line ends.
    rows = [{"instruction": "a\u2028b", "response": "c\u2029d\x0ce"}, GOOD]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert load_rows(str(path), "train", "data.train") == rows


# --- rows ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        ({"instruction": "Say hi."}, "has no 'response'"),
        ({"instruction": "Say hi.", "response": None}, "'response' is null"),
        ({"instruction": "Say hi.", "response": ["Hi", "there"]}, "'response' holds a list"),
        ({"instruction": "Say hi.", "response": {"text": "Hi"}}, "'response' holds an object"),
    ],
    ids=["missing", "null", "list", "object"],
)
def test_bad_response_names_line_and_column(
    tmp_path: Path, tiny_teacher: Path, second: dict[str, Any], expected: str
) -> None:
    path = jsonl(tmp_path / "train.jsonl", json.dumps(GOOD), "", json.dumps(second))
    result = distill(tmp_path, tiny_teacher, path)
    line = error_line(result, "data.train", "train.jsonl line 3", expected)
    assert "data.fields.response" in line and "remove the row" in line, line


def test_bad_response_in_a_json_list_names_the_item(tmp_path: Path, tiny_teacher: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "response": None}]), encoding="utf-8")
    error_line(distill(tmp_path, tiny_teacher, path), "data.train", "train.json item 3", "'response' is null")


def test_bad_response_in_parquet_names_the_row(tmp_path: Path, tiny_teacher: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"instruction": "x", "response": None}]), path)
    error_line(distill(tmp_path, tiny_teacher, path), "data.train", "train.parquet row 2", "'response' is null")


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        ({"instruction": ["a", "b"], "response": "ok"}, "'instruction' holds a list"),
        ({"instruction": None, "response": "ok"}, "'instruction' is null"),
        ({"response": "ok"}, "has no 'instruction'"),
    ],
    ids=["list", "null", "missing"],
)
def test_bad_prompt_names_line_and_column(
    tmp_path: Path, tiny_teacher: Path, second: dict[str, Any], expected: str
) -> None:
    path = jsonl(tmp_path / "train.jsonl", json.dumps(GOOD), json.dumps(second))
    line = error_line(distill(tmp_path, tiny_teacher, path), "data.train", "train.jsonl line 2", expected)
    assert "data.fields.prompt" in line, line


# --- empty responses -----------------------------------------------------------------------------------------


def test_empty_responses_are_skipped_with_one_warning(tmp_path: Path, tiny_teacher: Path) -> None:
    rows = [GOOD, {"instruction": "a", "response": ""}, GOOD, {"instruction": "b", "response": "  \n"}, GOOD, GOOD]
    path = jsonl(tmp_path / "train.jsonl", *map(json.dumps, rows))
    result = distill(tmp_path, tiny_teacher, path)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and result.output.count("skipped") == 1, result.output
    (warning,) = warnings
    assert warning.startswith("warning: data.train: skipped 2 of 6 rows of train.jsonl"), warning
    assert "empty 'response'" in warning and "line 2" in warning and "line 4" in warning, warning
    record = json.loads((tmp_path / "recipe" / "runs" / "tiny" / "run.json").read_text(encoding="utf-8"))
    assert record["data"]["train"]["dropped"] == 2 and record["data"]["train"]["examples"] == 4


def test_csv_empty_response_names_the_line_its_row_starts_on(tmp_path: Path, tiny_teacher: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('q,a\nWhy?,"Because.\nThat is why."\nHow?,\nWho?,"Me, you."\n', encoding="utf-8")
    result = distill(tmp_path, tiny_teacher, path, fields={"prompt": "q", "response": "a"})
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert "skipped 1 of 3 rows of train.csv" in warning and "empty 'a'" in warning and "line 4" in warning


def test_data_set_left_empty_is_an_error(tmp_path: Path, tiny_teacher: Path) -> None:
    rows = [{"instruction": "a", "response": ""}, {"instruction": "b", "response": "   "}]
    path = jsonl(tmp_path / "train.jsonl", *map(json.dumps, rows))
    result = distill(tmp_path, tiny_teacher, path)
    line = error_line(result, "data.train", "no usable examples in train.jsonl", "2 row(s)", "'response'")
    assert "data.fields.response" in line, line
    assert "warning" not in result.output.lower(), "the error says it all; no warning before it"
