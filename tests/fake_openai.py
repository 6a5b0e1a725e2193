"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol, for testing the judge.

Each request is answered by a script: a list of `Reply`s consumed in order (the last one repeats), or a function
of the request body. It records every request (headers and body) and the most requests it had in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import LoopbackServer


@dataclass
class Reply:
    content: str = "8 7"
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent as the body instead of a chat completion


Script = list[Reply] | Callable[[dict[str, Any]], Reply]


class FakeOpenAI(LoopbackServer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        super().__init__(self._handler())

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            if callable(self.script):
                return self.script(body)
            index = min(len(self.requests) - 1, len(self.script) - 1)
            return self.script[index]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests.append(
                        {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                    )
                    fake._in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
                try:
                    reply = fake._next(body)
                    if reply.delay:
                        time.sleep(reply.delay)
                    self._send(reply, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: that is what the slow reply tests
                finally:
                    with fake._lock:
                        fake._in_flight -= 1

            def _send(self, reply: Reply, body: dict[str, Any]) -> None:
                if reply.raw is not None:
                    payload = reply.raw
                elif reply.status == 200:
                    prompt_tokens = sum(len(m.get("content", "")) for m in body.get("messages", [])) // 4
                    completion_tokens = max(1, len(reply.content) // 4)
                    payload = json.dumps(
                        {
                            "id": "chatcmpl-fake",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body.get("model", ""),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": reply.content},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens,
                            },
                        }
                    ).encode()
                else:
                    error = {"message": f"scripted {reply.status}", "type": "server_error", "code": None}
                    payload = json.dumps({"error": error}).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler
