"""Peak memory of chunked confidence extraction vs the naive full-vocabulary fp32 log-softmax.

Target (the README's "Benchmarks"): chunked peak ≤ 25% of naive at V=49152, T=1024, batch 4, H=576
(SmolLM2-135M's shapes).

    python bench/confidence_memory.py              # all variants, prints the table and PASS/FAIL
    python bench/confidence_memory.py --variant chunked_hidden   # one measurement (JSON line)

Each variant runs in a fresh subprocess so that one variant's freed memory cannot hide another's
peak.  On CUDA the peak is ``torch.cuda.max_memory_allocated`` minus the memory allocated after
the inputs.  On CPU torch keeps no allocator statistics, so the peak is the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs once the inputs exist) minus its RSS at that point;
where the reset is not permitted it falls back to ``ru_maxrss``, which also counts any earlier peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t3s_ray.t3s import linear_token_loss, token_logprobs_from_hidden, token_logprobs_from_logits  # noqa: E402

TARGET_RATIO = 0.25
# variant -> what it computes; COMPARISONS: (chunked, naive, counts for the verdict)
VARIANTS = {
    "naive_hidden": "hidden @ W.T -> fp32 logits -> log_softmax -> gather",
    "chunked_hidden": "token_logprobs_from_hidden (chunked lm head + fp32 log-softmax)",
    "naive_bf16_logits": "bf16 logits -> .float() -> log_softmax -> gather",
    "chunked_bf16_logits": "token_logprobs_from_logits on bf16 logits",
    "naive_train": "training: hidden @ W.T -> fp32 cross-entropy -> backward (a plain HF step's head)",
    "fused_train": "training: linear_token_loss -> backward (the worker's step: grads in the forward)",
}
COMPARISONS = [("chunked_hidden", "naive_hidden", True), ("chunked_bf16_logits", "naive_bf16_logits", False),
               ("fused_train", "naive_train", False)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory above the current level, in bytes, for the device the inputs live on."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        self.baseline = _status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"

    def peak_above_start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        if self.method == "VmHWM":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak - self.baseline


def naive_from_logits(logits, input_ids, target_mask):
    logprobs = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logprobs, (1, 0)) * target_mask


def measure(variant: str, args) -> dict:
    """Allocate the inputs, then measure one variant's peak memory above them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq_len)
    input_ids = torch.randint(0, args.vocab, shape, device=device, generator=generator)
    target_mask = torch.ones(shape, dtype=torch.bool, device=device)
    target_mask[:, 0] = False
    hidden = torch.randn(*shape, args.hidden, device=device, generator=generator)
    weight = torch.randn(args.vocab, args.hidden, device=device, generator=generator) / args.hidden**0.5
    logits = None
    if variant.endswith("bf16_logits"):
        logits = torch.randn(*shape, args.vocab, device=device, generator=generator, dtype=torch.bfloat16)

    # Warm the kernels on small shapes so one-time buffers are not charged to the variant.
    token_logprobs_from_hidden(hidden[:1, :8], weight, input_ids[:1, :8], target_mask[:1, :8])

    def naive_train():
        logits = (h_train @ w_train.T).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        loss.backward()
        return loss.detach()[None]

    def fused_train():
        weights = target_mask.float() / target_mask.sum()
        loss, _ = linear_token_loss(h_train, w_train, input_ids, target_mask, weights, args.chunk_size)
        loss.backward()
        return loss.detach()[None]

    h_train = hidden.clone().requires_grad_(variant.endswith("_train"))
    w_train = weight.clone().requires_grad_(variant.endswith("_train"))
    runs = {
        "naive_train": naive_train,
        "fused_train": fused_train,
        "naive_hidden": lambda: naive_from_logits(hidden @ weight.T, input_ids, target_mask),
        "chunked_hidden": lambda: token_logprobs_from_hidden(hidden, weight, input_ids, target_mask, args.chunk_size),
        "naive_bf16_logits": lambda: naive_from_logits(logits, input_ids, target_mask),
        "chunked_bf16_logits": lambda: token_logprobs_from_logits(logits, input_ids, target_mask, args.chunk_size),
    }
    memory = PeakMemory(device)
    with torch.set_grad_enabled(variant.endswith("_train")):
        memory.start()
        started = time.perf_counter()
        result = runs[variant]()
        seconds = time.perf_counter() - started
        peak = memory.peak_above_start()
    return {
        "variant": variant,
        "peak_mb": peak / 2**20,
        "seconds": seconds,
        "checksum": float(result.double().sum()),
        "device": device.type,
        "method": "cuda.max_memory_allocated" if device.type == "cuda" else memory.method,
    }


def run_in_subprocess(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--variant", variant, *shape_arguments(args)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def shape_arguments(args) -> list[str]:
    return [
        f"--batch={args.batch}",
        f"--seq-len={args.seq_len}",
        f"--vocab={args.vocab}",
        f"--hidden={args.hidden}",
        f"--chunk-size={args.chunk_size}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="measure one variant in this process")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--skip-logits", action="store_true", help="only the hidden-state comparison")
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return 0

    print(
        f"confidence extraction peak memory: batch={args.batch} T={args.seq_len} V={args.vocab} "
        f"H={args.hidden} chunk_size={args.chunk_size}"
    )
    comparisons = COMPARISONS[:1] if args.skip_logits else COMPARISONS
    passed = True
    for chunked, naive, required in comparisons:
        results = {variant: run_in_subprocess(variant, args) for variant in (naive, chunked)}
        for variant, result in results.items():
            print(
                f"  {variant:<20} {result['peak_mb']:9.1f} MB  {result['seconds']:6.2f} s   {VARIANTS[variant]}"
                f"  [{result['device']}, {result['method']}]"
            )
        ratio = results[chunked]["peak_mb"] / results[naive]["peak_mb"]
        same = abs(results[chunked]["checksum"] - results[naive]["checksum"]) <= 1e-5 * abs(results[naive]["checksum"])
        ok = ratio <= TARGET_RATIO and same
        passed &= ok or not required
        print(
            f"  ratio {chunked}/{naive} = {ratio:.3f} (target <= {TARGET_RATIO}), "
            f"results {'agree' if same else 'DIFFER'}: {'PASS' if ok else 'FAIL'}"
            f"{'' if required else ' (informational)'}"
        )
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
