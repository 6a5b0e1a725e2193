"""`kd cache-teacher` and `teacher.cache` on tiny random Llamas: format, integrity, resume, training from the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from test_distill import tiny_recipe
from typer.testing import CliRunner

from kdcli.cache import format as fmt
from kdcli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def cache_recipe(tmp_path: Path, teacher: Path, cache: Path | None = None, **sections: dict) -> Path:
    """`tiny_recipe` with small cache shards, training from `cache` when given."""
    path = tiny_recipe(tmp_path, teacher, **{"cache": {"shard_tokens": 600, "batch_size": 4}, **sections})
    if cache is not None:
        recipe = yaml.safe_load(path.read_text())
        recipe["teacher"]["cache"] = str(cache)
        path.write_text(yaml.safe_dump(recipe))
    return path


def cache_cli(recipe: Path, out: Path, *args: str) -> str:
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return result.output


def read_shards(out: Path, split: str = "train") -> list[dict[str, torch.Tensor]]:
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    shards = []
    for info in manifest["splits"][split]["shards"]:
        with safe_open(str(out / split / info["file"]), "pt") as handle:
            shards.append({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return shards


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """A train + eval cache of the tiny teacher at K = 16, several shards per split."""
    tmp_path = tmp_path_factory.mktemp("cache")
    out = tmp_path / "cache"
    output = cache_cli(cache_recipe(tmp_path, tiny_teacher), out, "--split", "all", "--top-k", "16")
    assert "bytes / position" in output and "top-K teacher mass" in output
    return out


def test_manifest_records_what_the_cache_came_from(cached: Path, tiny_teacher: Path) -> None:
    manifest = json.loads((cached / fmt.MANIFEST).read_text())
    assert manifest["format"] == fmt.FORMAT and manifest["version"] == fmt.VERSION
    assert manifest["teacher"]["id"] == str(tiny_teacher) and len(manifest["teacher"]["sha256"]) == 64
    setup = manifest["setup"]
    assert setup["max_length"] == 96 and setup["template"] == "chat" and len(setup["tokenizer"]) == 64
    assert manifest["writer"] | {"top_k": 16, "id_dtype": "uint16", "logprob_dtype": "fp16"} == manifest["writer"]
    train = manifest["splits"]["train"]
    assert train["complete"] and train["examples"] == 32 and len(train["shards"]) > 1
    assert train["data"]["source"] == "builtin:starter" and len(train["data"]["sha256"]) == 64
    for info in train["shards"]:
        path = cached / "train" / info["file"]
        assert fmt.sha256_file(path) == info["sha256"] and path.stat().st_size == info["bytes"] and info["rows"] > 0
    stats = manifest["stats"]
    assert (
        0 < stats["topk_mass_mean"] <= 1 and stats["dense_fp16_bytes_per_position"] == 2 * manifest["writer"]["vocab"]
    )
    assert not list(cached.rglob(".shard-*")), "no temporaries left behind"


def test_records_equal_the_online_teacher(cached: Path, tiny_teacher: Path) -> None:
    """The stored top-K equals `SparseTeacher.from_logits` of a plain forward, within the fp16 storage precision."""
    from transformers import AutoModelForCausalLM

    from kdcli.losses import SparseTeacher

    shard = read_shards(cached)[0]
    assert shard["topk_ids"].dtype == torch.uint16 and shard["topk_logprobs"].dtype == torch.float16
    n = int(shard["lengths"][0])
    ids, mask = shard["input_ids"][:n].long(), shard["label_mask"][:n].bool()
    labels = torch.full_like(ids, -100)
    labels[:-1][mask[:-1]] = ids[1:][mask[:-1]]
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    ref = SparseTeacher.from_logits(logits[mask], labels[mask], 16)
    p = int(shard["positions"][0])
    assert p == int(mask.sum()) > 0
    torch.testing.assert_close(shard["topk_logprobs"][:p].float(), ref.topk_logprobs, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(shard["label_logprob"][:p], ref.label_logprob, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(shard["tail_mass"][:p], ref.tail_mass, atol=1e-3, rtol=1e-3)
    assert (shard["topk_ids"][:p, :4].long() == ref.topk_ids[:, :4]).float().mean() > 0.95  # ties may reorder


def test_training_from_the_cache_never_loads_the_teacher(
    cached: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdcli.engine.setup as setup

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(setup, "load_teacher", refuse)
    monkeypatch.setattr(setup, "OnlineTeacher", refuse)
    recipe = cache_recipe(tmp_path, tiny_teacher, cached, loss={"divergence": "atkd"}, train={"max_steps": 10})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert run["eval_after"]["eval_loss"] < run["eval_before"]["eval_loss"]
    assert run["eval_after"]["eval_tokens"] > 0 and run["parameters"]["teacher"] > 0


def test_full_vocabulary_cache_trains_like_the_online_teacher(tiny_teacher: Path, tmp_path: Path) -> None:
    """At K = V the sparse loss is the dense one, so the first steps match an online run up to fp16 storage."""
    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    out = tmp_path / "full"
    cache_cli(cache_recipe(tmp_path / "w", tiny_teacher), out, "--split", "all", "--top-k", str(vocab))
    runs = {}
    for name, cache in (("online", None), ("cached", out)):
        recipe = cache_recipe(tmp_path / name, tiny_teacher, cache, train={"max_steps": 3})
        result = runner.invoke(app, ["distill", str(recipe)])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((tmp_path / name / "runs" / "tiny" / "run.json").read_text())
    for key in ("eval_before", "eval_after"):
        assert runs["cached"][key]["eval_loss"] == pytest.approx(runs["online"][key]["eval_loss"], rel=2e-3)


def test_cache_mismatch_is_refused_with_a_table(cached: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    recipe = cache_recipe(tmp_path, tiny_teacher, cached, data={"max_length": 64, "max_train_examples": 16})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2
    assert "max_length" in result.output and "96" in result.output and "64" in result.output
    assert "data.train.max_examples" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output


def test_eval_split_missing_names_the_command(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "train-only"
    cache_cli(cache_recipe(tmp_path / "w", tiny_teacher), out, "--top-k", "8", "--split", "train")
    result = runner.invoke(app, ["distill", str(cache_recipe(tmp_path, tiny_teacher, out))])
    assert result.exit_code == 2 and "--split eval" in result.output and "data.eval: null" in result.output
    # ... and the command it names completes the cache, reusing the train split.
    output = cache_cli(cache_recipe(tmp_path / "w", tiny_teacher), out, "--top-k", "8", "--split", "eval")
    assert "train: already cached" in output or "eval" in output
    assert json.loads((out / fmt.MANIFEST).read_text())["splits"]["eval"]["complete"]


def test_cache_teacher_by_default_caches_what_distill_reads(tiny_teacher: Path, tmp_path: Path) -> None:
    """cache-teacher then distill with teacher.cache composes with no flags: the eval split is cached too."""
    out = tmp_path / "default"
    cache_cli(cache_recipe(tmp_path / "w", tiny_teacher), out, "--top-k", "8")
    splits = json.loads((out / fmt.MANIFEST).read_text())["splits"]
    assert set(splits) == {"train", "eval"} and all(entry["complete"] for entry in splits.values())
    recipe = cache_recipe(tmp_path, tiny_teacher, out, train={"max_steps": 2})
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    no_eval = tmp_path / "no-eval"
    cache_cli(cache_recipe(tmp_path / "w2", tiny_teacher, data={"eval": None}), no_eval, "--top-k", "8")
    assert set(json.loads((no_eval / fmt.MANIFEST).read_text())["splits"]) == {"train"}


def test_verify_names_a_truncated_or_altered_shard(cached: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    import shutil

    ok = runner.invoke(app, ["cache-teacher", "--verify", str(cached)])
    assert ok.exit_code == 0, ok.output
    copy = tmp_path / "copy"
    shutil.copytree(cached, copy)
    shard = sorted((copy / "train").glob("shard-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = runner.invoke(app, ["cache-teacher", "--verify", str(copy)])
    assert result.exit_code == 2 and shard.name in result.output and "truncated" in result.output
    assert "re-run `kd cache-teacher`" in result.output
    data = bytearray((copy / "train" / "shard-00000.safetensors").read_bytes())
    data[-5] ^= 0xFF  # same size, one bit flipped in the tensor data
    (copy / "train" / "shard-00000.safetensors").write_bytes(bytes(data))
    result = runner.invoke(app, ["cache-teacher", "--verify", str(copy)])
    assert result.exit_code == 2 and "shard-00000" in result.output and "altered" in result.output
    # Training loads are checked too: the first batch touching the altered shard stops the run.
    result = runner.invoke(app, ["distill", str(cache_recipe(tmp_path, tiny_teacher, copy))])
    assert result.exit_code == 2 and "teacher cache shard" in result.output and "Traceback" not in result.output


def test_out_must_be_a_cache_or_empty(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = cache_recipe(tmp_path, tiny_teacher)
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out), "--overwrite"])
    assert result.exit_code == 2 and "not a teacher cache" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    for args, words in (
        (["--split", "both"], "--split"),
        (["--top-k", "0"], "--top-k"),
        (["--top-k", "100000"], "cache.top_k"),
    ):
        result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(tmp_path / "new"), *args])
        assert result.exit_code == 2 and words in result.output, result.output
    result = runner.invoke(app, ["cache-teacher", "--verify", str(out)])
    assert result.exit_code == 2 and "not a teacher cache" in result.output


def test_other_settings_are_refused_unless_overwrite(cached: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(cached, out)
    recipe = cache_recipe(tmp_path, tiny_teacher)
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out), "--top-k", "8"])
    assert result.exit_code == 2 and "writer.top_k" in result.output and "16" in result.output
    cache_cli(recipe, out, "--top-k", "8", "--overwrite")
    assert json.loads((out / fmt.MANIFEST).read_text())["writer"]["top_k"] == 8


def test_responses_from_the_teacher(tiny_teacher: Path, tmp_path: Path) -> None:
    """`data.responses: teacher`: generated (seeded, batched) once, stored, and trained on from prompts only."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name a colour number {i}."}) + "\n" for i in range(6)))
    sections = {
        "data": {"train": str(prompts), "eval": None, "responses": "teacher", "max_train_examples": None},
        "generation": {"max_new_tokens": 8, "batch_size": 4, "seed": 3},
    }
    out = tmp_path / "seqkd"
    refused = runner.invoke(app, ["distill", str(cache_recipe(tmp_path / "a", tiny_teacher, **sections))])
    assert refused.exit_code == 2 and "kd cache-teacher" in refused.output
    cache_cli(cache_recipe(tmp_path / "w", tiny_teacher, **sections), out, "--top-k", "8")
    lines = [json.loads(line) for line in (out / "train" / fmt.RESPONSES).read_text().splitlines()]
    assert len(lines) == 6 and all(line["tokens"] <= 8 for line in lines)
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    assert manifest["setup"]["generation"]["seed"] == 3 and manifest["splits"]["train"]["examples"] >= 1
    recipe = cache_recipe(tmp_path / "t", tiny_teacher, out, train={"max_steps": 2, "batch_size": 2}, **sections)
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    other = {**sections, "generation": {**sections["generation"], "seed": 4}}
    recipe = cache_recipe(tmp_path / "u", tiny_teacher, out, **other)
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2 and "generation.seed" in result.output


def test_killed_run_resumes_to_the_same_cache(tiny_teacher: Path, tmp_path: Path) -> None:
    """SIGKILL the writer once its first shard is listed, re-run, and compare every tensor to an uninterrupted run."""
    recipe = cache_recipe(tmp_path, tiny_teacher, cache={"shard_tokens": 400})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    slow = [sys.executable, str(REPO / "tests" / "slow_cache_writer.py"), "0.5", "cache-teacher", str(recipe)]
    proc = subprocess.Popen([*slow, "--top-k", "8", "--out", str(killed)], env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            manifest = killed / fmt.MANIFEST
            if manifest.is_file() and json.loads(manifest.read_text())["splits"].get("train", {}).get("shards"):
                break
            assert proc.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    partial = json.loads((killed / fmt.MANIFEST).read_text())["splits"]["train"]
    assert not partial["complete"] and 0 < len(partial["shards"]) < len(partial["plan"])
    assert "resuming after" in cache_cli(recipe, killed, "--top-k", "8")
    whole = tmp_path / "whole"
    cache_cli(recipe, whole, "--top-k", "8")
    a, b = read_shards(killed), read_shards(whole)
    assert len(a) == len(b) == len(partial["plan"])
    for left, right in zip(a, b, strict=True):
        assert left.keys() == right.keys()
        for name in left:
            assert torch.equal(left[name], right[name]), name
    listed = [json.loads((d / fmt.MANIFEST).read_text())["splits"]["train"]["shards"] for d in (killed, whole)]
    assert [s["sha256"] for s in listed[0]] == [s["sha256"] for s in listed[1]]


def test_reader_keeps_no_tensors_in_memory(cached: Path) -> None:
    """A split holds offsets only; examples are sliced from the memory-mapped files on demand."""
    from kdcli.cache.reader import CacheCollator, open_split

    manifest = json.loads((cached / fmt.MANIFEST).read_text())
    split = open_split(cached, manifest, "train")
    batch = CacheCollator(0, 16)([split[0], split[len(split) - 1]])
    valid = batch["labels"] != -100
    assert batch["topk_ids"].shape[-1] == 16 and torch.all(batch["tail_mass"][~valid] == 0)
    assert torch.all(batch["topk_logprobs"][valid].exp().sum(-1) + batch["tail_mass"][valid] <= 1.01)
    for shard in split.shards:
        held = [v for v in vars(shard).values() if isinstance(v, torch.Tensor)]
        assert held == []
    assert yaml.safe_dump(split.stats())  # plain data for run.json
    # Batching by length reads the lengths from the shards' indexes: the same as the examples'.
    assert split.lengths() == [len(split[i]["input_ids"]) for i in range(len(split))]
