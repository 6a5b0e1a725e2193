"""`teacher.server`: a cache written through a served teacher equals one written from the model itself; training
online through the server equals training from that cache; every check is one line before any work; retries,
a dead server and the key. The server is `fake_vllm.FakeVLLM`, which answers with vLLM's schema from a real forward
of the tiny teacher (tests/test_vllm_server.py runs against the real vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fake_vllm import FakeVLLM
from test_distill import runner, tiny_recipe

from kdcli.cli import app
from kdcli.errors import KdError
from kdcli.models import load_tokenizer
from kdcli.models.served import ServedTeacher
from kdcli.recipe.optional import ServerConfig

K = 8


def served_recipe(tmp_path: Path, teacher: Path, url: str, **server: object) -> Path:
    """The tiny recipe with `teacher.server` on `url` (tiny_recipe names its teacher positionally)."""
    path = tiny_recipe(tmp_path, teacher, cache={"top_k": K, "shard_tokens": 600}, train={"max_steps": 6})
    raw = yaml.safe_load(path.read_text())
    raw["teacher"]["server"] = {"url": url, "model": "served-teacher", "top_k": K, **server}
    path.write_text(yaml.safe_dump(raw))
    return path


def cache_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    shards = sorted((path / "train").glob("shard-*.safetensors"))
    parts = [load_file(shard) for shard in shards]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def test_a_cache_through_the_server_equals_the_local_one(tmp_path: Path, tiny_teacher: Path, kd_home: Path) -> None:
    local_recipe = tiny_recipe(tmp_path / "local", tiny_teacher, cache={"top_k": K, "shard_tokens": 600})
    done = runner.invoke(app, ["cache-teacher", str(local_recipe), "--out", str(tmp_path / "local-cache")])
    assert done.exit_code == 0, done.output
    with FakeVLLM(tiny_teacher) as server:
        recipe = served_recipe(tmp_path / "served", tiny_teacher, server.url)
        done = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(tmp_path / "served-cache")])
        assert done.exit_code == 0, done.output
        prompts = [r["body"] for r in server.requests if r["path"] == "/v1/completions"]
    assert all(body["max_tokens"] == 1 and isinstance(body["prompt"][0], int) for body in prompts)
    local, served = cache_of(tmp_path / "local-cache"), cache_of(tmp_path / "served-cache")
    for key in ("input_ids", "label_mask", "lengths", "positions"):
        assert torch.equal(local[key], served[key]), key
    agree = (local["topk_ids"] == served["topk_ids"]).all(dim=1)
    assert agree.float().mean() == 1.0  # fp32 on both sides: the same top-K set and order at every position
    assert (local["topk_logprobs"].float() - served["topk_logprobs"].float()).abs().max() < 2e-3  # fp16 storage
    assert (local["label_logprob"] - served["label_logprob"]).abs().max() < 1e-4
    assert (local["tail_mass"] - served["tail_mass"]).abs().max() < 1e-4
    manifest = json.loads((tmp_path / "served-cache" / "manifest.json").read_text())
    assert manifest["teacher"]["of"] == "server" and manifest["teacher"]["server"]["model"] == "served-teacher"
    assert manifest["served_at"].startswith("http://127.0.0.1:") and manifest["teacher"]["server"]["version"]
    assert manifest["setup"]["served_model"] == "served-teacher" and manifest["setup"]["temperature"] == 1.0


def test_online_through_the_server_trains_as_from_its_cache(tmp_path: Path, tiny_teacher: Path, kd_home: Path) -> None:
    with FakeVLLM(tiny_teacher) as server:
        recipe = served_recipe(tmp_path, tiny_teacher, server.url)
        online = runner.invoke(app, ["distill", str(recipe), "--set", "name=online"])
        assert online.exit_code == 0, online.output
        cache = tmp_path / "cache"
        written = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(cache), "--split", "all"])
        assert written.exit_code == 0, written.output
    # From the cache: no server at all (it is shut down), the same records.
    raw = yaml.safe_load(recipe.read_text())
    raw["teacher"]["cache"] = str(cache)
    cached_recipe = tmp_path / "cached.yaml"
    cached_recipe.write_text(yaml.safe_dump(raw))
    cached = runner.invoke(app, ["distill", str(cached_recipe), "--set", "name=cached"])
    assert cached.exit_code == 0, cached.output

    def losses(name: str) -> list[float]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    online_losses, cached_losses = losses("online"), losses("cached")
    assert len(online_losses) == 6 and online_losses == pytest.approx(cached_losses, abs=2e-3)  # fp16 storage
    record = json.loads((tmp_path / "runs" / "online" / "run.json").read_text())
    assert record["parameters"]["teacher"] > 0


def test_on_policy_batches_are_scored_by_the_server(tmp_path: Path, tiny_teacher: Path, kd_home: Path) -> None:
    with FakeVLLM(tiny_teacher) as server:
        recipe = served_recipe(tmp_path, tiny_teacher, server.url)
        done = runner.invoke(
            app,
            ["distill", str(recipe), "--set", "on_policy.ratio=0.5", "--set", "on_policy.max_new_tokens=6",
             "--set", "train.max_steps=2"],
        )  # fmt: skip
        assert done.exit_code == 0, done.output
    record = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert record["gen_tokens"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "another"}, "teacher.server.model: 'another' is not served at http://127.0.0.1:"),
        (
            {"top_k": 64},
            "teacher.server.top_k: 64 is above what the server allows (20); start vLLM with --max-logprobs 64",
        ),
        ({"api_key_env": "KD_TEST_MISSING_KEY"}, "teacher.server.api_key_env: $KD_TEST_MISSING_KEY is not set"),
    ],
)
def test_each_check_is_one_line_before_any_weight(
    tmp_path: Path, tiny_teacher: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch, change: dict, message: str
) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr("kdcli.engine.setup.load_teacher", no_weights)
    monkeypatch.setattr("kdcli.models.load_teacher", no_weights)
    with FakeVLLM(tiny_teacher) as server:
        recipe = served_recipe(tmp_path, tiny_teacher, server.url, **change)
        for command in (["distill", str(recipe)], ["cache-teacher", str(recipe), "--out", str(tmp_path / "c")]):
            done = runner.invoke(app, command)
            lines = [line for line in done.output.splitlines() if line.startswith("error:")]
            assert done.exit_code == 2 and len(lines) == 1 and message in lines[0], done.output


def test_another_tokenizer_and_raw_logits_are_refused(
    tmp_path: Path, tiny_teacher: Path, tiny_other_vocab: Path
) -> None:
    tokenizer = load_tokenizer(str(tiny_teacher))
    with FakeVLLM(tiny_other_vocab) as other:
        client = ServedTeacher(ServerConfig(url=other.url, model="served-teacher", top_k=K))
        with pytest.raises(KdError, match=r"splits a probe text differently from teacher\.model's"):
            client.check(tokenizer, K)
    with FakeVLLM(tiny_teacher, raw_logits=True) as logits:
        client = ServedTeacher(ServerConfig(url=logits.url, model="served-teacher", top_k=K))
        with pytest.raises(KdError, match=r"returns logits, not log-probabilities .*--logprobs-mode raw_logits"):
            client.check(tokenizer, K)


def test_a_temperature_other_than_one_is_refused_with_a_server(tmp_path: Path, tiny_teacher: Path) -> None:
    recipe = served_recipe(tmp_path, tiny_teacher, "http://127.0.0.1:9/v1")
    done = runner.invoke(app, ["recipe", "check", str(recipe), "--set", "loss.params.temperature=2.0"])
    assert done.exit_code == 2 and "prompt log-probs are at temperature 1" in done.output


def test_retries_and_the_key(tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_TEST_VLLM_KEY", "sk-served-secret")
    waits: list[float] = []
    with FakeVLLM(tiny_teacher, fail={1: 503, 2: "drop", 3: 429}, key="sk-served-secret") as server:
        config = ServerConfig(url=server.url, model="served-teacher", top_k=K, api_key_env="KD_TEST_VLLM_KEY")
        client = ServedTeacher(config, sleep=waits.append)
        answers = client.positions([[1, 5, 9, 12]], K)
        assert len(answers[0]) == 3 and len(waits) == 3  # three failures, three waits, then the answer
        assert all(r["headers"].get("Authorization") == "Bearer sk-served-secret" for r in server.requests)
    with FakeVLLM(tiny_teacher, fail={1: 503, 2: 503, 3: 503}) as server:
        client = ServedTeacher(
            ServerConfig(url=server.url, model="served-teacher", top_k=K, retries=2), sleep=waits.append
        )
        with pytest.raises(KdError, match=r"did not answer \(HTTP 503\) after 2 retries"):
            client.positions([[1, 5, 9]], K)


def test_a_server_that_dies_keeps_the_finished_shards(tmp_path: Path, tiny_teacher: Path, kd_home: Path) -> None:
    out = tmp_path / "cache"
    with FakeVLLM(tiny_teacher, fail=dict.fromkeys(range(12, 400), 503)) as server:
        recipe = served_recipe(tmp_path, tiny_teacher, server.url, retries=1)
        raw = yaml.safe_load(recipe.read_text())
        raw["cache"]["batch_size"] = 2
        recipe.write_text(yaml.safe_dump(raw))
        done = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out)])
    assert done.exit_code == 2, done.output
    line = next(line for line in done.output.splitlines() if line.startswith("error:"))
    assert "did not answer (HTTP 503) after 1 retries" in line and "finished shard(s) in" in line, line
    kept = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert kept  # some shards were finished before the server went
    with FakeVLLM(tiny_teacher) as server:  # back on another port: the recipe follows it
        raw["teacher"]["server"]["url"] = server.url
        recipe.write_text(yaml.safe_dump(raw))
        again = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out)])
        assert again.exit_code == 0, again.output
    whole = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert whole["complete"] and whole["shards"][: len(kept)] == kept


def test_the_key_is_never_written(
    tmp_path: Path, tiny_teacher: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_TEST_VLLM_KEY", "sk-never-on-disk")
    with FakeVLLM(tiny_teacher, key="sk-never-on-disk") as server:
        recipe = served_recipe(tmp_path, tiny_teacher, server.url, api_key_env="KD_TEST_VLLM_KEY")
        assert runner.invoke(app, ["distill", str(recipe), "--set", "train.max_steps=1"]).exit_code == 0
        assert runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(tmp_path / "c")]).exit_code == 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"sk-never-on-disk" not in path.read_bytes(), path


def test_greedy_generation_through_the_server_is_the_local_models(tmp_path: Path, tiny_teacher: Path) -> None:
    """The same pass file from the served teacher as from the model itself (greedy: no sampler to differ)."""
    from transformers import AutoModelForCausalLM

    from kdcli.models import GenerationSettings, generate_file, read_generations

    tokenizer = load_tokenizer(str(tiny_teacher))
    prompts = [f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n" for i in range(5)]
    settings = GenerationSettings(max_new_tokens=9, greedy=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    generate_file(model, tokenizer, prompts, settings, None, tmp_path / "local.jsonl", batch_size=2)
    with FakeVLLM(tiny_teacher) as server:
        client = ServedTeacher(ServerConfig(url=server.url, model="served-teacher", top_k=K))
        client.check(tokenizer, K)
        generate_file(client, tokenizer, prompts, settings, None, tmp_path / "served.jsonl", batch_size=2)
    local, served = read_generations(tmp_path / "local.jsonl"), read_generations(tmp_path / "served.jsonl")
    assert [(r["response"], r["tokens"], r["stopped"]) for r in served] == [
        (r["response"], r["tokens"], r["stopped"]) for r in local
    ]


def test_sequence_level_kd_generates_through_the_server(tmp_path: Path, tiny_teacher: Path, kd_home: Path) -> None:
    """`data.responses: teacher` with a served teacher: the responses are sampled by the server, each request
    seeded, and a second run asks exactly the same requests again."""
    sampled = {"do_sample": True, "max_new_tokens": 12, "batch_size": 4, "seed": 3}
    with FakeVLLM(tiny_teacher) as server:
        recipe = served_recipe(tmp_path, tiny_teacher, server.url)
        raw = yaml.safe_load(recipe.read_text())
        raw["generation"] = sampled
        raw["data"].update(responses="teacher", max_train_examples=8, max_eval_examples=4)
        recipe.write_text(yaml.safe_dump(raw))
        out = tmp_path / "cache"
        done = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out)])
        assert done.exit_code == 0, done.output
        asked = [r["body"] for r in server.requests if r.get("body", {}).get("max_tokens", 1) > 1]
        assert len(asked) == 8 + 4  # the train and eval prompts
        assert len({body["seed"] for body in asked[:8]}) == 8  # each of a split's requests seeded apart
        assert all(body["temperature"] == 1.0 and body["return_token_ids"] for body in asked)
        again = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out), "--overwrite"])
        assert again.exit_code == 0, again.output
        repeated = [r["body"] for r in server.requests if r.get("body", {}).get("max_tokens", 1) > 1]
    rows = [json.loads(line) for line in (out / "train" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(row["tokens"] <= 12 for row in rows)
    # The same requests again (in another order: they go out concurrently).
    assert sorted((b["seed"], b["prompt"]) for b in repeated[12:]) == sorted((b["seed"], b["prompt"]) for b in asked)
