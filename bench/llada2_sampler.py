"""LLaDA2's block sampler on CPU: time per generated token with and without the prefix key/value cache
(``t3s.diffusion.block_diffusion_generate``), on ``builtin:tiny-llada2``, rounds interleaved ABBA.

Both sides decode the same prompts to the same tokens (asserted). The random tiny model passes no
threshold, so every step commits one token (the slowest regime: 32 steps a block); ``--peaked`` scales
its lm head so that several tokens pass per step, as in a trained model. Prints the median seconds per
generated token of each side and their ratio (no cache / cache).

    python bench/llada2_sampler.py
    python bench/llada2_sampler.py --batch 4 --max-tokens 128 --rounds 4 --threads 1
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

from bench.abba import abba  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--peaked", action="store_true", help="scale the lm head: several commits per step")
    args = ap.parse_args()

    import torch

    from t3s_ray import models
    from t3s_ray.t3s.diffusion import block_diffusion_generate

    if args.threads:
        torch.set_num_threads(args.threads)
    model = models.load_model("builtin:tiny-llada2", dtype="float32").eval()
    tok = models.load_tokenizer("builtin:tiny-llada2")
    if args.peaked:
        with torch.no_grad():
            model.lm_head.weight.mul_(30)
    texts = ["What is 12 + 30? Let me think step by step.", "A farmer has 3 apples and buys 4 more.",
             "Compute 17 * 3, then divide by 3.", "The quick brown fox jumps over the lazy dog."]
    prompts = [tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"] for i in range(args.batch)]

    def run(cache: bool):
        stats: dict = {}
        start = time.perf_counter()
        out = block_diffusion_generate(model, prompts, args.max_tokens, mask_id=tok.mask_token_id, eos_ids=set(),
                                       block_length=args.block, threshold=args.threshold, use_cache=cache, stats=stats)
        seconds = time.perf_counter() - start
        return seconds / sum(len(o["token_ids"]) for o in out), stats, [o["token_ids"] for o in out]

    run(True)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list] = {}
    stats: dict[bool, dict] = {}
    for side in abba(True, False, args.rounds):
        per_token, stats[side], tokens[side] = run(side)
        times[side].append(per_token)
    assert tokens[True] == tokens[False], "the cache changed the tokens"
    cached, plain = statistics.median(times[True]), statistics.median(times[False])
    print(f"tiny-llada2, batch {args.batch}, {args.max_tokens} tokens, blocks of {args.block}, threshold "
          f"{args.threshold}{', peaked' if args.peaked else ''}, torch threads {torch.get_num_threads()}")
    for side, label in ((True, "prefix cache"), (False, "no cache")):
        s = stats[side]
        print(f"  {label:12s} {1e3 * statistics.median(times[side]):7.2f} ms/token  "
              f"({s['forwards']} forwards, {s['tokens_run']} tokens run)  rounds: "
              + " ".join(f"{1e3 * t:.2f}" for t in times[side]))
    print(f"  no cache / cache: {plain / cached:.2f}x")


if __name__ == "__main__":
    main()
