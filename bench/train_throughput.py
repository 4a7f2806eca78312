"""Training throughput: t3s_ray's SFT step against a plain Hugging Face step, and what token-budget
micro-batches save on long-tailed traces (targets: ratio <= 1.05; the README's "Benchmarks").

1. **Step time.** The same model, batch and optimizer (AdamW, fused) on both sides:
   * ``t3s_ray``: the real worker (``worker.train_standalone``: an SFT run, its in-process store,
     metrics), the step time measured inside it around the whole step (masks, forward, backward,
     optimizer, store pushes), as in a run;
   * ``hf``: ``model(input_ids, attention_mask, labels=...)``, ``loss.backward()``, ``optimizer.step()``.
   Rounds alternate ABBA (t3s_ray, hf, hf, t3s_ray, ...) and the medians over the pooled steps after
   warm-up are compared. The batch: ``--batch`` rows of ``--seq-len`` tokens, the last
   ``--response`` of each being the response (the prompt is context, not a target: both sides).
2. **Padding.** On a long-tailed length distribution like s1K's R1 traces (log-normal, median 4k
   tokens, 512-16k), the fraction of computed tokens that are padding for fixed micro-batches
   (sorted or not) against ``train.max_tokens_per_micro_batch`` and padding-free packing, at the
   paper's scale (64 traces a step over 8 ranks). No model needed: it counts tokens.
3. **Tokens/s by batching mode**, measured on the model with the same kind of distribution scaled
   to the CPU (median 96 tokens, 24-384): fixed micro-batches, a token budget, and padding-free
   (on the CPU through transformers' packed-sequence mask with sdpa; flash attention on GPUs).

    python bench/train_throughput.py                                  # SmolLM2-135M, 4 x 256 tokens
    python bench/train_throughput.py --model builtin:tiny-llama --rounds 2 --steps 4   # a quick look

The last line is ``ratio t3s_ray/hf = X``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.abba import abba  # noqa: E402
from t3s_ray import config  # noqa: E402
from t3s_ray.batching import build_micro_batch, micro_batches, token_budget_micro_batches  # noqa: E402
from t3s_ray.distributed import Ranks  # noqa: E402
from t3s_ray.models import load_model, resolve  # noqa: E402
from t3s_ray.worker import SelectionPlan, TrainJob, train_standalone  # noqa: E402

TARGET = 1.05


def examples_of(lengths: list[int], response_frac: float, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        target = np.zeros(n, dtype=bool)
        target[n - max(1, int(round(n * response_frac))):] = True
        out.append({"input_ids": rng.integers(10, vocab, n), "target_mask": target})
    return out


def t3s_steps(model: str, examples: list[dict], steps: int, batch: int, root: Path, **train) -> list[dict]:
    """One SFT run of the real worker; its per-step metrics."""
    data = {"name": "bench", "output_dir": str(root), "student": {"ref": model, "dtype": "float32"},
            "train": {"batch_size": batch, "micro_batch_size": batch, "max_steps": steps, "lr": 1e-5,
                      "checkpoint_every": 10_000, "keep_last": 1, **train},
            "selection": {"protocol": "sft"}}
    cfg = config.from_dict(data)
    job = TrainJob(cfg=cfg.to_dict(), out_dir=str(root / "train"), model_ref=model, model_kind="ar", scoring_ref=model,
                   plan=SelectionPlan.for_protocol(cfg), anchor_model=None, max_steps=steps, store_name="bench")
    train_standalone(job, examples, Ranks())
    return [json.loads(line) for line in (root / "train" / "metrics.jsonl").read_text().splitlines()]


def hf_steps(model_ref: str, examples: list[dict], steps: int, batch: int) -> list[float]:
    """Plain Hugging Face SFT steps on the same batches (targets = the response tokens)."""
    from t3s_ray.batching import global_batch

    model = load_model(model_ref, dtype="float32").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        b = build_micro_batch(examples, global_batch(step, len(examples), batch, 0), 0, torch.device("cpu"))
        labels = torch.where(b.target_mask, b.input_ids, torch.full_like(b.input_ids, -100))
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the worker's default grad_clip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def padding_at_paper_scale(seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    world, per_step, steps = 8, 64, 50
    lengths = np.clip(rng.lognormal(np.log(4096), 0.8, size=per_step * steps), 512, 16384).astype(int)
    modes = {"fixed 2 rows, data order": None, "fixed 2 rows, sorted": None,
             "budget 32k tokens, padded": (32768, False), "budget 32k tokens, padding-free": (32768, True)}
    print(f"padding at the paper's scale: {per_step} traces a step over {world} ranks, lengths log-normal "
          f"(median {int(np.median(lengths))}, p90 {int(np.percentile(lengths, 90))}, max {lengths.max()})")
    for mode, budget in modes.items():
        computed = real = n_micro = 0
        for s in range(steps):
            step_lengths = lengths[s * per_step:(s + 1) * per_step]
            for r in range(world):
                share = list(step_lengths[r::world])
                if budget:
                    parts = token_budget_micro_batches(share, budget[0], budget[1])
                else:
                    order = sorted(range(len(share)), key=lambda i: -share[i]) if "sorted" in mode else range(len(share))
                    parts = micro_batches(list(order), 2)
                for p in parts:
                    ls = [share[i] for i in p]
                    computed += sum(ls) if budget and budget[1] else len(ls) * max(ls)
                    real += sum(ls)
                    n_micro += 1
        print(f"  {mode:34s} padding {100 * (1 - real / computed):5.1f} %   micro-batches/rank/step "
              f"{n_micro / steps / world:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--response", type=int, default=192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds: t3s_ray, hf, hf, t3s_ray, ...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-modes", action="store_true", help="only the step-time ratio")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = args.model
    vocab = load_model(model, dtype="float32").config.vocab_size
    print(f"model {model} ({resolve(model)}), {args.batch} x {args.seq_len} tokens ({args.response} response), "
          f"{args.steps} steps a round ({args.warmup} warm-up), {args.rounds} rounds ABBA, {args.threads} threads",
          flush=True)

    if not args.skip_modes:
        padding_at_paper_scale()
        rng = np.random.default_rng(1)
        lengths = list(np.clip(rng.lognormal(np.log(96), 0.8, size=64), 24, 384).astype(int))
        ragged = examples_of(lengths, 0.75, vocab, seed=2)
        budget = args.batch * int(np.median(lengths)) * 2
        modes = {"fixed micro-batches": {"micro_batch_size": args.batch},
                 f"budget {budget} tokens": {"micro_batch_size": 1, "max_tokens_per_micro_batch": budget},
                 f"budget {budget}, padding-free": {"micro_batch_size": 1, "max_tokens_per_micro_batch": budget,
                                                    "padding_free": True}}
        print(f"tokens/s by batching mode on the model: {len(lengths)} traces, lengths log-normal (median "
              f"{int(np.median(lengths))}, max {max(lengths)}), batch {args.batch * 4} a step", flush=True)
        for mode, train in modes.items():
            with tempfile.TemporaryDirectory() as tmp:
                m = t3s_steps(model, ragged, args.steps, args.batch * 4, Path(tmp), **train)[args.warmup:]
            tok_s = sum(r["tokens"] for r in m) / sum(r["step_time_s"] for r in m)
            print(f"  {mode:34s} {tok_s:8.0f} tokens/s   padding {100 * statistics.mean(r['padding_frac'] for r in m):5.1f} %"
                  f"   micro-batches/step {statistics.mean(r['micro_batches'] for r in m):.1f}", flush=True)

    examples = examples_of([args.seq_len] * (args.batch * 4), args.response / args.seq_len, vocab, seed=0)
    times: dict[str, list[float]] = {"t3s_ray": [], "hf": []}
    for side in abba("t3s_ray", "hf", args.rounds):
        if side == "t3s_ray":
            with tempfile.TemporaryDirectory() as tmp:
                got = [r["step_time_s"] for r in t3s_steps(model, examples, args.steps, args.batch, Path(tmp))]
        else:
            got = hf_steps(model, examples, args.steps, args.batch)
        times[side] += got[args.warmup:]
        print(f"  round {side:8s} median step {1000 * statistics.median(got[args.warmup:]):8.1f} ms", flush=True)
    tokens = args.batch * args.seq_len
    for side, v in times.items():
        q = statistics.quantiles(v, n=4)
        print(f"{side:8s} median step {1000 * statistics.median(v):8.1f} ms (quartiles {1000 * q[0]:.0f}-"
              f"{1000 * q[2]:.0f}) over {len(v)} steps, {tokens / statistics.median(v):.0f} tokens/s", flush=True)
    ratio = statistics.median(times["t3s_ray"]) / statistics.median(times["hf"])
    print(f"target <= {TARGET}: {'PASS' if ratio <= TARGET else 'FAIL'}")
    print(f"ratio t3s_ray/hf = {ratio:.3f}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
