"""Confidence-store throughput: a 1M-token record + refresh + mask round trip, and bytes per token.

Target (the README's "Benchmarks"): <= 8 bytes per stored token, and a 1M-token record+mask round trip under
1 s per shard.

    python bench/store_throughput.py                      # 4000 examples x 250 tokens, both paths
    python bench/store_throughput.py --examples 8000 --repeats 5

One round trip = every example recorded once, one push per batch of 64 examples (the way training
workers push), then a refresh, then the masks of every example fetched.  It is measured twice:
on the plain :class:`ConfidenceStore` in this process, and through one Ray actor shard (a local Ray
with 2 CPUs is started unless one is already initialised).  Each variant runs ``--repeats`` times
(new step numbers each time) and the median is reported; the rule is ``delta`` (the default) and
``top_frac`` with a ``max_anchor_frac`` cap (the per-sequence path).

The in-process store runs torch (inside the selection rules) with ``--threads`` threads, 1 by
default: that is what a store actor gets (Ray sets ``OMP_NUM_THREADS=1`` for a ``num_cpus=0``
actor), and on a busy 2-core machine multi-threaded torch ops slow down several-fold.
Pass ``--threads 0`` to keep torch's default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t3s_ray.store import ConfidenceStore, create_store  # noqa: E402

TARGET_SECONDS = 1.0
TARGET_BYTES = 8.0
RULES = {"delta": {"rule": "delta", "tau": 0.0},
         "top_frac+cap": {"rule": "top_frac", "top_frac": 0.2, "max_anchor_frac": 0.15}}


def make_data(num_examples: int, length: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.arange(num_examples, dtype=np.int64)
    lengths = np.full(num_examples, length, dtype=np.int64)
    base = [(-rng.exponential(1.0, length)).astype(np.float32) for _ in range(num_examples)]
    batches = [ids[i:i + batch] for i in range(0, num_examples, batch)]
    # Training pushes fp32 (or fp16) confidences of a batch; two visit sets so that steps alternate.
    visits = [[[(b + rng.normal(0, 0.3, length)).astype(np.float32) for b in (base[j] for j in chunk)]
               for chunk in batches] for _ in range(2)]
    return ids, lengths, base, batches, visits


def round_trip_local(store: ConfidenceStore, ids, batches, visits, step: int, rule: dict) -> dict:
    t0 = time.perf_counter()
    for chunk, values in zip(batches, visits):
        store.record(step, chunk, values)
    t1 = time.perf_counter()
    store.refresh(step, **rule)
    t2 = time.perf_counter()
    version, masks = store.get_masks(ids)
    t3 = time.perf_counter()
    assert version == store.version and len(masks) == len(ids)
    return {"record": t1 - t0, "refresh": t2 - t1, "get_masks": t3 - t2, "total": t3 - t0}


def round_trip_ray(client, ids, batches, visits, step: int, rule: dict) -> dict:
    import ray

    t0 = time.perf_counter()
    refs = []
    for chunk, values in zip(batches, visits):
        refs.extend(client.record(step, chunk, values))
    ray.get(refs)
    t1 = time.perf_counter()
    client.refresh(step, **rule)
    t2 = time.perf_counter()
    version, masks = client.get_masks(ids)
    t3 = time.perf_counter()
    assert len(masks) == len(ids)
    return {"record": t1 - t0, "refresh": t2 - t1, "get_masks": t3 - t2, "total": t3 - t0}


def median_times(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fmt(times: dict) -> str:
    return "  ".join(f"{k} {v * 1000:7.1f} ms" for k, v in times.items())


def time_rules(where: str, round_trip, store, ids, batches, visits, step: int, repeats: int, verdicts: list) -> int:
    """Each rule's round trip on ``store``, ``repeats`` times (the steps go on from ``step``, the visit
    sets alternating): print the medians and add a verdict per rule. Returns the last step."""
    for label, rule in RULES.items():
        runs = []
        for _ in range(repeats):
            step += 1
            runs.append(round_trip(store, ids, batches, visits[step % 2], step, rule))
        times = median_times(runs)
        print(f"{where} [{label:12s}] {fmt(times)}")
        verdicts.append((f"{where} round trip [{label}] {times['total']:.3f} s < {TARGET_SECONDS} s",
                         times["total"] < TARGET_SECONDS))
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--length", type=int, default=250)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (0: default)")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    ids, lengths, base, batches, visits = make_data(args.examples, args.length, args.batch)
    num_tokens = int(lengths.sum())
    print(f"store: {args.examples} examples x {args.length} tokens = {num_tokens:,} tokens, "
          f"{len(batches)} pushes of {args.batch} examples, median of {args.repeats} runs, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    verdicts = []

    store = ConfidenceStore()
    t = time.perf_counter()
    store.register(ids, lengths)
    store.set_base(ids, base)
    print(f"in-process register + set_base: {(time.perf_counter() - t) * 1000:.1f} ms")
    step = time_rules("in-process", round_trip_local, store, ids, batches, visits, 0, args.repeats, verdicts)
    stats = store.stats()
    print(f"anchor_frac {stats['anchor_frac']:.3f}  bytes_per_token {stats['bytes_per_token']:.3f}  "
          f"bytes_per_token_total {stats['bytes_per_token_total']:.3f}")
    verdicts.append((f"bytes per stored token {stats['bytes_per_token']:.3f} <= {TARGET_BYTES}",
                     stats["bytes_per_token"] <= TARGET_BYTES))
    verdicts.append((f"bytes per stored token incl. per-example arrays {stats['bytes_per_token_total']:.3f} "
                     f"<= {TARGET_BYTES}", stats["bytes_per_token_total"] <= TARGET_BYTES))

    if not args.skip_ray:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        client = create_store(f"bench-store-{uuid.uuid4().hex[:8]}", 1)
        try:
            t = time.perf_counter()
            client.register(ids, lengths)
            client.set_base(ids, base)
            print(f"ray (1 actor shard) register + set_base: {(time.perf_counter() - t) * 1000:.1f} ms")
            time_rules("ray 1 shard", round_trip_ray, client, ids, batches, visits, step, args.repeats, verdicts)
            # The training path: prefetch one batch's masks (64 examples).
            t = time.perf_counter()
            futures = [client.get_masks_async(chunk) for chunk in batches]
            for future in futures:
                future.result()
            per_batch = (time.perf_counter() - t) / len(batches)
            print(f"ray 1 shard get_masks of one batch of {args.batch}: {per_batch * 1000:.2f} ms (pipelined)")
            ray_stats = client.stats()
            verdicts.append((f"ray shard bytes per stored token {ray_stats['bytes_per_token']:.3f} <= {TARGET_BYTES}",
                             ray_stats["bytes_per_token"] <= TARGET_BYTES))
        finally:
            client.kill()
            if started:
                ray.shutdown()

    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
