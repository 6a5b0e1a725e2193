"""kd eval: ROUGE-L and the other metrics against hand-computed values, batched left-padded generation, seed
reuse and resume, targets and data formats, bad input, and an eval of a quickstart student on builtin:starter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.evaluation import (
    EvalItem,
    GenerationSettings,
    aggregate,
    distinct_n,
    exact_match,
    generate_pass,
    resolve_target,
    rouge_l,
    score_pass,
    set_name,
)
from kdcli.evaluation.sets import parse_data_arg

runner = CliRunner()


# --- metrics, by hand ----------------------------------------------------------------------------------------------


def test_rouge_l_hand_computed() -> None:
    assert rouge_l("The cat sat on the mat.", ["the cat sat on the mat"]) == pytest.approx(100.0)
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)
    # LCS "the fox" = 2: P = 2/4, R = 2/2, F = 2PR / (P + R) = 2/3.
    assert rouge_l("the quick brown fox", ["the fox"]) == pytest.approx(200 / 3)
    # Porter stemming: cats -> cat, running/runs -> run.
    assert rouge_l("cats running", ["cat runs"]) == pytest.approx(100.0)
    # A subsequence, not a substring: "a c e" in "a b c d e" -> P = 3/3, R = 3/5, F = 0.75.
    assert rouge_l("a c e", ["a b c d e"]) == pytest.approx(75.0)
    assert rouge_l("nothing shared", ["completely different"]) == 0.0
    assert rouge_l("", ["reference"]) == 0.0


def test_rouge_l_takes_the_best_reference() -> None:
    assert rouge_l("the quick brown fox", ["unrelated words", "the fox", "the quick brown fox"]) == pytest.approx(100.0)
    assert rouge_l("the quick brown fox", ["unrelated words", "the fox"]) == pytest.approx(200 / 3)


def test_exact_match_normalises_case_punctuation_and_spaces() -> None:
    assert exact_match("The answer:  42.", ["the answer 42"]) == 100.0
    assert exact_match("42", ["forty-two", "42!"]) == 100.0
    assert exact_match("the answer is 42", ["42"]) == 0.0


def test_distinct_n_is_corpus_level() -> None:
    # unigrams a b a b -> 2 distinct / 4; bigrams (a b) (b a) (a b) -> 2 / 3
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # Two identical answers halve distinct-1: repetition across prompts counts.
    assert distinct_n(["yes it is", "yes it is"], 1) == pytest.approx(0.5)
    assert distinct_n(["Yes!", "yes !"], 1) == pytest.approx(0.5)  # words and punctuation, lower-cased
    assert distinct_n(["", "one"], 2) == 0.0


def test_score_pass_and_aggregate_over_seeds() -> None:
    rows = [
        {"response": "the cat sat on the mat", "reference": "the cat is on the mat", "tokens": 6},
        {"response": "42", "reference": ["forty two", "42"], "tokens": 2},
    ]
    metrics = score_pass(rows)
    assert metrics["rougeL"] == pytest.approx((500 / 6 + 100) / 2)
    assert metrics["exact_match"] == 50.0 and metrics["length"] == 4.0
    summary = aggregate({"seed-1": {"rougeL": 10.0}, "seed-2": {"rougeL": 20.0}})
    assert summary["rougeL"]["mean"] == 15.0 and summary["rougeL"]["std"] == 5.0  # population std
    assert summary["rougeL"]["per_seed"] == {"seed-1": 10.0, "seed-2": 20.0}


# --- names and targets ------------------------------------------------------------------------------------------


def test_set_names() -> None:
    assert set_name("builtin:starter") == "starter"
    assert set_name("builtin:starter:train") == "starter"
    assert set_name("data/selfinst/eval.jsonl") == "selfinst-eval"
    assert set_name("data/dolly_valid.jsonl") == "dolly_valid"
    assert set_name("databricks/databricks-dolly-15k:train") == "databricks-dolly-15k-train"
    assert parse_data_arg("vicuna=data/v/eval.jsonl") == ("vicuna", "data/v/eval.jsonl")
    assert parse_data_arg("builtin:starter") == (None, "builtin:starter")


def test_targets(tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = resolve_target(str(tiny_teacher))
    assert model.kind == "model" and model.eval_dir == Path("evals") / tiny_teacher.name
    assert model.data.template == "chat" and model.data.eval == "builtin:starter"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"name": "r1", "teacher": {"model": str(tiny_teacher)}, "data": {"template": "Q: {prompt}\nA: "}}
        )
    )
    teacher = resolve_target(f"teacher:{recipe}")
    assert teacher.kind == "teacher" and teacher.model == str(tiny_teacher)
    assert teacher.eval_dir == Path("evals/teacher-r1") and teacher.data.template == "Q: {prompt}\nA: "
    assert (
        resolve_target(str(tiny_teacher), out=tmp_path / "x", template="### {prompt}").data.template == "### {prompt}"
    )


# --- generation ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_teacher: Path):
    from transformers import AutoModelForCausalLM

    from kdcli.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    return model, load_tokenizer(str(tiny_teacher))


def items_for(tokenizer, n: int) -> list[EvalItem]:
    from kdcli.data import format_prompt, load_rows
    from kdcli.recipe import DataConfig

    rows = load_rows("builtin:starter", "eval", "t")[:n]
    return [
        EvalItem(
            r["instruction"],
            format_prompt({"prompt": r["instruction"], "context": r.get("context", "")}, tokenizer, DataConfig()),
            (r["response"],),
        )
        for r in rows
    ]


def test_batched_left_padded_greedy_equals_one_by_one(tmp_path: Path, tiny) -> None:
    model, tokenizer = tiny
    items = items_for(tokenizer, 6)
    settings = GenerationSettings(max_new_tokens=8, greedy=True)
    generate_pass(model, tokenizer, items, settings, None, tmp_path / "b.jsonl", batch_size=4)
    generate_pass(model, tokenizer, items, settings, None, tmp_path / "one.jsonl", batch_size=1)
    batched = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["response"] for r in batched] == [r["response"] for r in single]
    assert [r["index"] for r in batched] == list(range(6))  # written in item order, not batch order
    assert all(r["tokens"] <= 8 and r["prompt"] == item.prompt for r, item in zip(batched, items, strict=True))
    assert not (tmp_path / "b.jsonl.partial").exists()


def test_sampling_is_reproducible_and_resumes_after_an_interruption(tmp_path: Path, tiny) -> None:
    model, tokenizer = tiny
    items = items_for(tokenizer, 6)
    settings = GenerationSettings(max_new_tokens=6)
    whole = tmp_path / "whole.jsonl"
    generate_pass(model, tokenizer, items, settings, 7, whole, batch_size=2)

    class Interrupt(Exception):
        pass

    def stop_after_two_batches(done: int, tokens: int, elapsed: float) -> None:
        if done >= 4:
            raise Interrupt

    cut = tmp_path / "cut.jsonl"
    with pytest.raises(Interrupt):
        generate_pass(model, tokenizer, items, settings, 7, cut, batch_size=2, on_progress=stop_after_two_batches)
    assert not cut.exists() and len((tmp_path / "cut.jsonl.partial").read_text().splitlines()) == 4
    stats = generate_pass(model, tokenizer, items, settings, 7, cut, batch_size=2)
    assert stats["resumed_examples"] == 4
    assert cut.read_text() == whole.read_text()
    other = tmp_path / "other.jsonl"
    generate_pass(model, tokenizer, items, settings, 8, other, batch_size=2)
    assert other.read_text() != whole.read_text()


# --- the command -----------------------------------------------------------------------------------------------------


def kd_eval(*args: str):
    return runner.invoke(app, ["eval", *args])


def test_seeds_are_reused_and_force_regenerates(tmp_path: Path, tiny_teacher: Path) -> None:
    out = tmp_path / "ev"
    common = [
        str(tiny_teacher),
        "--out",
        str(out),
        "--max-examples",
        "4",
        "--max-new-tokens",
        "5",
        "--precision",
        "fp32",
    ]
    result = kd_eval(*common, "--seeds", "1,2")
    assert result.exit_code == 0, result.output
    seed1, seed2 = out / "starter" / "seed-1.jsonl", out / "starter" / "seed-2.jsonl"
    first = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (seed1, seed2)}
    rows = [json.loads(line) for line in seed1.read_text().splitlines()]
    assert len(rows) == 4 and {"prompt", "reference", "response", "tokens"} <= set(rows[0])

    result = kd_eval(*common, "--seeds", "1,2,3")
    assert result.exit_code == 0, result.output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (seed1, seed2)} == first, "finished seeds reused"
    assert "seed-1: reused" in result.output and "seed-3: generated" in result.output
    results = json.loads((out / "results.json").read_text())
    entry = results["sets"]["starter"]["sampling"]
    assert entry["seeds"] == [1, 2, 3] and set(entry["metrics"]["rougeL"]["per_seed"]) == {"seed-1", "seed-2", "seed-3"}
    assert entry["settings"] == {
        "max_new_tokens": 5,
        "greedy": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "precision": "fp32",
    }
    assert results["target"]["kind"] == "model"

    result = kd_eval(*common, "--seeds", "1", "--force")
    assert result.exit_code == 0, result.output
    assert seed1.stat().st_mtime_ns != first[seed1][1] and seed1.read_bytes() == first[seed1][0]  # same seed, same text


def test_different_settings_are_refused_not_overwritten(tmp_path: Path, tiny_teacher: Path) -> None:
    out = tmp_path / "ev"
    common = [str(tiny_teacher), "--out", str(out), "--max-examples", "2", "--seeds", "1"]
    assert kd_eval(*common, "--max-new-tokens", "3").exit_code == 0
    before = (out / "starter" / "seed-1.jsonl").read_bytes()
    result = kd_eval(*common, "--max-new-tokens", "4")
    assert result.exit_code == 2 and "max_new_tokens=3" in result.output and "--force" in result.output
    result = kd_eval(*common, "--max-new-tokens", "3", "--max-examples", "3")
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "starter" / "seed-1.jsonl").read_bytes() == before
    # Greedy is another mode: it lives beside the sampled passes.
    result = kd_eval(*common, "--max-new-tokens", "3", "--greedy")
    assert result.exit_code == 0, result.output
    assert (out / "starter" / "greedy.jsonl").exists() and (out / "starter" / "seed-1.jsonl").read_bytes() == before
    sets = json.loads((out / "results.json").read_text())["sets"]["starter"]
    assert set(sets) == {"sampling", "greedy"} and sets["greedy"]["seeds"] == []
    # Generations whose record is gone cannot be checked: refused, kept, and regenerated only with --force.
    (out / "starter" / "generation.json").unlink()
    result = kd_eval(*common, "--max-new-tokens", "3")
    assert result.exit_code == 2 and "no generation.json" in result.output
    assert (out / "starter" / "seed-1.jsonl").read_bytes() == before
    assert kd_eval(*common, "--max-new-tokens", "3", "--force").exit_code == 0
    assert (out / "starter" / "seed-1.jsonl").read_bytes() == before  # same seed, same answers


def test_minillm_and_alpaca_formats_with_several_references(tmp_path: Path, tiny_teacher: Path) -> None:
    data = tmp_path / "mini" / "valid.jsonl"
    data.parent.mkdir()
    rows = [
        {"prompt": "Say hi.", "output": ["hi", "hello"]},
        {"prompt": "Count to two.", "output": "one two"},
        {"prompt": "No answer here.", "output": ""},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add.", "input": "2 and 2", "output": "4"}))
    out = tmp_path / "ev"
    result = kd_eval(
        str(tiny_teacher),
        "--out",
        str(out),
        "--data",
        str(data),
        "--data",
        f"alp={alpaca}",
        "--greedy",
        "--max-new-tokens",
        "3",
    )
    assert result.exit_code == 0, result.output
    mini = [json.loads(line) for line in (out / "mini-valid" / "greedy.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in mini] == [["hi", "hello"], "one two"]  # the row without a reference is skipped
    alp = json.loads((out / "alp" / "greedy.jsonl").read_text())
    assert alp["instruction"] == "Add.\n\n2 and 2" and "2 and 2" in alp["prompt"]


def test_run_folder_uses_the_recipe_template_and_eval_split(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = {
        "name": "tiny-eval",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(tiny_teacher)},
        "data": {
            "template": "### Q:\n{prompt}\n### A:\n",
            "max_train_examples": 8,
            "max_eval_examples": 3,
            "max_length": 64,
        },
        "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert runner.invoke(app, ["distill", str(path)]).exit_code == 0
    run = tmp_path / "runs" / "tiny-eval"
    result = kd_eval(str(run / "student"), "--seeds", "3", "--max-new-tokens", "4")  # student/ means its run
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "eval" / "starter" / "seed-3.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["prompt"].startswith("### Q:\n") and r["prompt"].endswith("### A:\n") for r in rows)
    assert json.loads((run / "eval" / "results.json").read_text())["target"] == {
        "kind": "run",
        "name": "tiny-eval",
        "model": "student",
    }

    # The run folder copied to another place (the original gone): its passes are reused as they are, no --force.
    copy = shutil.copytree(run, tmp_path / "elsewhere" / "tiny-eval")
    shutil.rmtree(run)
    before = (copy / "eval" / "starter" / "seed-3.jsonl").read_bytes()
    again = kd_eval(str(copy), "--seeds", "3", "--max-new-tokens", "4")
    assert again.exit_code == 0 and "seed-3: reused" in again.output, again.output
    assert (copy / "eval" / "starter" / "seed-3.jsonl").read_bytes() == before
    generation = copy / "eval" / "starter" / "generation.json"
    assert json.loads(generation.read_text())["inputs"]["model"] == "student"
    # A record of an older kd, which held the student's absolute path, is reused too, and rewritten without it.
    record = json.loads(generation.read_text())
    record["inputs"]["model"] = str(run / "student")
    generation.write_text(json.dumps(record))
    again = kd_eval(str(copy), "--seeds", "3", "--max-new-tokens", "4")
    assert again.exit_code == 0 and "seed-3: reused" in again.output, again.output
    assert json.loads(generation.read_text())["inputs"]["model"] == "student"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no/such/folder"], "TARGET: no such folder"),
        (["teacher:missing.yaml"], "missing.yaml: no such file"),
        (["{model}", "--seeds", "a,b"], "--seeds"),
        (["{model}", "--seeds", ""], "--seeds: give at least one seed"),
        (["{model}", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["{model}", "--judge", "claude"], "--judge: unknown judge"),
        (["{model}", "--judge-dry-run"], "needs --judge gpt4"),
        (["{model}", "--data", "nope.jsonl"], "--data: no such file 'nope.jsonl'"),
        (["{model}", "--data", "a=builtin:starter", "--data", "a=builtin:starter"], "two sets are named 'a'"),
        (["{model}", "--template", "no placeholder"], "--template"),
        (["{model}", "--precision", "fp8"], "--precision"),
        (["{recipe}"], "teacher:"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, tiny_teacher: Path, args: list[str], message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    args = [a.replace("{model}", str(tiny_teacher)).replace("{recipe}", str(recipe)) for a in args]
    result = kd_eval(*args, "--out", str(tmp_path / "ev"))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


# --- the quickstart student ---------------------------------------------------------------------------------------


def test_eval_of_a_quickstart_student_on_builtin_starter(
    tmp_path: Path, builtin_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped quickstart recipe, distilled for one step on two short examples, then `kd eval` on the first
    three builtin:starter eval prompts, two seeds, with the real SmolLM2 tokenizer and chat template."""
    monkeypatch.setenv("KD_HOME", str(builtin_home))
    repo = Path(__file__).resolve().parent.parent
    args = ["distill", str(repo / "recipes" / "quickstart.yaml")]
    for item in (
        "train.max_steps=1",
        "train.batch_size=2",
        "data.max_train_examples=2",
        "data.max_eval_examples=2",
        "data.max_length=48",
        f"output_dir={tmp_path / 'runs'}",
    ):
        args += ["--set", item]
    assert runner.invoke(app, args).exit_code == 0
    run = tmp_path / "runs" / "quickstart-fkl"

    result = kd_eval(str(run), "--max-examples", "3", "--seeds", "10,20", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    entry = json.loads((run / "eval" / "results.json").read_text())["sets"]["starter"]["sampling"]
    from kdcli.hardware import native_bf16

    expected_precision = "bf16" if native_bf16() else "fp32"  # quickstart and eval both say `auto`
    assert entry["examples"] == 3 and entry["seeds"] == [10, 20]
    assert entry["settings"]["precision"] == expected_precision
    for metric in ("rougeL", "exact_match", "length", "distinct_1", "distinct_2"):
        assert set(entry["metrics"][metric]["per_seed"]) == {"seed-10", "seed-20"}
    assert 0 <= entry["metrics"]["rougeL"]["mean"] <= 100 and 0 < entry["metrics"]["length"]["mean"] <= 8
    rows = [json.loads(line) for line in (run / "eval" / "starter" / "seed-10.jsonl").read_text().splitlines()]
    from kdcli.data import format_prompt, load_rows
    from kdcli.models import load_tokenizer
    from kdcli.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = load_tokenizer(str(run / "student"))
    first = load_rows("builtin:starter", "eval", "t")[0]
    expected = format_prompt({"prompt": first["instruction"], "context": first["context"]}, tokenizer, recipe.data)
    assert rows[0]["prompt"] == expected and expected.startswith("<|im_start|>")  # the training template
    assert rows[0]["reference"] == first["response"] and all(r["tokens"] <= 8 for r in rows)
    assert "ROUGE-L" in result.output and "tokens/s" in result.output
