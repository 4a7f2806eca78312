"""The algorithm core and the HF generator on a CUDA GPU, checked against the same code on the CPU.

CI has no GPU, so this is the check to run where one is lent (needs torch with CUDA, transformers,
tokenizers, safetensors, pyyaml, numpy; no Ray, no vLLM, no download: builtin tiny models):

    python bench/gpu_check.py

1. chunked token confidence of a causal LM: CUDA fp32 == CPU fp32 (and CUDA bf16 close), values and
   the gradient of the masked T3S loss;
2. greedy generation (``HFGenerator``): the same token ids on CUDA as on the CPU;
3. the diffusion sampler (tiny denoiser, greedy): the same token ids on CUDA as on the CPU;
4. then ``bench/confidence_memory.py`` on CUDA (peak memory from the allocator's own statistics).

Prints one PASS/FAIL line per check; exits non-zero if any fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from t3s_ray.generate import HFGenerator  # noqa: E402
from t3s_ray.models import load_model, load_tokenizer, mask_token_id  # noqa: E402
from t3s_ray.t3s import masked_token_loss, token_confidence  # noqa: E402
from t3s_ray.t3s.diffusion import diffusion_generate  # noqa: E402

PROMPTS = ["Tom has 3 apples and buys 4 more.", "A train travels 60 km in 2 hours.", "What is 12 times 11?"]
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def confidence_and_grad(ref: str, device: str, dtype: torch.dtype):
    tok = load_tokenizer(ref)
    model = load_model(ref, dtype="float32").to(device=device, dtype=dtype)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    target = attention.bool().clone()
    target[:, :3] = False  # the first tokens play the prompt
    keep = target.clone()
    keep[:, 5::2] = False  # drop some targets, as anchors would be
    conf = token_confidence(model, ids, attention, target, chunk_size=7)
    masked_token_loss(conf, keep).backward()
    grad = model.get_input_embeddings().weight.grad.float().cpu()
    return conf.detach().float().cpu(), grad, target.cpu()


def main() -> int:
    # --device cpu runs every comparison CPU against CPU: a dry run of this script without a GPU.
    device_under_test = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    if device_under_test == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu for a dry run)")
        return 2
    name = torch.cuda.get_device_name() if device_under_test == "cuda" else "CPU (dry run)"
    print(f"torch {torch.__version__} on {name}", flush=True)
    dut = device_under_test.upper()

    for ref in ("builtin:tiny-llama", "builtin:tiny-qwen3"):
        cpu, g_cpu, target = confidence_and_grad(ref, "cpu", torch.float32)
        gpu, g_gpu, _ = confidence_and_grad(ref, device_under_test, torch.float32)
        half, _, _ = confidence_and_grad(ref, device_under_test, torch.bfloat16)
        diff = (cpu - gpu)[target].abs().max().item()
        gdiff = (g_cpu - g_gpu).abs().max().item() / max(g_cpu.abs().max().item(), 1e-12)
        bdiff = (cpu - half)[target].abs().max().item()
        check(f"{ref} confidence, {dut} fp32 vs CPU", diff < 1e-4, f"max |diff| {diff:.2e}")
        check(f"{ref} T3S loss gradient, {dut} fp32 vs CPU", gdiff < 1e-3, f"max relative diff {gdiff:.2e}")
        check(f"{ref} confidence, {dut} bf16 vs CPU fp32", bdiff < 0.1, f"max |diff| {bdiff:.3f}")

    rows = [{"id": str(i), "sample_index": 0, "prompt_text": p, "max_tokens": 16, "seed": 0}
            for i, p in enumerate(PROMPTS)]
    outs = {}
    for device in ("cpu", device_under_test):
        gen = HFGenerator("builtin:tiny-llama", temperature=0.0, top_p=1.0, topk_logprobs=0, dtype="float32",
                          device=device)
        outs[device] = [r["token_ids"] for r in gen.generate_rows(rows)]
    check(f"HFGenerator greedy, {dut} vs CPU", outs["cpu"] == outs[device_under_test],
          f"{sum(len(x) for x in outs['cpu'])} tokens, "
          f"{sum(a == b for a, b in zip(outs['cpu'], outs[device_under_test]))}/3 "
          "sequences equal")

    tok = load_tokenizer("builtin:tiny-dllm")
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    dl = {}
    for device in ("cpu", device_under_test):
        model = load_model("builtin:tiny-dllm", dtype="float32").to(device).eval()
        dl[device] = [o["token_ids"] for o in diffusion_generate(
            model, ids, 12, mask_id=mask_token_id(tok, "", "builtin:tiny-dllm"), pad_id=tok.pad_token_id,
            eos_ids={tok.eos_token_id}, steps=6, block_length=4, temperature=0.0, top_p=1.0)]
    check(f"diffusion sampler greedy, {dut} vs CPU", dl["cpu"] == dl[device_under_test],
          f"{sum(a == b for a, b in zip(dl['cpu'], dl[device_under_test]))}/3 sequences equal")

    if device_under_test != "cuda":
        return 1 if any(not ok for _, ok, _ in results) else 0
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "confidence_memory.py")], capture_output=True,
                          text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    check("bench/confidence_memory.py on CUDA", proc.returncode == 0, f"exit {proc.returncode}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
