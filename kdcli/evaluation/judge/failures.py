"""What became of the verdicts that failed, for kd eval and kd compare alike: how many, why, and one reply.

A judge whose replies never parse (a model that ignores the format, a server that answers something else) used to
end in counters and a score of null, or a win rate of 0.0% over 0 pairs, which reads as measured. Both commands
now say what happened in one line, print "n/a" where nothing was judged, and exit nonzero when no verdict
succeeded (`check_some_succeeded`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kdcli.errors import KdError
from kdcli.evaluation.judge.client import Verdict

EXAMPLE_CHARS = 120  # of the example reply shown


@dataclass(frozen=True)
class JudgeFailures:
    asked: int = 0  # verdicts asked for (from the server or the cache)
    failed: int = 0  # of which ended with no scores
    reasons: dict[str, int] = field(default_factory=dict)  # why (the verdict's error) → how many, most first
    example_reply: str | None = None  # one reply of a failed verdict, as the judge wrote it (cut short)

    @classmethod
    def of(cls, verdicts: Iterable[Verdict]) -> JudgeFailures:
        verdicts = list(verdicts)
        failed = [v for v in verdicts if v.scores is None]
        reasons = Counter(v.error or "no scores" for v in failed)
        example = next((reply for v in failed for reply in v.replies if reply.strip()), None)
        return cls(len(verdicts), len(failed), dict(reasons.most_common()), example)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JudgeFailures:
        return cls(int(data["asked"]), int(data["failed"]), dict(data["reasons"]), data.get("example_reply"))

    def __add__(self, other: JudgeFailures) -> JudgeFailures:
        reasons = Counter(self.reasons) + Counter(other.reasons)
        example = self.example_reply if self.example_reply is not None else other.example_reply
        return JudgeFailures(self.asked + other.asked, self.failed + other.failed, dict(reasons.most_common()), example)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def none_succeeded(self) -> bool:
        return self.asked > 0 and self.failed == self.asked

    def describe(self) -> str:
        """One line: `12 of 12 verdicts failed (unparseable verdict (2 replies): 12); one reply: 'Both are fine.'`"""
        why = "; ".join(f"{reason}: {count}" for reason, count in self.reasons.items())
        text = f"{self.failed} of {self.asked} verdicts failed ({why})"
        if self.example_reply is not None:
            reply = " ".join(self.example_reply.split())
            reply = reply if len(reply) <= EXAMPLE_CHARS else reply[: EXAMPLE_CHARS - 1] + "…"
            text += f"; one reply: {reply!r}"
        return text


def check_some_succeeded(failures: JudgeFailures, judge: str, where: str) -> None:
    """Refuse, after the results are written, a judging in which not one verdict had scores: nothing was measured.
    `where`: where the replies can be read."""
    if failures.none_succeeded:
        raise KdError(
            f"--judge {judge}: no verdict succeeded, nothing was judged: {failures.describe()}. Check --judge-url "
            f"and --judge-model (a model that answers in the prompt's format); the replies are in {where}."
        )
