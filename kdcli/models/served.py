"""A teacher behind a server (`teacher.server`): vLLM, or any server of its OpenAI-compatible API.

kd asks it for what a local forward gives: per position, the teacher's top-K log-probabilities and the label's.
`/v1/completions` with the sequence's token ids as the prompt, `prompt_logprobs: K` and `max_tokens: 1` returns,
for every prompt position after the first, a map token id → {logprob, rank} holding the K best tokens and the
prompt's own next token (vLLM: `gpu_model_runner._get_prompt_logprobs_dict`). Those are log-softmax of the raw
logits: vLLM applies a request's temperature to sampling only, never to prompt log-probs, which is why a recipe
with a served teacher is refused at any other temperature (`recipe.schema`).

Before any work `check` asks the server what kd relies on, each failure one line naming the key and the fix: it
serves `model`, its tokenizer splits a probe text as the recipe's does, it accepts K prompt log-probs (vLLM's
`--max-logprobs`), and what it returns are log-probabilities (not `--logprobs-mode raw_logits`).

Requests go out `concurrency` at a time; 429, 5xx, timeouts and refused connections are retried `retries` times
with backoff (1, 2, 4, ... s, at most 60, ±20 %, or the server's Retry-After). A server that stays down is a
`ServerGone` naming the URL and the cause. The key, from the environment variable `api_key_env` names, is sent as a
bearer token and never written anywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from kdcli.errors import KdError
from kdcli.models.generation import (
    STOPPED_AT_EOS,
    Generation,
    GenerationPlan,
    GenerationSettings,
    Prompt,
    batch_plan,
    batch_seed,
    cut_at_stop,
    prompt_token_ids,
)

if TYPE_CHECKING:
    import requests
    import torch

    from kdcli.losses import SparseTeacher
    from kdcli.recipe.optional import ServerConfig

FIELD = "teacher.server"
PROBE_TEXT = "kd probe: Hello, wörld! 12,345 apples — naïve café 🙂\n<|im_start|>user\nWhy?"
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_MAX_WAIT_S = 60.0
_LIMIT = re.compile(r"max(?:imum)? allowed:?\s*(\d+)", re.IGNORECASE)


class ServerGone(KdError):
    """The server stopped answering (after every retry): the caller says what was kept and how to go on."""


@dataclass(frozen=True)
class Position:
    """What the server said of one prompt position: the K best tokens (best first) and the next token's log-prob."""

    topk: list[tuple[int, float]]  # (token id, log p), rank 1 first
    label_logprob: float


def public_url(url: str) -> str:
    """The URL without user info or query string: what may be recorded and shown."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ServedTeacher:
    """The client of one served teacher."""

    def __init__(self, cfg: ServerConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        # vLLM serves /tokenize and /version beside /v1, not under it.
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env, "").strip()
            if not key:
                raise KdError(
                    f"{FIELD}.api_key_env: ${cfg.api_key_env} is not set; export the server's key in it, or drop "
                    "api_key_env for a server without one."
                )
            headers["Authorization"] = f"Bearer {key}"
            self._secret = key
        else:
            self._secret = ""
        self._headers = headers
        self._local = threading.local()  # one keep-alive session per thread: requests' sessions are not shared
        self._sleep = sleep
        self.info: dict[str, Any] = {}

    def _session(self) -> requests.Session:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self._headers)
        return session

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()

    # --- what the server is

    def check(self, tokenizer: Any, k: int) -> dict[str, Any]:
        """Everything kd relies on, before any work; returns what the server says of itself (for the manifest)."""
        models = self._call("GET", f"{self.url}/models")
        served = [str(m.get("id")) for m in models.get("data", []) if isinstance(m, dict)]
        if self.cfg.model not in served:
            raise KdError(
                f"{FIELD}.model: '{self.cfg.model}' is not served at {public_url(self.url)}; it serves "
                f"{', '.join(served) or 'nothing'}. Name one of those, or start the server with --served-model-name "
                f"{self.cfg.model}."
            )
        entry = next(m for m in models["data"] if m.get("id") == self.cfg.model)
        version = self._call("GET", f"{self.root}/version", missing_ok=True).get("version")
        local = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        remote = self._call(
            "POST",
            f"{self.root}/tokenize",
            {"model": self.cfg.model, "prompt": PROBE_TEXT, "add_special_tokens": False},
            missing_ok=True,
        ).get("tokens")
        if remote is not None and list(remote) != local:
            pairs = enumerate(zip(local, remote, strict=False))
            first = next((i for i, (a, b) in pairs if a != b), min(len(local), len(remote)))
            theirs, ours = remote[first : first + 3], local[first : first + 3]
            raise KdError(
                f"{FIELD}: the served model's tokenizer splits a probe text differently from teacher.model's (token "
                f"{first}: {theirs} against {ours}); serve the model teacher.model names, or name the served one in "
                "teacher.model."
            )
        probe = self.positions([local[:6] or [0, 0]], k)[0]
        if any(lp > 1e-4 for pos in probe for _, lp in pos.topk) or any(_logsumexp(pos) > 1e-3 for pos in probe):
            raise KdError(
                f"{FIELD}: the server returns logits, not log-probabilities (is vLLM started with --logprobs-mode "
                "raw_logits?); start it with the default --logprobs-mode raw_logprobs."
            )
        # What the teacher is (a cache resumes only with the same); where it was asked is `public_url(self.url)`.
        self.info = {
            "model": self.cfg.model,
            "version": version,
            "root": entry.get("root"),
            "max_model_len": entry.get("max_model_len"),
            "tokenizer_probe": "matches" if remote is not None else "not checked (no /tokenize)",
        }
        return self.info

    # --- log-probs

    def positions(self, sequences: Sequence[Sequence[int]], k: int) -> list[list[Position]]:
        """For each sequence, one `Position` per token after the first: what the teacher gives that token and its
        K best alternatives, from the prefix before it. `concurrency` requests in flight."""

        def one(ids: Sequence[int]) -> list[Position]:
            body = {"model": self.cfg.model, "prompt": [int(t) for t in ids], "max_tokens": 1, "prompt_logprobs": k}
            reply = self._call("POST", f"{self.url}/completions", body, top_k=k)
            return _positions(reply, list(ids), k, self.url)

        if len(sequences) <= 1:
            return [one(ids) for ids in sequences]
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(sequences))) as pool:
            return list(pool.map(one, sequences))

    def sparse(self, input_ids: torch.Tensor, lengths: Sequence[int], labels: torch.Tensor, k: int) -> SparseTeacher:
        """The `SparseTeacher` records of the labelled positions of a padded batch, in row-major order (what
        `SparseTeacher.from_logits` gives for `logits[labels != -100]`): top-K, the label's log-prob, the tail."""
        import torch

        from kdcli.losses import SparseTeacher

        sequences = [input_ids[row, :length].tolist() for row, length in enumerate(lengths)]
        answers = self.positions(sequences, k)
        ids, lps, label_lp, tail = [], [], [], []
        for row, length in enumerate(lengths):
            for t in (labels[row, :length] != -100).nonzero().squeeze(1).tolist():
                position = answers[row][t]  # position t predicts token t + 1: its entry is the (t + 1)-th's
                if int(labels[row, t]) != sequences[row][t + 1]:
                    raise ValueError("labels must be the next token of input_ids (the collator's shifted labels)")
                ids.append([token for token, _ in position.topk])
                lps.append([lp for _, lp in position.topk])
                label_lp.append(position.label_logprob)
                tail.append(_tail_mass(position))
        return SparseTeacher(
            torch.tensor(ids, dtype=torch.long).reshape(-1, k),
            torch.tensor(lps, dtype=torch.float32).reshape(-1, k),
            torch.tensor(label_lp, dtype=torch.float32),
            torch.tensor(tail, dtype=torch.float32),
            temperature=1.0,
        )

    # --- generation (sequence-level KD): a `kdcli.models.generation.Generator`

    def plan(
        self, tokenizer: Any, prompts: Sequence[Prompt], settings: GenerationSettings, batch_size: int
    ) -> GenerationPlan:
        """As `plan_generation` plans for a local model, with the served model's context and the tokenizer's EOS."""
        from transformers import GenerationConfig

        context = self.info.get("max_model_len")
        room = context - settings.max_new_tokens if context and context > settings.max_new_tokens else None
        prompt_ids = prompt_token_ids(tokenizer, prompts, room)
        stops = [int(tokenizer.eos_token_id)]
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=not settings.greedy,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
        )
        return GenerationPlan(prompt_ids, batch_plan(prompt_ids, batch_size), stops, stops[0], config)

    def batch(self, tokenizer: Any, plan: GenerationPlan, batch: int, seed: int | None) -> list[Generation]:
        """The batch's answers from the server, `concurrency` at a time; request i of batch b is seeded from
        (seed, b) and i, so a resumed pass asks the same."""
        indices = plan.batches[batch]

        def one(position: int) -> Generation:
            request_seed = None if seed is None else (batch_seed(seed, batch) + position) % (1 << 31)
            ids, reason = self.generate(plan.prompt_ids[indices[position]], plan.config, request_seed)
            answer = cut_at_stop(tokenizer, ids, plan.stops)
            if reason == "stop" and answer.stopped != STOPPED_AT_EOS:  # ended at EOS without returning it
                answer = Generation(answer.ids, answer.text, STOPPED_AT_EOS, plan.stops[0])
            return answer

        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(indices))) as pool:
            return list(pool.map(one, range(len(indices))))

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def generate(self, prompt: Sequence[int], config: Any, seed: int | None) -> tuple[list[int], str]:
        """The served model's answer to one prompt: its new token ids and why it stopped (`stop` or `length`)."""
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "prompt": [int(t) for t in prompt],
            "max_tokens": int(config.max_new_tokens),
            "temperature": float(config.temperature) if config.do_sample else 0.0,
            "top_p": float(config.top_p) if config.do_sample else 1.0,
            "top_k": int(config.top_k) if config.do_sample and config.top_k else -1,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if seed is not None:
            body["seed"] = seed
        choice = (self._call("POST", f"{self.url}/completions", body).get("choices") or [{}])[0]
        if choice.get("token_ids") is None:
            raise KdError(
                f"{FIELD}: {public_url(self.url)} returned no token ids for a generation; kd needs vLLM's "
                "return_token_ids (vLLM 0.10 and later)."
            )
        return [int(t) for t in choice["token_ids"]], str(choice.get("finish_reason"))

    # --- transport

    def _call(
        self, method: str, url: str, body: dict[str, Any] | None = None, *, missing_ok: bool = False, top_k: int = 0
    ) -> dict[str, Any]:
        """One request, retried on what a busy or restarting server answers; its JSON, or {} for a 404 with
        `missing_ok` (an endpoint some servers lack)."""
        import requests

        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = self._session().request(method, url, json=body, timeout=self.cfg.timeout)
            except (requests.Timeout, requests.ConnectionError) as err:
                reason = f"{type(err).__name__}: {_first_line(err)}"
                response = None
            if response is not None:
                if response.status_code < 400:
                    return _json(response, url)
                if response.status_code == 404 and missing_ok:
                    return {}
                if response.status_code not in _RETRY_STATUS:
                    raise self._refused(response, url, top_k)
                reason = f"HTTP {response.status_code}"
                wait = _retry_after(response)
            if attempt >= self.cfg.retries:
                raise ServerGone(
                    f"{FIELD}: {public_url(self.url)} did not answer ({self._scrub(reason)}) after "
                    f"{self.cfg.retries} retries"
                )
            self._sleep(wait if wait is not None else _backoff(attempt))
            attempt += 1

    def _refused(self, response: requests.Response, url: str, top_k: int) -> KdError:
        message = self._scrub(_error_message(response))
        if response.status_code in (401, 403):
            fix = "set teacher.server.api_key_env to the variable holding its key" if not self._secret else "check it"
            return KdError(f"{FIELD}: {public_url(self.url)} refused the key ({message}); {fix}.")
        if response.status_code == 404 and "model" in message.lower():
            return KdError(f"{FIELD}.model: {message}")
        limit = _LIMIT.search(message)
        if top_k and "logprob" in message.lower() and limit:
            return KdError(
                f"{FIELD}.top_k: {top_k} is above what the server allows ({limit.group(1)}); start vLLM with "
                f"--max-logprobs {top_k}, or set teacher.server.top_k to {limit.group(1)} or less."
            )
        return KdError(f"{FIELD}: {public_url(url)} answered {response.status_code}: {message}")

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _json(response: requests.Response, url: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:  # requests' JSONDecodeError is a ValueError
        raise KdError(f"{FIELD}: {public_url(url)} answered with something that is not JSON.") from None
    if not isinstance(data, dict):
        raise KdError(f"{FIELD}: {public_url(url)} answered with JSON that is not an object.")
    return data


def _error_message(response: requests.Response) -> str:
    try:
        data = response.json()
        error = data.get("error", data) if isinstance(data, dict) else data
        text = error.get("message", "") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        text = response.text
    return (str(text).strip().splitlines() or [f"HTTP {response.status_code}"])[0][:300]


def _retry_after(response: requests.Response) -> float | None:
    try:
        return min(_MAX_WAIT_S, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _backoff(attempt: int) -> float:
    return min(_MAX_WAIT_S, 2.0**attempt) * random.uniform(0.8, 1.2)


def _positions(reply: dict[str, Any], ids: list[int], k: int, url: str) -> list[Position]:
    """`prompt_logprobs` of one completion as Positions: entry t + 1 holds token t + 1 and the K best after t."""
    choices = reply.get("choices") or [{}]
    entries = choices[0].get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(ids):
        raise KdError(
            f"{FIELD}: {public_url(url)} returned no prompt_logprobs for a prompt of {len(ids)} tokens; kd needs "
            "vLLM's prompt_logprobs (or a server that answers them the same way)."
        )
    out: list[Position] = []
    for t in range(1, len(ids)):
        entry = entries[t] or {}
        scored = sorted(((int(token), v) for token, v in entry.items()), key=lambda item: item[1].get("rank", math.inf))
        topk = [(token, float(v["logprob"])) for token, v in scored if v.get("rank", math.inf) <= k][:k]
        label = entry.get(str(ids[t]))
        if len(topk) != k or label is None:
            raise KdError(
                f"{FIELD}: {public_url(url)} returned {len(topk)} of the {k} log-probs asked for at a position"
                + ("" if label is not None else ", without the prompt token's own")
                + "; is the server vLLM with prompt_logprobs?"
            )
        out.append(Position(topk, float(label["logprob"])))
    return out


def _logsumexp(position: Position) -> float:
    values = [lp for _, lp in position.topk]
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _tail_mass(position: Position) -> float:
    """1 − Σ_topK p, from the top-K's logsumexp without cancellation (0 where rounding leaves nothing)."""
    return max(0.0, -math.expm1(min(0.0, _logsumexp(position))))
