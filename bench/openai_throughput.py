"""The ``openai`` traces backend against a real ``vllm serve`` versus the vLLM-actor backend, same prompts.

Both run the traces pipeline's generation (``t3s_ray.generate.run_requests``) on the same requests
(SmolLM2-135M by default, arithmetic prompts, ``--samples`` per prompt, seeded): once with vLLM engine
actors in Ray Data (engine start included, as a trace run pays it), once with the OpenAI-compatible
backend sending the same samples to ``vllm serve`` started by this script (its start-up is timed
apart: a team's server is usually already up). One after the other, never both engines at once
(2 cores). Last line: ``ratio openai/actors = X`` (tokens/s, the server's start excluded).

    python bench/openai_throughput.py [--prompts 32 --samples 4 --max-tokens 64 --concurrency 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # servers.launch_vllm_server
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from servers import launch_vllm_server  # noqa: E402  (tests/servers.py)

from t3s_ray.cluster import ray_session  # noqa: E402
from t3s_ray.config import EngineConfig, ModelConfig, RayConfig, SamplingConfig  # noqa: E402
from t3s_ray.data import arith_rows  # noqa: E402
from t3s_ray.generate import GenerationSpec, prepare_requests, run_requests  # noqa: E402
from t3s_ray.models import load_tokenizer, resolve  # noqa: E402


def timed(requests, spec) -> tuple[int, float, int]:
    start = time.perf_counter()
    tokens = errors = 0
    for sample in run_requests(requests, spec):
        tokens += len(sample["token_ids"]) or len(sample.get("logprobs") or [])
        errors += bool(sample.get("error"))
    return tokens, time.perf_counter() - start, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server")
    args = ap.parse_args()
    rows = arith_rows("train", args.prompts)
    model = ModelConfig(ref=args.model)
    sampling = SamplingConfig(samples=args.samples, max_tokens=args.max_tokens, temperature=0.6, top_p=0.95)
    engine = EngineConfig(backend="vllm", batch_size=args.batch_size, max_model_len=1024)
    actors = GenerationSpec(model, engine, sampling)
    requests, errors = prepare_requests(rows, actors, load_tokenizer(args.model))
    assert not errors, errors
    print(f"{args.model}: {len(requests)} samples of <= {args.max_tokens} tokens")
    with ray_session(RayConfig(num_cpus=os.cpu_count())):
        tokens, secs, errs = timed(requests, actors)
        print(f"  vLLM engine actors (Ray Data, engine start included): {tokens} tokens in {secs:.1f} s = "
              f"{tokens / secs:.1f} tok/s, {errs} errors")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            server = launch_vllm_server(resolve(args.model), port, Path(tmp) / "serve.log", served_name="teacher")
            print(f"  vllm serve up in {time.perf_counter() - started:.1f} s")
            try:
                endpoint = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "teacher", "qps": 0.0,
                            "max_concurrency": args.concurrency, "max_retries": 2, "timeout_s": 300.0,
                            "backoff_s": 0.5, "request_logprobs": True, "send_seed": True}
                spec = GenerationSpec(model, dataclasses.replace(engine, backend="openai"), sampling, endpoint=endpoint)
                oa_requests, _ = prepare_requests(rows, spec, None)
                oa_tokens, oa_secs, oa_errs = timed(oa_requests, spec)
            finally:
                os.killpg(server.pid, signal.SIGKILL)
    print(f"  openai backend -> vllm serve ({args.concurrency} in flight): {oa_tokens} tokens in {oa_secs:.1f} s = "
          f"{oa_tokens / oa_secs:.1f} tok/s, {oa_errs} errors")
    print(f"ratio openai/actors = {(oa_tokens / oa_secs) / (tokens / secs):.3f}")


if __name__ == "__main__":
    main()
