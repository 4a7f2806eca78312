"""T3S training step time versus plain SFT on the same model, data and batches (target ratio <= 1.03).

Both runs train through the real stage (`run_train`: Ray Train workers, the ConfidenceStore actors)
on the builtin arithmetic problems' worked solutions, with the same seed, so every step sees the
same batch. The step time is measured inside the workers around the whole step (mask lookup,
forward, backward, optimizer, pushes to the store); the median over the steps after warm-up is
compared (all steps; the steps of `t3s_online` that start with a refresh, where the workers wait for
the store by design, are also shown apart). `t3s_online` refreshes its masks every `--refresh`
steps. `--rounds 2` runs sft, t3s, t3s, sft and pools the steps (noisy machines).

    python bench/step_overhead.py                      # builtin tiny model and SmolLM2-135M
    python bench/step_overhead.py --models tiny-llama --steps 30
    python bench/step_overhead.py --models smollm2-135m-instruct --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.abba import abba  # noqa: E402
from t3s_ray import config  # noqa: E402
from t3s_ray.cluster import ray_session  # noqa: E402
from t3s_ray.traces import run_traces  # noqa: E402
from t3s_ray.train import run_train  # noqa: E402


def run(root: Path, name: str, model: str, protocol: str, steps: int, refresh: int, workers: int, batch: int):
    data = {
        "name": name, "output_dir": str(root),
        "teacher": {"ref": f"builtin:{model}"}, "student": {"ref": f"builtin:{model}", "dtype": "float32"},
        "data": {"source": "builtin:arith", "builtin_size": max(64, batch * 4), "max_seq_len": 512},
        "traces": {"source": "dataset", "response_field": "solution", "keep": "all", "verifier": "none",
                   "max_tokens": 64, "max_model_len": 1024},
        "train": {"num_workers": workers, "batch_size": batch, "micro_batch_size": batch // workers,
                  "max_steps": steps, "lr": 1e-5, "checkpoint_every": steps, "keep_last": 1},
        "selection": {"protocol": protocol, "refresh_interval": refresh},
    }
    cfg = config.from_dict(data)
    run_traces(cfg)
    run_train(cfg)
    lines = (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-llama,smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--refresh", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the pair this many times in ABBA order (sft, t3s, t3s, sft, ...) and pool the "
                         "steps, so that a slow spell of a noisy machine does not land on one protocol only")
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp, ray_session(config.RayConfig()):
        for model in args.models.split(","):
            times: dict[str, list[float]] = {"sft": [], "t3s_online": []}
            refresh_times: list[float] = []
            tokens = []
            for i, protocol in enumerate(abba("sft", "t3s_online", args.rounds)):
                m = run(Path(tmp), f"{model}-{protocol}-{i}", model, protocol, args.steps, args.refresh, args.workers,
                        args.batch)
                for r in m[args.warmup:]:
                    times[protocol].append(r["step_time_s"])
                    if protocol == "t3s_online" and (r["step"] - 1) % args.refresh == 0:
                        refresh_times.append(r["step_time_s"])  # waits for the store by design: shown apart too
                tokens.append(statistics.mean(r["tokens"] for r in m))
            medians = {p: statistics.median(v) for p, v in times.items()}
            for p, v in times.items():
                q = statistics.quantiles(v, n=4)
                print(f"{model:24s} {p:11s} median step {medians[p] * 1000:8.1f} ms (quartiles {q[0] * 1000:.0f}-"
                      f"{q[2] * 1000:.0f}) over {len(v)} steps ({statistics.mean(tokens):.0f} tokens/step, "
                      f"{args.workers} workers)", flush=True)
            if refresh_times:
                print(f"{model:24s} t3s_online refresh steps (every {args.refresh}): median "
                      f"{statistics.median(refresh_times) * 1000:.1f} ms over {len(refresh_times)}", flush=True)
            ratio = medians["t3s_online"] / medians["sft"]
            verdict = "PASS" if ratio <= 1.03 else "FAIL"
            ok &= ratio <= 1.03
            print(f"{model:24s} ratio t3s_online / sft = {ratio:.3f} (target <= 1.03): {verdict}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
