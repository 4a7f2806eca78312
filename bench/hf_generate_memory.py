"""Peak memory of HF generation: step-by-step sampled log-probabilities against keeping every step's logits.

Generates ``--rows`` x ``--tokens`` tokens (default 4 x 1024, EOS disabled so every row runs to the
end) with SmolLM2-135M on the CPU, in a fresh process per measurement, two ways:

* ``stepwise``: ``HFGenerator._generate`` as shipped, whose logits processor keeps one step's
  ``[B, V]`` log-softmax and each sampled token's log-probability (``engines.hf.SampledLogprobs``);
* ``full``: the previous implementation, ``generate(output_logits=True)``, then the stacked
  ``[B, steps, V]`` fp32 logits and their log-softmax (4 x 1024 x 49,152 x 4 B = 0.8 GB each).

Memory is the peak RSS during generation (sampled every 5 ms) above the RSS before it, the model
already loaded. Runs alternate full, stepwise, stepwise, full (ABBA). Last line: ``ratio = X``
(stepwise / full, target <= 0.35).

    python bench/hf_generate_memory.py [--tokens 1024 --rows 4 --model builtin:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("T3S_CACHE", str(ROOT / ".cache" / "t3s_ray"))

from bench.abba import abba  # noqa: E402


def full_logits_generate(gen, prompts: list[str], max_tokens: int, seed: int):
    """The previous HF path: every step's full-vocabulary logits, stacked, then log-softmax."""
    import torch

    enc = gen.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(gen.device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = gen.model.generate(**enc, max_new_tokens=max_tokens, do_sample=True, temperature=gen.temperature,
                                 top_p=gen.top_p, top_k=0, return_dict_in_generate=True, output_logits=True,
                                 pad_token_id=gen.tokenizer.pad_token_id, eos_token_id=sorted(gen.eos_ids))
    sequences = out.sequences[:, enc["input_ids"].shape[1]:]
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    return [logprobs[b].gather(-1, sequences[b][:, None])[:, 0].tolist() for b in range(sequences.shape[0])]


def child(mode: str, model: str, rows: int, tokens: int) -> None:
    import psutil
    import torch

    from t3s_ray.engines.hf import HFGenerator

    torch.set_num_threads(2)
    gen = HFGenerator(model, temperature=0.8, top_p=0.95, topk_logprobs=0, dtype="float32", device="cpu")
    gen.eos_ids = {len(gen.tokenizer) + 1000}  # never sampled: every row generates all its tokens
    prompts = [f"Write a long story about the number {i}." for i in range(rows)]
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    running = [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started = time.perf_counter()
    if mode == "stepwise":
        out = gen._generate(prompts, tokens, seed=0)
        generated = sum(len(o["token_ids"]) for o in out)
    else:
        generated = sum(len(lp) for lp in full_logits_generate(gen, prompts, tokens, seed=0))
    seconds = time.perf_counter() - started
    running[0] = False
    watcher.join()
    print(json.dumps({"mode": mode, "peak_above_gb": (peak[0] - before) / 1e9, "tokens": generated,
                      "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--child", choices=["stepwise", "full"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.rows, args.tokens)
        return
    results: dict[str, list[float]] = {"full": [], "stepwise": []}
    for mode in abba("full", "stepwise", 2):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model, "--rows",
                               str(args.rows), "--tokens", str(args.tokens)], capture_output=True, text=True,
                              check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[mode].append(r["peak_above_gb"])
        print(f"{mode:8s}: {r['tokens']} tokens in {r['seconds']:.1f} s, peak {r['peak_above_gb']:.3f} GB above "
              f"the loaded model", flush=True)
    full, stepwise = (sum(results[m]) / 2 for m in ("full", "stepwise"))
    print(f"mean peak above the model: full logits {full:.3f} GB, stepwise {stepwise:.3f} GB")
    print(f"ratio = {stepwise / full:.3f}")


if __name__ == "__main__":
    main()
