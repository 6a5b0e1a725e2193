"""`kd compare --judge gpt4`: each run's answers against the baseline's, on the same prompts and passes.

The judge is kd eval's (`kdcli.evaluation.judge`): the same client, retries, versioned pairwise prompt (Vicuna's,
which rates two assistants' answers to one question) and on-disk reply cache. Here the two assistants are two
runs instead of the reference and a run. Every pair is asked in both orders; a run's score is its mean over the
two, which cancels the judge's preference for a position, and the higher mean wins (equal means tie). Identical
answers tie without asking the judge. A pair with a failed verdict in either order is left out and counted, as in
kd eval.

Replies are cached in the baseline's `eval/judge-cache.jsonl`, so a repeated comparison pays nothing twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

from kdcli.compare.core import Comparison, HeadToHead
from kdcli.compare.evalset import row_key
from kdcli.compare.runs import RunData
from kdcli.errors import KdError
from kdcli.evaluation.judge import JudgeClient, JudgeSettings, ReplyCache, load_template
from kdcli.evaluation.judge.failures import JudgeFailures
from kdcli.evaluation.judge.prompt import Messages
from kdcli.evaluation.results import JUDGE_CACHE_FILE

JUDGES = ("gpt4",)


def judge_client(judge: str, settings: JudgeSettings, baseline: RunData, api_key: str | None = None) -> JudgeClient:
    """The client, or a `KdError` before anything is sent (unknown judge, missing key, broken prompt)."""
    if judge not in JUDGES:
        raise KdError(f"--judge: unknown judge '{judge}'. Choose one of: {', '.join(JUDGES)}.")
    if settings.base_url is None and os.environ.get("OPENAI_BASE_URL"):
        settings = replace(settings, base_url=os.environ["OPENAI_BASE_URL"])
    load_template(settings.prompt)
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
    if not key.strip():
        raise KdError(
            f"--judge {judge}: OPENAI_API_KEY is not set. Export it (any non-empty value for a local server without "
            "authentication)."
        )
    return JudgeClient(settings, key.strip(), ReplyCache.open(baseline.eval_dir / JUDGE_CACHE_FILE))


def head_to_head(
    comparison: Comparison,
    runs: Sequence[RunData],
    client: JudgeClient,
    *,
    max_examples: int | None = None,
    on_done: Callable[[], None] | None = None,
) -> list[HeadToHead]:
    """Win/tie/loss of every run against the baseline, per set and mode they share; also appended to
    `comparison.head_to_head`. `max_examples` keeps the first N shared examples of each pass."""
    template = load_template(client.settings.prompt)
    by_label = {run.label: run for run in runs}
    baseline = by_label[comparison.baseline]
    results: list[HeadToHead] = []
    for s in comparison.evaluation:
        for run in runs:
            if run is baseline or run.label in s.missing or baseline.label in s.missing or not s.passes:
                continue
            requests: list[Messages] = []
            identical, skipped = 0, False
            for label in s.passes:
                mine, theirs = run.pass_rows(s.set, label), baseline.pass_rows(s.set, label)
                if mine is None or theirs is None:
                    skipped = True
                    break
                base_rows = {row_key(row): row for row in theirs}
                pairs = [(row, base_rows[row_key(row)]) for row in mine if row_key(row) in base_rows]
                for row, base in pairs[:max_examples]:
                    instruction = str(row.get("instruction", row.get("prompt", "")))
                    answer, base_answer = str(row.get("response", "")), str(base.get("response", ""))
                    if answer.strip() == base_answer.strip():
                        identical += 1
                        continue
                    requests.append(template.render(instruction, answer, base_answer))
                    requests.append(template.render(instruction, base_answer, answer))
            if skipped:
                comparison.notes.append(
                    f"head-to-head {run.label} vs {baseline.label} on {s.set}: generation files are missing; skipped."
                )
                continue
            before = client.stats.as_dict()
            verdicts = client.judge_all(requests, on_done=on_done)
            wins, ties, losses, excluded = 0, identical, 0, 0
            for first, second in zip(verdicts[::2], verdicts[1::2], strict=True):
                if first.scores is None or second.scores is None:
                    excluded += 1
                    continue
                mine_score = (first.scores[0] + second.scores[1]) / 2
                base_score = (first.scores[1] + second.scores[0]) / 2
                wins += mine_score > base_score
                ties += mine_score == base_score
                losses += mine_score < base_score
            judged = wins + ties + losses
            after = client.stats.as_dict()
            failures = JudgeFailures.of(verdicts)
            if failures.failed:
                comparison.notes.append(
                    f"head-to-head {run.label} vs {baseline.label} on {s.set} ({s.mode}): {failures.describe()}"
                )
            results.append(
                HeadToHead(
                    run=run.label,
                    baseline=baseline.label,
                    set=s.set,
                    mode=s.mode,
                    pairs=judged,
                    wins=wins / judged if judged else None,
                    ties=ties / judged if judged else None,
                    losses=losses / judged if judged else None,
                    excluded=excluded,
                    requests=after["requests"] - before["requests"],
                    cache_hits=after["cache_hits"] - before["cache_hits"],
                    failures=failures,
                )
            )
    comparison.head_to_head.extend(results)
    return results
