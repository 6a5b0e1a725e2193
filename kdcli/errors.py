"""The one exception type that reaches the user as a one-line message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdError(Exception):
    """A problem with the user's input: shown as one line, never as a traceback (unless --debug)."""


class KdWarning(UserWarning):
    """Something kd skipped, and says so (a damaged checkpoint, a metrics line cut off by a kill): one `warning:`
    line from the CLI."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""
