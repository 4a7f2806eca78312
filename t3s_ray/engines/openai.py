"""The ``openai`` engine: the teacher behind an OpenAI-compatible server.

``vllm serve``, SGLang, DeepSeek's API, or any server that speaks ``POST {base_url}/chat/completions``.
A Ray Data actor pool (``traces.engine.concurrency`` actors) sends the requests of its batches from a few
threads each, so that ``endpoint.max_concurrency`` requests are in flight over the pool and at most
``endpoint.qps`` start per second. The rest of the traces stage (verification, keeping, shards,
resume) is the engine backends', unchanged.

Per request (one per sample, so each sample has its own seed and a server without ``n`` works):
``model``, ``messages`` (the prompt, after ``data.system_prompt``), ``temperature``, ``top_p``,
``max_tokens``, ``seed`` (``endpoint.send_seed``), ``logprobs`` / ``top_logprobs``
(``endpoint.request_logprobs``; DeepSeek's reasoner API refuses them), and ``chat_template_kwargs``
(``traces.chat_template_kwargs``, only when set: vLLM and SGLang pass them to the template).

The response becomes a sample: ``response`` is the message content, with a DeepSeek-R1-style
``reasoning_content`` (or vLLM's ``reasoning``) joined in front as
``<think>\\n{reasoning}\\n</think>\\n\\n{content}``, the layout Qwen3's chat template renders and
splits again when the trace is tokenised for training; ``logprobs`` are the sampled tokens'
log-probabilities when the server returns them (``token_ids`` stay empty: the API returns text);
``finish_reason`` is the server's.

Failures: 429, 5xx, timeouts and broken connections are retried ``endpoint.max_retries`` times with
exponential backoff (``Retry-After`` honoured); then the sample fails with a retryable error, so a
rerun of the stage asks again. Any other 4xx fails the sample at once, not retryable, with the
server's message (it goes to ``errors.jsonl``). The API key is read on the driver from the variable
``endpoint.api_key_env`` names (:func:`api_key`) and travels to the actors as a :class:`Secret`, whose
``repr`` hides it.

Evaluation uses the same engine (``eval.endpoint``, or ``traces.endpoint`` for ``t3s run``'s API
teacher): the samples are verified and scored as any engine's; ``token_ids`` stay empty, so generated
tokens are counted by the returned log-probabilities.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .rows import batch_rows, rows_batch

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class Secret(str):
    """A string that does not show itself in ``repr`` (logs, tracebacks, Ray's task descriptions)."""

    def __repr__(self) -> str:
        return "'***'"


def api_key(endpoint, section: str) -> Secret | None:
    """The API key of an endpoint section (``section``: ``traces.endpoint``, ``eval.endpoint``) from
    the variable its ``api_key_env`` names, as a :class:`Secret`; None when it names none. Read on
    the driver, so that an unset variable is one config error before any request is sent."""
    import os

    from ..config import ConfigError

    name = endpoint.api_key_env
    if not name:
        return None
    if not os.environ.get(name):
        raise ConfigError(f"{section}.api_key_env names {name}, which is not set in this environment "
                          f"(export {name}=... before running, or leave api_key_env empty for a server without keys)")
    return Secret(os.environ[name])


def join_reasoning(reasoning: str | None, content: str | None) -> str:
    """A reasoning model's answer as one trace: ``<think>\\n{reasoning}\\n</think>\\n\\n{content}``."""
    content = content or ""
    if not reasoning or not reasoning.strip():
        return content
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"


class RateLimiter:
    """At most ``qps`` request starts per second from this process (0: no limit)."""

    def __init__(self, qps: float):
        self.interval = 1.0 / qps if qps > 0 else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


class OpenAIRequester:
    """A Ray Data actor: the requests of a batch, sent from ``threads`` threads, one per sample."""

    def __init__(self, *, base_url: str, model: str, api_key: str | None, temperature: float, top_p: float,
                 topk_logprobs: int, threads: int, qps: float, max_retries: int, timeout_s: float,
                 backoff_s: float, request_logprobs: bool, send_seed: bool,
                 chat_template_kwargs: dict[str, Any] | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.top_p, self.topk = model, temperature, top_p, topk_logprobs
        self.threads, self.max_retries, self.timeout_s, self.backoff_s = threads, max_retries, timeout_s, backoff_s
        self.request_logprobs, self.send_seed = request_logprobs, send_seed
        self.chat_template_kwargs = chat_template_kwargs
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.limiter = RateLimiter(qps)
        self.local = threading.local()

    def _session(self):
        import requests

        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def body(self, row: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": json.loads(row["messages"]),
                                "temperature": self.temperature, "top_p": self.top_p,
                                "max_tokens": int(row["max_tokens"])}
        if self.send_seed and row.get("seed") is not None:
            body["seed"] = int(row["seed"])
        if self.request_logprobs:
            body["logprobs"] = True
            if self.topk:
                body["top_logprobs"] = int(self.topk)
        if self.chat_template_kwargs:  # vLLM's and SGLang's extension; sent only when configured
            body["chat_template_kwargs"] = self.chat_template_kwargs
        return body

    def request(self, row: dict[str, Any]) -> dict[str, Any]:
        """One sample: the server's answer, or an error (never an exception)."""
        import requests

        body = self.body(row)
        problem, retry_after = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
                retry_after = None
            self.limiter.wait()
            try:
                reply = self._session().post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
            except requests.RequestException as e:  # refused, reset, timed out: the server may come back
                problem = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            if reply.status_code == 200:
                try:
                    return parse_choice(reply.json())
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    return _failed(f"unreadable reply: {type(e).__name__}: {e}", retryable=True)
            problem = f"HTTP {reply.status_code}: {_server_message(reply)}"
            if reply.status_code not in RETRY_STATUS:
                return _failed(problem, retryable=False)
            retry_after = reply.headers.get("Retry-After")
        return _failed(f"{problem} (after {self.max_retries} retries)", retryable=True)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter, or the server's ``Retry-After`` (seconds)."""
        if retry_after:
            try:
                return min(MAX_BACKOFF_S, float(retry_after))
            except ValueError:
                pass
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = batch_rows(batch)
        with ThreadPoolExecutor(max_workers=max(1, min(self.threads, len(rows)))) as pool:
            outs = list(pool.map(self.request, rows))
        return rows_batch([{**row, **out} for row, out in zip(rows, outs)])


def _server_message(reply) -> str:
    try:
        data = reply.json()
        message = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(message, dict):
            message = message.get("message", message)
        return str(message)[:300]
    except ValueError:
        return reply.text[:300]


def _failed(error: str, retryable: bool) -> dict[str, Any]:
    return {"response": "", "token_ids": [], "logprobs": [], "finish_reason": "error", "error": error,
            "retryable": retryable}


def parse_choice(data: dict[str, Any]) -> dict[str, Any]:
    """A chat-completion reply as a sample (first choice)."""
    choice = data["choices"][0]
    message = choice.get("message") or {}
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    content = (choice.get("logprobs") or {}).get("content") or []
    return {"response": join_reasoning(reasoning, message.get("content")), "token_ids": [],
            "logprobs": [float(t["logprob"]) for t in content if t.get("logprob") is not None],
            "finish_reason": choice.get("finish_reason") or "stop", "error": None, "retryable": False}


def openai_generate(ds, *, endpoint: dict[str, Any], api_key: str | None, temperature: float, top_p: float,
                    topk_logprobs: int, concurrency: int, batch_size: int,
                    chat_template_kwargs: dict[str, Any] | None = None):
    """Sample one completion per input row (``messages`` as JSON, ``max_tokens``, ``seed``) from the
    endpoint; lazy, like the engine backends. ``concurrency`` request actors share the endpoint's
    ``max_concurrency`` and ``qps``."""
    import ray.data

    threads = -(-int(endpoint["max_concurrency"]) // concurrency)
    return ds.map_batches(
        OpenAIRequester, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=0.1, batch_format="numpy",
        fn_constructor_kwargs={
            "base_url": endpoint["base_url"], "model": endpoint["model"],
            "api_key": Secret(api_key) if api_key else None, "temperature": temperature, "top_p": top_p,
            "topk_logprobs": topk_logprobs, "threads": threads, "qps": float(endpoint["qps"]) / concurrency,
            "max_retries": int(endpoint["max_retries"]), "timeout_s": float(endpoint["timeout_s"]),
            "backoff_s": float(endpoint["backoff_s"]), "request_logprobs": bool(endpoint["request_logprobs"]),
            "send_seed": bool(endpoint["send_seed"]), "chat_template_kwargs": chat_template_kwargs})


def generate_dataset(ds, spec, actors: int, placement_groups: list):
    """:func:`openai_generate` on ``spec``'s endpoint and sampling settings, ``actors`` request actors."""
    return openai_generate(ds, endpoint=spec.endpoint or {}, api_key=spec.api_key,
                           temperature=spec.sampling.temperature, top_p=spec.sampling.top_p,
                           topk_logprobs=spec.topk_logprobs, concurrency=actors, batch_size=spec.engine.batch_size,
                           chat_template_kwargs=spec.chat_template_kwargs)
