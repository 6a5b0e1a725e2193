"""The LLM judge against a real HTTP server on 127.0.0.1 speaking the OpenAI protocol, through the real `openai`
client: scripted verdicts, 429s, 500s, a slow reply, malformed text; retries, backoff, the cache, both orders,
failure counting, and that the API key is never written anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Reply
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.errors import KdError
from kdcli.evaluation.judge import (
    JudgeClient,
    JudgeSettings,
    ReplyCache,
    Verdict,
    load_template,
    parse_verdict,
    pass_requests,
    score_pass,
)

runner = CliRunner()
KEY = "sk-test-SECRET-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Rate these."}]


def client_for(server: FakeOpenAI, cache: ReplyCache | None = None, sleeps: list[float] | None = None, **settings):
    defaults = {"model": "judge-model", "base_url": server.url, "backoff": 0.001, "max_retries": 3, "timeout": 5.0}
    record = sleeps.append if sleeps is not None else (lambda _: None)
    return JudgeClient(JudgeSettings(**{**defaults, **settings}), KEY, cache, sleep=record)


# --- parsing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8 7\nAssistant 1 was more detailed.", (8.0, 7.0)),
        ("  \n8.5 6\n", (8.5, 6.0)),
        ("**9 4**\n\nexplanation", (9.0, 4.0)),
        ("Scores: 8, 7\nbecause", (8.0, 7.0)),
        ("8/10 7/10", (8.0, 7.0)),
        ("10 1", (10.0, 1.0)),
        ("Here is my review.\nAssistant 1: 6\nAssistant 2: 9\nBoth are fine.", (6.0, 9.0)),
        ("Assistant 1 score: 3/10, Assistant 2 score: 5/10", (3.0, 5.0)),
        ("I think both answers are fine.", None),
        ("8 7 6", None),
        ("8 7 because the first is better", None),
        ("11 7", None),
        ("0 5", None),
        ("Assistant 1: 8 ... later Assistant 1: 6, Assistant 2: 7", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict(text: str | None, expected: tuple[float, float] | None) -> None:
    assert parse_verdict(text) == expected


def test_template_is_versioned_and_inserts_answers_verbatim() -> None:
    template = load_template()
    assert template.version == "judge_v1" and len(template.sha256) == 64
    messages = template.render("What is {x}?", "uses {answer_2} literally", "B's answer")
    user = messages[-1]["content"]
    assert messages[0]["role"] == "system" and "[Question]\nWhat is {x}?" in user
    assert "uses {answer_2} literally" in user and user.index("uses {answer_2}") < user.index("B's answer")
    assert "helpfulness, relevance, accuracy, and level of detail" in user
    assert "#" not in messages[0]["content"]  # comment lines are not sent


# --- the client -------------------------------------------------------------------------------------------------


def test_retries_429_and_500_then_succeeds() -> None:
    script = [Reply(status=429), Reply(status=500), Reply("9 6")]
    with FakeOpenAI(script) as server:
        client = client_for(server)
        verdict = client.judge(MESSAGES)
    assert verdict.scores == (9.0, 6.0)
    assert client.stats.requests == 3 and client.stats.retries == 2 and client.stats.failures == 0
    assert len(server.requests) == 3
    sent = server.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["model"] == "judge-model"
    assert sent["body"]["messages"] == MESSAGES and sent["headers"]["authorization"] == f"Bearer {KEY}"
    assert client.stats.prompt_tokens > 0 and client.stats.completion_tokens > 0


def test_backoff_is_exponential_and_honours_retry_after() -> None:
    sleeps: list[float] = []
    script = [
        Reply(status=500),
        Reply(status=502),
        Reply(status=503),
        Reply(status=429, headers={"Retry-After": "0.25"}),
    ]
    script.append(Reply("7 7"))
    with FakeOpenAI(script) as server:
        verdict = client_for(server, sleeps=sleeps, backoff=0.01, max_retries=5).judge(MESSAGES)
    assert verdict.scores == (7.0, 7.0)
    assert len(sleeps) == 4
    for attempt, delay in enumerate(sleeps[:3]):
        assert 0.8 * 0.01 * 2**attempt <= delay <= 1.2 * 0.01 * 2**attempt
    assert sleeps[3] == pytest.approx(0.25)


def test_gives_up_after_the_retries_and_counts_the_failure(tmp_path: Path) -> None:
    cache = ReplyCache.open(tmp_path / "cache.jsonl")
    with FakeOpenAI([Reply(status=500)]) as server:
        client = client_for(server, cache, max_retries=2)
        verdict = client.judge(MESSAGES)
        assert verdict.scores is None and "HTTP 500" in (verdict.error or "") and "3 tries" in (verdict.error or "")
        assert client.stats.failures == 1 and len(server.requests) == 3
        # A transport failure is not a verdict: it is not cached, so the next run asks again.
        client_for(server, ReplyCache.open(tmp_path / "cache.jsonl"), max_retries=0).judge(MESSAGES)
        assert len(server.requests) == 4


def test_client_errors_are_not_retried() -> None:
    with FakeOpenAI([Reply(status=400)]) as server:
        client = client_for(server)
        verdict = client.judge(MESSAGES)
    assert verdict.scores is None and "HTTP 400" in (verdict.error or "")
    assert len(server.requests) == 1 and client.stats.retries == 0


def test_a_slow_reply_times_out_and_is_retried() -> None:
    with FakeOpenAI([Reply("1 1", delay=2.0), Reply("8 9")]) as server:
        client = client_for(server, timeout=0.3)
        verdict = client.judge(MESSAGES)
    assert verdict.scores == (8.0, 9.0)
    assert client.stats.retries == 1 and len(server.requests) == 2


def test_an_unparseable_verdict_is_retried_once(tmp_path: Path) -> None:
    with FakeOpenAI([Reply("Both answers are good."), Reply("6 8")]) as server:
        client = client_for(server, ReplyCache.open(tmp_path / "c.jsonl"))
        verdict = client.judge(MESSAGES)
    assert verdict.scores == (6.0, 8.0) and verdict.replies == ["Both answers are good.", "6 8"]
    assert client.stats.unparseable == 1 and client.stats.failures == 0


def test_two_unparseable_verdicts_are_a_counted_failure_and_cached(tmp_path: Path) -> None:
    with FakeOpenAI([Reply("no idea"), Reply("still no idea"), Reply("8 8")]) as server:
        client = client_for(server, ReplyCache.open(tmp_path / "c.jsonl"))
        verdict = client.judge(MESSAGES)
        assert verdict.scores is None and verdict.error and "unparseable" in verdict.error
        assert verdict.replies == ["no idea", "still no idea"]
        assert client.stats.failures == 1 and client.stats.unparseable == 2 and len(server.requests) == 2
        # Both paid-for replies are cached: a repeated run re-reads them and sends nothing.
        again = client_for(server, ReplyCache.open(tmp_path / "c.jsonl"))
        verdict = again.judge(MESSAGES)
        assert verdict.scores is None and again.stats.cache_hits == 2 and again.stats.failures == 1
        assert len(server.requests) == 2


def test_a_reply_that_is_not_a_chat_completion_is_a_failure() -> None:
    with FakeOpenAI([Reply(raw=b"<html>gateway</html>")]) as server:
        client = client_for(server)
        verdict = client.judge(MESSAGES)
    assert verdict.scores is None and client.stats.failures == 1


def test_a_rejected_key_stops_judging_and_is_not_shown() -> None:
    with FakeOpenAI([Reply(status=401)]) as server, pytest.raises(KdError) as err:
        client_for(server).judge(MESSAGES)
    assert "rejected the API key" in str(err.value) and KEY not in str(err.value)


def test_cache_hit_makes_no_request(tmp_path: Path) -> None:
    with FakeOpenAI([Reply("5 6")]) as server:
        first = client_for(server, ReplyCache.open(tmp_path / "c.jsonl"))
        first.judge(MESSAGES)
        second = client_for(server, ReplyCache.open(tmp_path / "c.jsonl"))
        assert second.judge(MESSAGES).scores == (5.0, 6.0)
        assert len(server.requests) == 1 and second.stats.requests == 0 and second.stats.cache_hits == 1
        # Another judge model is another key.
        client_for(server, ReplyCache.open(tmp_path / "c.jsonl"), model="other").judge(MESSAGES)
        assert len(server.requests) == 2
    assert KEY not in (tmp_path / "c.jsonl").read_text()


def test_concurrency_is_bounded() -> None:
    requests = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    with FakeOpenAI([Reply("7 7", delay=0.15)]) as server:
        verdicts = client_for(server, concurrency=3).judge_all(requests)
    assert [v.scores for v in verdicts] == [(7.0, 7.0)] * 12
    assert 2 <= server.max_in_flight <= 3


# --- the protocol ------------------------------------------------------------------------------------------------


def biased_judge(reference_quality: float, model_quality: float, reference: str):
    """A judge that adds 1 to whichever answer is shown first: averaging both orders must cancel that."""

    def reply(body: dict) -> Reply:
        user = body["messages"][-1]["content"]
        first = user.split("[The Start of Assistant 1's Answer]\n", 1)[1]
        reference_first = first.startswith(reference)
        a, b = (reference_quality, model_quality) if reference_first else (model_quality, reference_quality)
        return Reply(f"{a + 1:g} {b:g}\nexplanation")

    return reply


def test_both_orders_are_asked_and_averaged() -> None:
    rows = [{"index": 0, "instruction": "Name a colour.", "reference": "REF: blue", "response": "green"}]
    template = load_template()
    requests = pass_requests(rows, template)
    assert len(requests) == 2
    with FakeOpenAI(biased_judge(8, 6, "REF:")) as server:
        verdicts = client_for(server).judge_all(requests)
    assert [v.scores for v in verdicts] == [(9.0, 6.0), (7.0, 8.0)]
    metrics, records = score_pass(rows, verdicts)
    # model: (6 + 7) / 2 = 6.5; reference: (9 + 8) / 2 = 8.5; the +1 for position 1 cancels.
    assert records[0]["model_score"] == 6.5 and records[0]["reference_score"] == 8.5
    assert metrics["judge"] == pytest.approx(100 * 6.5 / 8.5)
    assert metrics["judged_examples"] == 1 and metrics["failed_verdicts"] == 0


def test_an_example_with_a_failed_order_is_excluded_and_counted() -> None:
    rows = [
        {"index": 0, "instruction": "a", "reference": "r0", "response": "m0"},
        {"index": 1, "instruction": "b", "reference": "r1", "response": "m1"},
    ]
    verdicts = [
        Verdict((8.0, 4.0), ["8 4"]),
        Verdict((4.0, 8.0), ["4 8"]),
        Verdict((10.0, 1.0), ["10 1"]),
        Verdict(None, ["?", "?"], error="unparseable verdict (2 replies)"),
    ]
    metrics, records = score_pass(rows, verdicts)
    assert metrics["judge"] == pytest.approx(50.0)  # only example 0: model 4, reference 8
    assert metrics["excluded_examples"] == 1 and metrics["failed_verdicts"] == 1
    assert records[1]["model_score"] is None and records[1]["verdicts"][1]["error"].startswith("unparseable")


# --- kd eval --judge, end to end ---------------------------------------------------------------------------------


def eval_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval", str(model), "--out", str(out), "--max-examples", "3", "--seeds", "1,2",
        "--max-new-tokens", "4", *extra,
    ]  # fmt: skip


def starter_references(n: int) -> list[str]:
    from importlib import resources

    text = resources.files("kdcli.data").joinpath("starter", "eval.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["response"] for line in text.splitlines()[:n]]


def test_kd_eval_judge_end_to_end(tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    references = starter_references(3)
    first_calls: list[int] = []

    def script(body: dict) -> Reply:
        first_calls.append(1)
        if len(first_calls) == 1:
            return Reply(status=429, headers={"Retry-After": "0"})
        if len(first_calls) == 2:
            return Reply("I cannot decide.")  # unparseable: asked again
        user = body["messages"][-1]["content"]
        first = user.split("[The Start of Assistant 1's Answer]\n", 1)[1]
        return Reply("9 3" if any(first.startswith(r[:40]) for r in references) else "3 9")

    out = tmp_path / "eval"
    with FakeOpenAI(script) as server:
        args = eval_args(tiny_teacher, out, "--judge", "gpt4", "--judge-url", server.url, "--judge-model", "fake-4")
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        sent = len(server.requests)
        assert sent == 3 * 2 * 2 + 2  # examples × seeds × orders, plus the 429 and the unreadable reply
        results = json.loads((out / "results.json").read_text())
        entry = results["sets"]["starter"]["sampling"]
        assert entry["metrics"]["judge"]["mean"] == pytest.approx(100 * 3 / 9)
        assert set(entry["metrics"]["judge"]["per_seed"]) == {"seed-1", "seed-2"}
        judge = entry["judge"]
        assert judge["prompt"] == "judge_v1" and judge["settings"]["model"] == "fake-4"
        assert judge["settings"]["base_url"] == server.url and judge["failed_verdicts"] == 0
        records = [json.loads(line) for line in (out / "starter" / "judge-seed-1.jsonl").read_text().splitlines()]
        assert len(records) == 3 and records[0]["model_score"] == 3.0 and records[0]["reference_score"] == 9.0
        assert "judge usage" in result.output and "judge" in result.output

        # Repeated: generations are reused and every verdict comes from the cache. Nothing is sent.
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert len(server.requests) == sent and "reused" in again.output
        assert (
            json.loads((out / "results.json").read_text())["sets"]["starter"]["sampling"]["metrics"]["judge"]
            == (entry["metrics"]["judge"])
        )

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "judge-cache.jsonl" for p in written)
    for path in written:
        assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_missing_key_is_reported_before_generation(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "eval"
    result = runner.invoke(app, eval_args(tiny_teacher, out, "--judge", "gpt4"))
    assert result.exit_code == 2
    assert "OPENAI_API_KEY is not set" in result.output and "Traceback" not in result.output
    assert not list(out.rglob("*.jsonl")), "nothing may be generated before the key is checked"


def test_dry_run_prints_a_prompt_and_the_estimate_and_sends_nothing(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAI([Reply("8 8")]) as server:
        args = eval_args(tiny_teacher, tmp_path / "eval", "--judge", "gpt4", "--judge-url", server.url)
        result = runner.invoke(app, [*args, "--judge-dry-run"])
        assert result.exit_code == 0, result.output
        assert server.requests == []
    assert "judge dry run" in result.output and "[Question]" in result.output
    assert "12 requests" in result.output and "Nothing was sent" in result.output


def test_rejected_key_exits_2_without_the_key(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI([Reply(status=401)]) as server:
        result = runner.invoke(
            app, eval_args(tiny_teacher, tmp_path / "eval", "--judge", "gpt4", "--judge-url", server.url)
        )
    assert result.exit_code == 2 and "rejected the API key" in result.output and KEY not in result.output


def test_a_judge_whose_replies_never_parse_is_reported_and_fails(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing judged is not a score: the table says n/a, the output says how many verdicts failed, why, and what
    the judge replied, and the command exits nonzero."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    out = tmp_path / "eval"
    with FakeOpenAI([Reply("Both answers are helpful.")]) as server:
        args = eval_args(tiny_teacher, out, "--judge", "gpt4", "--judge-url", server.url, "--judge-model", "fake-4")
        result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "12 of 12 verdicts failed (unparseable verdict (2 replies): 12)" in output
    assert "one reply: 'Both answers are helpful.'" in output
    assert "no verdict succeeded" in output and "judge-<pass>.jsonl" in output
    (judge_row,) = [line for line in result.output.splitlines() if re.match(r"│ judge +│", line)]
    assert judge_row.rstrip(" │").endswith("n/a")
    entry = json.loads((out / "results.json").read_text())["sets"]["starter"]["sampling"]
    assert "judge" not in entry["metrics"]
    failures = entry["judge"]["failures"]
    assert (failures["asked"], failures["failed"]) == (12, 12)
    assert failures["example_reply"] == "Both answers are helpful."


def test_some_failed_verdicts_are_reported_and_the_rest_scored(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    script = [Reply("no idea")] * 4 + [Reply("8 4")]  # one at a time: the first two verdicts fail, twice each
    with FakeOpenAI(script) as server:
        args = eval_args(tiny_teacher, tmp_path / "eval", "--judge", "gpt4", "--judge-url", server.url)
        result = runner.invoke(app, [*args, "--judge-concurrency", "1"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "2 of 12 verdicts failed (unparseable verdict (2 replies): 2); one reply: 'no idea'" in output
