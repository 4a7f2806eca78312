"""The GPU path, checked on a CUDA GPU against the same code on the CPU.

CI has no GPU, so this is the check to run where one is lent (needs torch with CUDA, transformers,
accelerate, tokenizers, safetensors, pyyaml, numpy, tensorboard; no Ray, no vLLM, no download:
builtin tiny models and a random model built from a config):

    python bench/gpu_check.py            # ~2-4 min on an H200 (80 GB+ GPU for check 6 in full)
    python bench/gpu_check.py --device cpu   # a dry run of every check on the CPU, small shapes

1. chunked token confidence of a causal LM: CUDA fp32 == CPU fp32 (and CUDA bf16 close), values and
   the gradient of the masked T3S loss; the fused training loss (lm-head gradients formed in the
   forward pass) likewise, fp32 and under bf16 autocast; padding-free micro-batches (rows packed,
   position ids restarting: flash attention's variable-length path when ``flash_attn`` is installed,
   else sdpa) give the padded confidences;
2. greedy generation (``HFGenerator``): the same token ids on CUDA as on the CPU, and the same
   step-by-step log-probabilities of the sampled tokens;
3. the diffusion sampler (tiny denoiser, greedy): the same token ids on CUDA as on the CPU;
4. the training worker without Ray (``worker.train_standalone``) under an NCCL process group of
   world size 1, FSDP2 (2 micro-batches a step, gradients reduced once per step): a tiny model's
   losses and final weights match the same run on the CPU (no group), and so does a run cut into
   micro-batches by a token budget; a bf16-compute run keeps fp32 master weights;
5. a sharded checkpoint round trip under NCCL: stopped at step 2 and resumed == uninterrupted;
6. a Qwen3-8B-shaped random model (36 layers, hidden 4096, vocab 151,936; built from its config)
   trains on 16k-token rows with FSDP2, bf16 compute over fp32 master weights, activation
   checkpointing and fused AdamW: peak memory and tokens/s, against torchtitan's published 5,762
   tokens/s/GPU (Llama-3.1-8B, FSDP2, 8x H100). One GPU holds the whole 16 B/param state (131 GB):
   if it does not fit, the check says so and measures fewer layers; then a Qwen3-0.6B-shaped model
   (where the lm head is a third of the compute), 4 x 4096 tokens: t3s_ray's step (fused loss) against
   a plain Hugging Face step (``model(input_ids, labels=...)``), ABBA, target ratio <= 1.05;
7. then ``bench/confidence_memory.py`` on CUDA (peak memory from the allocator's own statistics).

Prints one PASS/FAIL line per check; exits non-zero if any fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

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


def fused_loss_and_grad(ref: str, device: str, autocast: bool):
    """The worker's training loss (``token_loss_and_confidence``) and the input embedding's gradient."""
    from t3s_ray.t3s import token_loss_and_confidence

    tok = load_tokenizer(ref)
    model = load_model(ref, dtype="float32").to(device)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    target = attention.bool().clone()
    target[:, :3] = False
    weights = target.float() / target.sum()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
        loss, conf = token_loss_and_confidence(model, ids, attention, target, weights, chunk_size=7)
    loss.backward()
    return float(loss), conf.float().cpu(), model.get_input_embeddings().weight.grad.float().cpu(), target.cpu()


def packed_vs_padded(device: str) -> tuple[float, str]:
    """Max |diff| of the confidences of padded and packed micro-batches of the same rows."""
    import numpy as np

    from t3s_ray.batching import build_micro_batch
    from t3s_ray.models import resolve

    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2" if device == "cuda" else "sdpa"
    except ImportError:
        attn = "sdpa"
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if attn.startswith("flash") else torch.float32  # flash attention is fp16/bf16 only
    model = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"), dtype=dtype,
                                                 attn_implementation=attn).to(device).eval()
    rng = np.random.default_rng(0)
    examples = []
    for n in (9, 23, 5, 17):
        target = np.zeros(n, dtype=bool)
        target[n // 3:] = True
        examples.append({"input_ids": rng.integers(5, model.config.vocab_size, n), "target_mask": target})
    out = []
    for packed in (False, True):
        b = build_micro_batch(examples, [0, 1, 2, 3], 0, torch.device(device), packed=packed)
        with torch.no_grad():
            conf = token_confidence(model, b.input_ids, b.attention_mask, b.predicted_mask, position_ids=b.position_ids)
        out.append(np.concatenate(b.per_example(conf)))
    return float(np.abs(out[0] - out[1]).max()), attn


def tiny_job(out: Path, strategy: str, dtype: str = "float32", stop_at: int | None = None, **train):
    """A 4-step SFT job of builtin:tiny-llama on 8 arithmetic traces (what tests/test_worker.py runs)."""
    from t3s_ray import config
    from t3s_ray.train import tokenize_traces
    from t3s_ray.worker import SelectionPlan, TrainJob

    cfg = config.from_dict({"name": "gpu-check", "output_dir": str(out), "student": {"ref": "builtin:tiny-llama",
                            "dtype": "float32"},
                            "train": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "lr": 1e-2,
                                      "checkpoint_every": 2, "keep_last": 0, "strategy": strategy, "dtype": dtype,
                                      **train},
                            "selection": {"protocol": "sft"}})
    rows = [{"id": str(i), "sample_index": 0, "prompt": f"What is {i} + {i + 3}?",
             "response": f"{i} + {i + 3} = {2 * i + 3}. The answer is {2 * i + 3}."} for i in range(8)]
    examples = tokenize_traces(rows, load_tokenizer("builtin:tiny-llama"), system_prompt=None, chat_template=True,
                               max_seq_len=256)[0]
    job = TrainJob(cfg=cfg.to_dict(), out_dir=str(out / "train"), model_ref="builtin:tiny-llama", model_kind="ar",
                   scoring_ref="builtin:tiny-llama", plan=SelectionPlan.for_protocol(cfg), anchor_model=None,
                   max_steps=4, store_name="gpu-check", stop_at=stop_at)
    return job, examples


def run_tiny(out: Path, ranks, strategy: str, dtype: str = "float32", stop_at: int | None = None, **train):
    import json

    from safetensors.torch import load_file

    from t3s_ray.worker import train_standalone

    job, examples = tiny_job(out, strategy, dtype, stop_at, **train)
    trainer = train_standalone(job, examples, ranks)
    losses = [json.loads(line)["loss"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return trainer, losses, load_file(str(out / "train" / "model" / "model.safetensors"))


def check_worker(device_under_test: str, dut: str) -> None:
    """Checks 4 and 5: the Ray-free worker on the device under a process group, against the CPU."""
    from t3s_ray import distributed
    from t3s_ray.distributed import Ranks

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, cpu_losses, cpu_weights = run_tiny(tmp / "cpu", Ranks(), "ddp")  # no process group
        ranks = distributed.init_process_group(torch.device(device_under_test), timeout_s=300)
        backend = torch.distributed.get_backend()
        trainer, losses, weights = run_tiny(tmp / "dut", ranks, "fsdp")
        loss_diff = max(abs(a - b) / abs(a) for a, b in zip(cpu_losses, losses))
        weight_diff = max((cpu_weights[k] - weights[k]).abs().max().item() for k in cpu_weights)
        check(f"worker without Ray, {backend} world 1, FSDP2 fp32: losses vs CPU", loss_diff < 1e-4,
              f"{len(losses)} steps, max relative diff {loss_diff:.2e} ({losses[0]:.4f} -> {losses[-1]:.4f})")
        check(f"worker without Ray, {backend}: final weights vs CPU", weight_diff < 1e-3,
              f"max |diff| {weight_diff:.2e}")
        _, budget_losses, budget_weights = run_tiny(tmp / "budget", ranks, "fsdp", max_tokens_per_micro_batch=40)
        bl_diff = max(abs(a - b) / abs(a) for a, b in zip(cpu_losses, budget_losses))
        bw_diff = max((cpu_weights[k] - budget_weights[k]).abs().max().item() for k in cpu_weights)
        check(f"worker, {backend} FSDP2, token-budget micro-batches: losses and weights vs CPU",
              bl_diff < 1e-4 and bw_diff < 1e-3, f"max relative loss diff {bl_diff:.2e}, max |weight diff| {bw_diff:.2e}")
        trainer, bf_losses, _ = run_tiny(tmp / "bf16", ranks, "fsdp", dtype="bfloat16")
        master = {p.dtype for p in trainer.module.parameters()}
        check(f"worker, {dut} bf16 compute: fp32 master weights, loss falls", master == {torch.float32}
              and bf_losses[-1] < bf_losses[0], f"parameters {sorted(map(str, master))}, loss {bf_losses[0]:.4f} "
              f"-> {bf_losses[-1]:.4f} (fp32 {losses[-1]:.4f})")
        run_tiny(tmp / "resumed", ranks, "fsdp", stop_at=2)
        _, resumed_losses, resumed = run_tiny(tmp / "resumed", ranks, "fsdp")  # from the step-2 checkpoint
        files = sorted(p.name for p in (tmp / "resumed" / "train" / "checkpoints" / "step-000002" / "dcp").iterdir())
        same = all(torch.equal(resumed[k], weights[k]) for k in weights)
        check(f"sharded checkpoint round trip, {backend}: resumed == uninterrupted", same and
              resumed_losses == losses, f"checkpoint files {files}")


def check_8b_shaped(device_under_test: str, small: bool) -> None:
    """Check 6: an 8B-shaped model trained on 16k-token rows with FSDP2 on this one GPU."""
    from transformers import Qwen3Config

    from t3s_ray import distributed
    from t3s_ray.models import empty_model_from_config
    from t3s_ray.worker import LogprobModule, fsdp_units

    shape = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                 tie_word_embeddings=False, rope_theta=1e6)
    seq = 16384
    if small:  # the dry run: the same code on a shape a CPU trains in seconds
        shape.update(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=64, vocab_size=4096)
        seq = 256
    device = torch.device(device_under_test, torch.cuda.current_device()) if device_under_test == "cuda" \
        else torch.device("cpu")
    for layers in ([shape["num_hidden_layers"]] if small else [36, 24]):
        config = Qwen3Config(**{**shape, "num_hidden_layers": layers})
        module = optimizer = None
        try:
            model = empty_model_from_config(config)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            module = LogprobModule(model, 256)
            distributed.shard_model(module, fsdp_units(model), bf16_compute=True)
            distributed.materialize(module, device)
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
            module.train()
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
            n_params = sum(p.numel() for p in module.parameters())
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, config.vocab_size, (1, seq), generator=generator).to(device)
            attention = torch.ones_like(ids)
            target = torch.ones_like(ids, dtype=torch.bool)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            weights = target.float() / target.sum()
            for _ in range(4):  # 1 warm-up + 3 timed
                started = time.perf_counter()
                module(ids, attention, target, loss_weights=weights)[0].backward()  # the worker's fused loss
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)
            step = sorted(times[1:])[1]
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
            tokens_per_s = seq / step
            check(f"Qwen3-8B-shaped ({layers} layers, {n_params / 1e6:,.0f}M params), {seq}-token rows, FSDP2 "
                  "bf16/fp32-master/AC", True,
                  f"step {step:.2f} s, {tokens_per_s:,.0f} tokens/s/GPU ({tokens_per_s / 5762:.2f}x torchtitan's "
                  f"5,762 for Llama-3.1-8B on H100), peak allocated {peak:.1f} GB"
                  + ("" if layers == shape["num_hidden_layers"] or small else
                     f"; 36 layers would need ~{peak + (36 - layers) * 16 * n_params / layers / 1e9:.0f} GB"))
            return
        except torch.OutOfMemoryError as e:
            print(f"{layers} layers do not fit on this one GPU ({str(e).splitlines()[0][:160]}); trying fewer",
                  flush=True)
        finally:
            del module, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    check("Qwen3-8B-shaped training", False, "no layer count fitted")


def check_step_vs_hf(device_under_test: str, small: bool, rounds: int = 4) -> None:
    """t3s_ray's training step (fused loss over the response tokens) against a plain Hugging Face step
    (``model(input_ids, labels=...)``), same model, batch and AdamW, ABBA rounds; bf16 autocast."""
    import statistics

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from t3s_ray.worker import LogprobModule

    shape = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
    batch, seq = 4, 4096
    if small:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, vocab_size=2048)
        seq = 128
    device = torch.device(device_under_test)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**shape)).to(device).train()
    module = LogprobModule(model, 1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    attention = torch.ones_like(ids)
    target = torch.ones_like(ids, dtype=torch.bool)
    target[:, : seq // 4] = False  # a prompt, then the response
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    weights = target.float() / target.sum()

    def step(side: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            if side == "t3s_ray":
                loss = module(ids, attention, target, loss_weights=weights)[0]
            else:
                loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    times = {"t3s_ray": [], "hf": []}
    for r in range(rounds):
        for side in (("t3s_ray", "hf") if r % 2 == 0 else ("hf", "t3s_ray")):
            got = [step(side) for _ in range(4)]
            times[side] += got[1:]
    ratio = statistics.median(times["t3s_ray"]) / statistics.median(times["hf"])
    check(f"training step vs plain HF ({shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, "
          f"{batch} x {seq} tokens, bf16)", ratio <= 1.05 or small,
          f"ratio t3s_ray/hf = {ratio:.3f}, {batch * seq / statistics.median(times['t3s_ray']):,.0f} vs "
          f"{batch * seq / statistics.median(times['hf']):,.0f} tokens/s")


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
        l_cpu, c_cpu, fg_cpu, target = fused_loss_and_grad(ref, "cpu", autocast=False)
        l_dut, c_dut, fg_dut, _ = fused_loss_and_grad(ref, device_under_test, autocast=False)
        l_bf, _, fg_bf, _ = fused_loss_and_grad(ref, device_under_test, autocast=True)
        fdiff = (fg_cpu - fg_dut).abs().max().item() / max(fg_cpu.abs().max().item(), 1e-12)
        fbdiff = (fg_cpu - fg_bf).abs().max().item() / max(fg_cpu.abs().max().item(), 1e-12)
        check(f"{ref} fused training loss, {dut} fp32 vs CPU", abs(l_cpu - l_dut) < 1e-4 * abs(l_cpu) and fdiff < 1e-3
              and (c_cpu - c_dut)[target].abs().max().item() < 1e-4,
              f"loss {l_dut:.5f} vs {l_cpu:.5f}, gradient max relative diff {fdiff:.2e}")
        check(f"{ref} fused training loss, {dut} bf16 autocast vs CPU fp32", abs(l_cpu - l_bf) < 0.05 * abs(l_cpu)
              and fbdiff < 0.1, f"loss {l_bf:.4f} vs {l_cpu:.4f}, gradient max relative diff {fbdiff:.3f}")
    packed_diff, attn = packed_vs_padded(device_under_test)
    check(f"padding-free micro-batch ({attn}) vs padded, {dut}", packed_diff < (5e-2 if attn != "sdpa" else 1e-4),
          f"max |diff| of the confidences {packed_diff:.2e}")

    rows = [{"id": str(i), "sample_index": 0, "prompt_text": p, "max_tokens": 16, "seed": 0}
            for i, p in enumerate(PROMPTS)]
    outs, lps = {}, {}
    for device in ("cpu", device_under_test):
        gen = HFGenerator("builtin:tiny-llama", temperature=0.0, top_p=1.0, topk_logprobs=2, dtype="float32",
                          device=device)
        generated = gen.generate_rows(rows)
        outs[device] = [r["token_ids"] for r in generated]
        lps[device] = [lp for r in generated for lp in r["logprobs"]]
    lp_diff = max(abs(a - b) for a, b in zip(lps["cpu"], lps[device_under_test]))
    check(f"HFGenerator step-by-step logprobs, {dut} vs CPU", lp_diff < 1e-3 and len(lps["cpu"]) == len(
        lps[device_under_test]), f"max |diff| {lp_diff:.2e} over {len(lps['cpu'])} tokens")
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

    check_worker(device_under_test, dut)
    check_8b_shaped(device_under_test, small=device_under_test != "cuda")
    check_step_vs_hf(device_under_test, small=device_under_test != "cuda")
    assert "ray" not in sys.modules and "vllm" not in sys.modules, "the GPU path must not need Ray or vLLM"

    if device_under_test != "cuda":
        failed = [name for name, ok, _ in results if not ok]
        print(f"{len(results) - len(failed)}/{len(results)} checks passed (dry run)", flush=True)
        return 1 if failed else 0
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "confidence_memory.py")], capture_output=True,
                          text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    check("bench/confidence_memory.py on CUDA", proc.returncode == 0, f"exit {proc.returncode}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
