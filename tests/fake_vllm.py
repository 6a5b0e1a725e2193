"""A real HTTP server on 127.0.0.1 that answers as vLLM's OpenAI-compatible server does, for a local model.

The replies' shape is copied from vLLM 0.32.0 (`python -m vllm.entrypoints.openai.api_server`, the built-in teacher,
see docs/served-teacher.md): `/v1/models`, `/version`, `/tokenize`, and `/v1/completions` with `prompt_logprobs`
(per prompt position after the first, a map "token id" → {logprob, rank, decoded_token} of the K best tokens and the
prompt's own, `null` first), its 400 above `--max-logprobs` and its 404 for another model. The numbers come from a
real forward of the model given, in fp32, so a cache written through this server can be checked against one written
from the model itself. Failures are scripted: `fail` maps a request number to an HTTP status (or "drop" to close
the connection), `raw_logits` answers logits as `--logprobs-mode raw_logits` does.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import torch
from loopback import LoopbackServer


class FakeVLLM(LoopbackServer):
    def __init__(
        self,
        model_dir: Path,
        *,
        name: str = "served-teacher",
        max_logprobs: int = 20,
        fail: dict[int, int | str] | None = None,
        raw_logits: bool = False,
        key: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.name, self.root, self.max_logprobs = name, str(model_dir), max_logprobs
        self.fail = dict(fail or {})
        self.raw_logits, self.key = raw_logits, key
        self.requests: list[dict[str, Any]] = []
        self.completions = 0
        self._lock = threading.Lock()
        super().__init__(self._handler())

    # --- the endpoints

    def models(self) -> dict[str, Any]:
        entry = {"id": self.name, "object": "model", "created": 0, "owned_by": "vllm", "root": self.root,
                 "parent": None, "max_model_len": 512, "permission": []}  # fmt: skip
        return {"object": "list", "data": [entry]}

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        return {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}

    def completion(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("model") != self.name:
            message = f"The model `{body.get('model')}` does not exist. Valid aliases: {self.name}."
            return 404, {"error": {"message": message, "type": "NotFoundError", "param": "model", "code": 404}}
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            message = (
                f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs} "
                f"(parameter=prompt_logprobs, value={k})"
            )
            return 400, {"error": {"message": message, "type": "BadRequestError", "param": "prompt_logprobs",
                                   "code": 400}}  # fmt: skip
        ids = [int(t) for t in body["prompt"]]
        choice: dict[str, Any] = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                                  "stop_reason": None, "token_ids": None}  # fmt: skip
        if k is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(ids, int(k))
        if body.get("max_tokens", 16) > 1 or body.get("return_token_ids"):
            out, reason = self._generate(ids, body)
            choice.update(text=self.tokenizer.decode(out), finish_reason=reason)
            if body.get("return_token_ids"):
                choice.update(token_ids=out, prompt_token_ids=ids)
        usage = {"prompt_tokens": len(ids), "total_tokens": len(ids) + 1, "completion_tokens": 1}
        return 200, {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": self.name,
                     "choices": [choice], "usage": usage}  # fmt: skip

    def _prompt_logprobs(self, ids: list[int], k: int) -> list[dict[str, dict[str, Any]] | None]:
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        scores = logits if self.raw_logits else torch.log_softmax(logits, dim=-1)
        out: list[dict[str, dict[str, Any]] | None] = [None]
        for t in range(1, len(ids)):
            row = scores[t - 1]
            values, top = row.topk(k)
            target = ids[t]
            entry = {str(target): {"logprob": float(row[target]), "rank": int((row > row[target]).sum()) + 1,
                                   "decoded_token": self.tokenizer.decode([target])}}  # fmt: skip
            for rank, (token, value) in enumerate(zip(top.tolist(), values.tolist(), strict=True), 1):
                entry.setdefault(str(token), {"logprob": float(value), "rank": rank,
                                              "decoded_token": self.tokenizer.decode([token])})  # fmt: skip
            out.append(entry)
        return out

    def _generate(self, ids: list[int], body: dict[str, Any]) -> tuple[list[int], str]:
        torch.manual_seed(int(body.get("seed") or 0))
        greedy = float(body.get("temperature", 1.0)) == 0.0
        kwargs = {"do_sample": not greedy, "max_new_tokens": int(body.get("max_tokens", 16))}
        if not greedy:
            kwargs.update(temperature=float(body["temperature"]), top_p=float(body.get("top_p", 1.0)), top_k=0)
        with torch.no_grad():
            full = self.model.generate(torch.tensor([ids]), pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        out = full[0, len(ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in out:
            return out[: out.index(eos) + 1], "stop"
        return out, "length"

    # --- HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, data: dict[str, Any]) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _authorised(self) -> bool:
                if fake.key is None or self.headers.get("Authorization") == f"Bearer {fake.key}":
                    return True
                self._answer(401, {"error": {"message": "Unauthorized", "type": "Unauthorized", "code": 401}})
                return False

            def do_GET(self) -> None:
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers)})
                if not self._authorised():
                    return
                if self.path == "/v1/models":
                    self._answer(200, fake.models())
                elif self.path == "/version":
                    self._answer(200, {"version": "0.32.0"})
                else:
                    self._answer(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if not self._authorised():
                    return
                if self.path == "/tokenize":
                    self._answer(200, fake.tokenize(body))
                    return
                if self.path != "/v1/completions":
                    self._answer(404, {"detail": "Not Found"})
                    return
                with fake._lock:
                    fake.completions += 1
                    scripted = fake.fail.get(fake.completions)
                if scripted == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if scripted is not None:
                    self._answer(int(scripted), {"error": {"message": "scripted failure", "code": scripted}})
                    return
                self._answer(*fake.completion(body))

        return Handler
