"""Judge replies cached on disk, so an interrupted or repeated judging run pays for no request twice.

The key is the sha256 of the judge model and the exact request (messages, temperature, max_tokens): a new prompt
version, another model or another answer is a new key. The cache stores raw reply text, not parsed scores, so an
improved parser re-reads old replies for free. Entries are appended as JSON lines one by one: a crash loses at
most the request in flight, and a full disk stops judging with `DiskFull` keeping every reply written before.
Nothing secret goes in: no key, no headers, no URL.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.durable import append_text, json_lines
from kdcli.evaluation.judge.prompt import Messages


def cache_key(model: str, messages: Messages, params: dict[str, Any]) -> str:
    payload = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class CachedReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ReplyCache:
    """key -> replies in the order they were received (a second reply exists only when the first was unreadable)."""

    path: Path | None
    _entries: dict[str, list[CachedReply]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, path: Path | None) -> ReplyCache:
        cache = cls(path)
        if path is not None and path.exists():
            for line in json_lines(path.read_text(encoding="utf-8")):
                try:
                    record = json.loads(line)
                    reply = CachedReply(
                        str(record["reply"]),
                        int(record.get("prompt_tokens", 0)),
                        int(record.get("completion_tokens", 0)),
                    )
                    cache._entries.setdefault(str(record["key"]), []).append(reply)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line torn by a crash: that request is simply made again
        return cache

    def replies(self, key: str) -> list[CachedReply]:
        with self._lock:
            return list(self._entries.get(key, []))

    def add(self, key: str, model: str, reply: CachedReply) -> None:
        with self._lock:
            self._entries.setdefault(key, []).append(reply)
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "key": key,
                "model": model,
                "reply": reply.text,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
            }
            append_text(self.path, json.dumps(record, ensure_ascii=False) + "\n")  # whole, or `DiskFull`

    def __len__(self) -> int:
        return len(self._entries)
