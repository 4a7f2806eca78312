"""Per-worker peak host memory of FSDP against DDP, 2 CPU workers each (``train.num_workers: 2``, gloo).

The same short SFT run (setup, the c0 scoring pass, 2 optimizer steps with bf16 compute, a sharded
checkpoint, the export) of a random Llama-shaped model of ``--hidden``/``--layers``/``--vocab``
(default 117M parameters, 14% of them in the embeddings and lm head as in Qwen3-8B's 15%; stored in
bf16 like a hub checkpoint), through ``t3s_ray.train.run_train`` on an embedded Ray, once with
``strategy: ddp`` and once with ``strategy: fsdp``. Each worker reports its peak RSS (``getrusage``)
in every step's metrics (``peak_host_rss_gb``, the maximum over ranks): rank 0 is the worst worker
in both, since it alone reads the full θ0.

What to expect, per worker, from the arithmetic (P parameters, fp32 master weights):
  DDP : params 4P + grads 4P + DDP's gradient buckets 4P + AdamW 8P      = 20P bytes
  FSDP: (params 4P + grads 4P + AdamW 8P) / 2 workers                    =  8P bytes
  plus, under FSDP, the unsharded root (lm head, norm) and one layer at a time; rank 0 of both also
  holds θ0 as read (2P in bf16) while it broadcasts; every worker holds the Python, torch,
  transformers and Ray runtime (~0.25 GB plus Ray's own).

The workers run with ``MALLOC_MMAP_THRESHOLD_=1048576``: glibc otherwise raises its mmap threshold
to 32 MB after the first large free, so the per-layer all-gather and gradient buffers that FSDP frees
every layer stay in the heap and RSS counts memory no tensor holds any more (measured: FSDP's peak
was then no lower than DDP's). ``--default-malloc`` measures without it.

Run: python bench/train_memory.py [--hidden 1024 --layers 8 --vocab 8192 --rounds 1 --default-malloc]
Last line: ``ratio fsdp/ddp = X`` (target <= 0.65). Rounds alternate ABBA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("T3S_CACHE", str(ROOT / ".cache" / "t3s_ray"))

from bench.abba import abba  # noqa: E402


def random_student(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random Llama of the given shape with the tiny tokenizer, saved in bf16; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from t3s_ray.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    config = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         head_dim=64, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(strategy: str, student: Path, root: Path, traces: Path) -> dict:
    import shutil

    from t3s_ray import config
    from t3s_ray.train import run_train

    cfg = config.from_dict({
        "name": f"mem-{strategy}-{time.time_ns()}", "output_dir": str(root),
        "student": {"ref": str(student), "dtype": "bfloat16"},
        "data": {"source": "builtin:arith", "builtin_size": 8, "max_seq_len": 256},
        "traces": {"source": "dataset", "response_field": "solution", "keep": "all_correct"},
        "train": {"num_workers": 2, "strategy": strategy, "batch_size": 2, "micro_batch_size": 1, "max_steps": 2,
                  "checkpoint_every": 2, "keep_last": 1, "lr": 1e-5, "dtype": "bfloat16"},
        "selection": {"protocol": "sft"},
    })
    shutil.copytree(traces, cfg.run_dir / "traces")
    started = time.perf_counter()
    run_train(cfg)
    lines = [json.loads(x) for x in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return {"peak_gb": max(r["peak_host_rss_gb"] for r in lines), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (each runs both strategies twice)")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's dynamic mmap threshold on")
    args = parser.parse_args()
    env = {} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": "1048576"}

    from t3s_ray import config
    from t3s_ray.cluster import ray_session
    from t3s_ray.traces import run_traces

    with tempfile.TemporaryDirectory() as tmp, ray_session(config.RayConfig(num_cpus=2, env_vars=env)):
        tmp = Path(tmp)
        n = random_student(tmp / "student", args.hidden, args.layers, args.vocab)
        print(f"workers' malloc: {env or 'glibc defaults'}")
        print(f"random Llama: {n / 1e6:.1f}M parameters (fp32 master {4 * n / 1e9:.2f} GB, bf16 on disk "
              f"{2 * n / 1e9:.2f} GB); expected per worker: DDP ~{20 * n / 1e9:.2f} GB + runtime, "
              f"FSDP x2 ~{8 * n / 1e9:.2f} GB + runtime", flush=True)
        base = config.from_dict({"name": "traces", "output_dir": str(tmp / "runs"), "teacher": {"ref": "builtin:tiny-llama"},
                                 "data": {"source": "builtin:arith", "builtin_size": 8, "max_seq_len": 256},
                                 "traces": {"source": "dataset", "response_field": "solution", "keep": "all_correct"}})
        run_traces(base)
        peaks: dict[str, list[float]] = {"ddp": [], "fsdp": []}
        for strategy in abba("ddp", "fsdp", 2 * args.rounds if args.rounds > 1 else 1):
            r = run(strategy, tmp / "student", tmp / "runs", base.run_dir / "traces")
            peaks[strategy].append(r["peak_gb"])
            print(f"{strategy:5s} peak RSS of the worst worker {r['peak_gb']:.2f} GB ({r['seconds']:.0f} s)", flush=True)
    ddp, fsdp = (sum(v) / len(v) for v in (peaks["ddp"], peaks["fsdp"]))
    print(f"mean peak per worker: ddp {ddp:.2f} GB, fsdp {fsdp:.2f} GB")
    print(f"ratio fsdp/ddp = {fsdp / ddp:.3f}")


if __name__ == "__main__":
    main()
