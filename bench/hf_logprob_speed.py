"""Time of HF generation with the sampled tokens' log-probabilities against plain generation.

One process, one model (SmolLM2-135M on the CPU, fp32, ``--threads`` threads), ``--rows`` x
``--tokens`` tokens per generation with EOS disabled, so every run generates the same number of
tokens. Both sides run ``HFGenerator._generate`` with the same seed (so the same tokens are drawn):

* ``plain``: ``logprobs=False``, plain ``generate`` (what evaluation and the probe now run);
* ``logprobs``: ``logprobs=True``, the recorder the traces use (``engines.hf.SampledLogprobs``);
* ``previous`` (``--against previous``): the recorder as it was before, a ``[B, V]`` fp32
  log-softmax kept every step, for comparison.

Sides alternate A B B A ... (``bench/abba.py``) over ``--rounds`` rounds. Printed: each run's wall
and CPU seconds (``time.process_time``: on a loaded machine it counts this process's own work, where
the wall clock also counts the others'; with ``--threads 1`` no OpenMP thread spins), the sums, the
median of the rounds' own ratios (robust to a machine whose load drifts) and last
``ratio = X`` (wall, sum of the logprobs side / sum of plain; target <= 1.1).

    python bench/hf_logprob_speed.py [--rows 4 --tokens 64 --rounds 6 --threads 2 --against logprobs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("T3S_CACHE", str(ROOT / ".cache" / "t3s_ray"))

from bench.abba import abba  # noqa: E402


class PreviousRecorder:
    """The recorder before: step t's whole ``[B, V]`` fp32 log-softmax kept until the next call."""

    def __init__(self):
        self.previous = None
        self.sampled: list = []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.sampled.append(self.previous.gather(-1, input_ids[:, -1:])[:, 0])
            self.previous = None
        self.previous = scores.float().log_softmax(-1)
        return scores


def run(gen, side: str, prompts: list[str], tokens: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one generation."""
    import torch
    from transformers import LogitsProcessorList

    started, cpu = time.perf_counter(), time.process_time()
    if side == "previous":
        enc = gen.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(0)
        recorder = PreviousRecorder()
        with torch.inference_mode():
            gen.model.generate(**enc, max_new_tokens=tokens, do_sample=True, temperature=gen.temperature,
                               top_p=gen.top_p, top_k=0, logits_processor=LogitsProcessorList([recorder]),
                               pad_token_id=gen.tokenizer.pad_token_id, eos_token_id=sorted(gen.eos_ids))
    else:
        gen.record_logprobs = side == "logprobs"
        out = gen._generate(prompts, tokens, seed=0)
        assert all(len(o["token_ids"]) == tokens for o in out)
        assert all(len(o["logprobs"]) == (tokens if side == "logprobs" else 0) for o in out)
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--against", choices=["logprobs", "previous"], default="logprobs")
    args = ap.parse_args()

    import torch

    from t3s_ray.engines.hf import HFGenerator

    torch.set_num_threads(args.threads)
    gen = HFGenerator(args.model, temperature=0.8, top_p=0.95, topk_logprobs=0, dtype="float32", device="cpu")
    gen.eos_ids = {len(gen.tokenizer) + 1000}  # never sampled: every row generates all its tokens
    prompts = [f"Write a long story about the number {i}." for i in range(args.rows)]
    run(gen, "plain", prompts, 4)  # warm-up
    times: dict[str, list[float]] = {"plain": [], args.against: []}
    cpus: dict[str, list[float]] = {"plain": [], args.against: []}
    for side in abba("plain", args.against, args.rounds):
        seconds, cpu = run(gen, side, prompts, args.tokens)
        times[side].append(seconds)
        cpus[side].append(cpu)
        print(f"{side:9s}: {args.rows} x {args.tokens} tokens in {seconds:7.2f} s (CPU {cpu:7.2f} s)", flush=True)
    for name, series in (("CPU", cpus), ("wall", times)):
        plain, other = sum(series["plain"]), sum(series[args.against])
        per_round = [b / a for a, b in zip(series["plain"], series[args.against])]
        print(f"{name}: plain {plain:.1f} s, {args.against} {other:.1f} s, ratio {other / plain:.3f}; median of the "
              f"rounds' ratios {statistics.median(per_round):.3f} (min {min(per_round):.3f}, max {max(per_round):.3f})")
    print(f"ratio = {sum(times[args.against]) / sum(times['plain']):.3f}")


if __name__ == "__main__":
    main()
