"""The GPU path, checked on a CUDA GPU against the same code on the CPU.

CI has no GPU, so this is the check to run where one is lent. It needs only torch with CUDA,
transformers, accelerate, safetensors and tensorboard (and their numpy, pyyaml, tokenizers,
huggingface_hub): no Ray, vLLM, pyarrow, datasets or math-verify, no download (builtin tiny models and
random models built from a config):

    python bench/gpu_check.py                # ~5-7 min on one H100 or H200 (at most 10)
    python bench/gpu_check.py --device cpu   # a dry run of every check on the CPU, small shapes (~3-5 min)

1. chunked token confidence of a causal LM: CUDA fp32 == CPU fp32 (and CUDA bf16 close), values and
   the gradient of the masked T3S loss; the fused training loss (lm-head gradients formed in the
   forward pass) likewise, fp32 and under bf16 autocast; padding-free micro-batches (rows packed,
   position ids restarting: flash attention's variable-length path when ``flash_attn`` is installed,
   else sdpa) give the padded confidences;
2. greedy generation (``HFGenerator``): the same token ids on CUDA as on the CPU, and the same
   step-by-step log-probabilities of the sampled tokens;
3. the diffusion sampler (tiny denoiser): greedy, the same token ids on CUDA as on the CPU; at
   temperature > 0 through ``HFGenerator`` (a seeded CPU generator, CUDA probabilities): no sample
   fails, the same seed gives the same tokens, every token is in the vocabulary and not the mask;
4. the training worker without Ray (``worker.train_standalone``) under an NCCL process group of
   world size 1, FSDP2 (2 micro-batches a step, gradients reduced once per step): a tiny model's
   losses and final weights match the same run on the CPU (no group), and so does a run cut into
   micro-batches by a token budget; a bf16-compute run keeps fp32 master weights; the static
   protocol (``t3s_static``, bf16 compute): θb (a perturbed copy of the tiny model) is scored in
   bf16, then θ0 is loaded into the same sharded module, and the run's losses, anchor fraction and
   weights match the same job on the CPU;
5. a sharded checkpoint round trip under NCCL: stopped at step 2 and resumed == uninterrupted;
6. a Qwen3-8B-shaped random model (hidden 4096, vocab 151,936; built from its config) trains on
   16k-token rows with FSDP2, bf16 compute over fp32 master weights, activation checkpointing and
   fused AdamW: peak memory and tokens/s, against torchtitan's published 5,762 tokens/s/GPU
   (Llama-3.1-8B, FSDP2, 8x H100). All 36 layers need ~131 GB at 16 B/param on one GPU, so the layer
   count is chosen from ``torch.cuda.mem_get_info()`` (the arithmetic is in ``layers_that_fit``);
   after an out-of-memory error the attempt's memory is freed (``gc.collect()``: FSDP2 modules sit
   in reference cycles) before a retry with fewer layers (the dry run injects one OOM to take that
   path); then a Qwen3-0.6B-shaped model (where the lm head is a third of the compute), 4 x 4096
   tokens: t3s_ray's step (fused loss) against a plain Hugging Face step (``model(input_ids,
   labels=...)``), ABBA, target ratio <= 1.05;
7. the fused loss (``token_loss_and_confidence``) at Qwen3-8B's lm-head shape (hidden 4096, vocab
   151,936, 1 x 16384 tokens, bf16 autocast) at ``chunk_size`` 256, 2048 and 4096: time per call
   (forward + backward) and peak memory; a larger chunk passes when it is not slower than 256 and its
   peak stays under the bound printed with it;
8. LLaDA2 (issue 24): ``builtin:tiny-llada2`` in fp32, the block-diffusion loss and its gradients
   (``diffusion_batch`` + ``denoiser_loss``: the block layout, without the EOS fill, the full layout) and
   the block sampler's greedy tokens (with and without the prefix cache) on the device == on the CPU;
   then LLaDA2.0-mini's width cut to 2 layers (a dense one, a MoE of 256 experts; vocabulary 157,184;
   1.5B parameters) under FSDP2 world 1, bf16 compute over fp32 masters, per-layer checkpointing: one
   block-diffusion step at L = 8,192 (2L = 16,384 through the decoder): time, peak memory, and SDPA
   restricted to the memory-efficient and cuDNN kernels (the math fallback would raise "no available
   kernel"; which kernels ran is read from the profiler, and what each backend does with the mask alone);
   the block sampler's tokens/s with and without the prefix cache (8 rows x 128 tokens, bf16);
9. nothing imported Ray, vLLM, pyarrow, datasets, math-verify or matplotlib;
10. then ``bench/confidence_memory.py`` on CUDA (peak memory from the allocator's own statistics).

Every check prints one PASS/FAIL line with its number (section.check), and the total at the end;
exits non-zero if any fails.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
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

from bench.abba import abba  # noqa: E402
from t3s_ray.engines.hf import HFGenerator  # noqa: E402
from t3s_ray.models import load_model, load_tokenizer, mask_token_id  # noqa: E402
from t3s_ray.t3s import masked_token_loss, token_confidence  # noqa: E402
from t3s_ray.t3s.diffusion import diffusion_generate  # noqa: E402

PROMPTS = ["Tom has 3 apples and buys 4 more.", "A train travels 60 km in 2 hours.", "What is 12 times 11?"]
# Packages a bare GPU machine does not have: nothing this script runs may import them.
ABSENT = ("ray", "vllm", "pyarrow", "datasets", "math_verify", "matplotlib")
results: list[tuple[str, bool, str]] = []
_numbering = {"section": 0, "check": 0}


def section(number: int, title: str) -> None:
    _numbering.update(section=number, check=0)
    print(f"-- {number}. {title}", flush=True)


def check(name: str, ok: bool, detail: str) -> None:
    _numbering["check"] += 1
    number = f"{_numbering['section']}.{_numbering['check']}"
    results.append((f"{number} {name}", ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {number:>5}  {name}: {detail}", flush=True)


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
    return float(loss.detach()), conf.float().cpu(), model.get_input_embeddings().weight.grad.float().cpu(), target.cpu()


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
    import warnings

    out, syncs = [], {}
    # Padded; packed with the micro-batch's own sequence boundaries (what the worker passes: no
    # per-layer derivation); packed with position ids alone (transformers derives the boundaries in
    # every layer, a host sync each under flash attention: counted on CUDA).
    for name, packed, own in (("padded", False, False), ("packed", True, True), ("derived", True, False)):
        b = build_micro_batch(examples, [0, 1, 2, 3], 0, torch.device(device), packed=packed)
        kwargs = b.packing if own else {"position_ids": b.position_ids}
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                conf = token_confidence(model, b.input_ids, b.attention_mask, b.predicted_mask, **kwargs)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        syncs[name] = sum("synchroniz" in str(w.message) for w in caught)
        out.append(np.concatenate(b.per_example(conf)))
    diff = max(float(np.abs(out[0] - out[1]).max()), float(np.abs(out[0] - out[2]).max()))
    return diff, f"{attn}, host syncs in the forward: own boundaries {syncs['packed']}, derived {syncs['derived']}"


def tiny_job(out: Path, strategy: str, dtype: str = "float32", stop_at: int | None = None,
             selection: dict | None = None, anchor_model: str | None = None, max_steps: int = 4, lr: float = 1e-2,
             **train):
    """A ``max_steps``-step job of builtin:tiny-llama on 8 arithmetic traces (what tests/test_worker.py
    runs): SFT unless ``selection`` says otherwise, θb = ``anchor_model`` for a static protocol."""
    import t3s_ray.config as config  # by module path: tests/test_gpu_check.py imports each module named here
    from t3s_ray.data import tokenize_traces
    from t3s_ray.worker import SelectionPlan, TrainJob

    cfg = config.from_dict({"name": "gpu-check", "output_dir": str(out), "student": {"ref": "builtin:tiny-llama",
                            "dtype": "float32"},
                            "train": {"batch_size": 4, "micro_batch_size": 2, "max_steps": max_steps, "lr": lr,
                                      "checkpoint_every": 2, "keep_last": 0, "strategy": strategy, "dtype": dtype,
                                      **train},
                            "selection": selection or {"protocol": "sft"}})
    rows = [{"id": str(i), "sample_index": 0, "prompt": f"What is {i} + {i + 3}?",
             "response": f"{i} + {i + 3} = {2 * i + 3}. The answer is {2 * i + 3}."} for i in range(8)]
    examples = tokenize_traces(rows, load_tokenizer("builtin:tiny-llama"), system_prompt=None, chat_template=True,
                               max_seq_len=256)[0]
    job = TrainJob(cfg=cfg.to_dict(), out_dir=str(out / "train"), model_ref="builtin:tiny-llama", model_kind="ar",
                   scoring_ref="builtin:tiny-llama", plan=SelectionPlan.for_protocol(cfg), anchor_model=anchor_model,
                   max_steps=max_steps, store_name="gpu-check", stop_at=stop_at)
    return job, examples


def run_tiny(out: Path, ranks, strategy: str, dtype: str = "float32", stop_at: int | None = None, **kw):
    """``tiny_job`` run by the worker without Ray: (trainer, metrics per step, exported weights)."""
    import json

    from safetensors.torch import load_file

    from t3s_ray.worker import train_standalone

    job, examples = tiny_job(out, strategy, dtype, stop_at, **kw)
    trainer = train_standalone(job, examples, ranks)
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return trainer, metrics, load_file(str(out / "train" / "model" / "model.safetensors"))


def perturbed_tiny_model(folder: Path, scale: float = 0.02) -> str:
    """θb for the static protocol: builtin:tiny-llama with seeded Gaussian noise on every weight, saved
    as a model folder (a probe would save an SFT checkpoint; any other weights serve the check)."""
    tok = load_tokenizer("builtin:tiny-llama")
    model = load_model("builtin:tiny-llama", dtype="float32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def check_worker(device_under_test: str, dut: str) -> None:
    """Sections 4 and 5: the Ray-free worker on the device under a process group, against the CPU."""
    from t3s_ray import distributed
    from t3s_ray.distributed import Ranks

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, cpu_metrics, cpu_weights = run_tiny(tmp / "cpu", Ranks(), "ddp")  # no process group
        cpu_losses = [m["loss"] for m in cpu_metrics]
        theta_b = perturbed_tiny_model(tmp / "theta-b")
        static = dict(dtype="bfloat16", selection={"protocol": "t3s_static", "rule": "top_frac", "top_frac": 0.3},
                      anchor_model=theta_b, max_steps=2, lr=1e-4)
        _, cpu_static, cpu_static_weights = run_tiny(tmp / "cpu-static", Ranks(), "fsdp", **static)
        ranks = distributed.init_process_group(torch.device(device_under_test), timeout_s=300)
        backend = torch.distributed.get_backend()
        section(4, f"the worker without Ray, {backend} process group of world size 1, FSDP2")
        trainer, metrics, weights = run_tiny(tmp / "dut", ranks, "fsdp")
        losses = [m["loss"] for m in metrics]
        loss_diff = max(abs(a - b) / abs(a) for a, b in zip(cpu_losses, losses))
        weight_diff = max((cpu_weights[k] - weights[k]).abs().max().item() for k in cpu_weights)
        check(f"worker without Ray, {backend} world 1, FSDP2 fp32: losses vs CPU", loss_diff < 1e-4,
              f"{len(losses)} steps, max relative diff {loss_diff:.2e} ({losses[0]:.4f} -> {losses[-1]:.4f})")
        check(f"worker without Ray, {backend}: final weights vs CPU", weight_diff < 1e-3,
              f"max |diff| {weight_diff:.2e}")
        _, budget_metrics, budget_weights = run_tiny(tmp / "budget", ranks, "fsdp", max_tokens_per_micro_batch=40)
        bl_diff = max(abs(a - b["loss"]) / abs(a) for a, b in zip(cpu_losses, budget_metrics))
        bw_diff = max((cpu_weights[k] - budget_weights[k]).abs().max().item() for k in cpu_weights)
        check(f"worker, {backend} FSDP2, token-budget micro-batches: losses and weights vs CPU",
              bl_diff < 1e-4 and bw_diff < 1e-3, f"max relative loss diff {bl_diff:.2e}, max |weight diff| {bw_diff:.2e}")
        trainer, bf_metrics, _ = run_tiny(tmp / "bf16", ranks, "fsdp", dtype="bfloat16")
        bf_losses = [m["loss"] for m in bf_metrics]
        master = {p.dtype for p in trainer.module.parameters()}
        check(f"worker, {dut} bf16 compute: fp32 master weights, loss falls", master == {torch.float32}
              and bf_losses[-1] < bf_losses[0], f"parameters {sorted(map(str, master))}, loss {bf_losses[0]:.4f} "
              f"-> {bf_losses[-1]:.4f} (fp32 {losses[-1]:.4f})")
        # The static protocol scores θb with the sharded module (a bf16 no-grad forward leaves FSDP2's
        # root unsharded), then loads θ0 into that same module: a reload that fails, or leaves θb's
        # weights in place, shows in the first step's loss and in the weights (θb is ~0.02 away per
        # weight, two steps at lr 1e-4 move a weight by ~2e-4).
        _, static_metrics, static_weights = run_tiny(tmp / "static", ranks, "fsdp", **static)
        theta0 = load_model("builtin:tiny-llama", dtype="float32").state_dict()
        s_loss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(cpu_static, static_metrics))
        s_anchor = abs(cpu_static[0]["anchor_frac"] - static_metrics[0]["anchor_frac"])
        s_weight = max((cpu_static_weights[k] - static_weights[k]).abs().max().item() for k in cpu_static_weights)
        moved = max((static_weights[k] - theta0[k]).abs().max().item() for k in static_weights if k in theta0)
        check(f"static protocol under {backend} FSDP2, bf16: θb scored, θ0 reloaded; losses, anchors, weights "
              "vs CPU", len(static_metrics) == 2 and s_loss < 2e-2 and s_anchor <= 0.05 and s_weight < 1e-3
              and moved < 1e-3 and static_metrics[0]["anchor_frac"] > 0,
              f"max relative loss diff {s_loss:.2e} (step 1 {static_metrics[0]['loss']:.4f} vs CPU "
              f"{cpu_static[0]['loss']:.4f}), anchor fraction {static_metrics[0]['anchor_frac']:.3f} vs "
              f"{cpu_static[0]['anchor_frac']:.3f}, max |weight diff| {s_weight:.2e}, max |w - θ0| {moved:.2e}")
        section(5, f"a sharded checkpoint round trip, {backend}")
        run_tiny(tmp / "resumed", ranks, "fsdp", stop_at=2)
        _, resumed_metrics, resumed = run_tiny(tmp / "resumed", ranks, "fsdp")  # from the step-2 checkpoint
        files = sorted(p.name for p in (tmp / "resumed" / "train" / "checkpoints" / "step-000002" / "dcp").iterdir())
        same = all(torch.equal(resumed[k], weights[k]) for k in weights)
        check(f"sharded checkpoint round trip, {backend}: resumed == uninterrupted", same and
              [m["loss"] for m in resumed_metrics] == losses, f"checkpoint files {files}")


def layers_that_fit(shape: dict, seq: int, free_bytes: float) -> tuple[int, str]:
    """How many decoder layers of ``shape`` train on one GPU with ``free_bytes`` free, and the arithmetic.

    * 16 B per parameter: fp32 master weights (4), fp32 gradients (4), AdamW's two fp32 moments (8).
      Qwen3-8B: 6.95B in 36 layers (193M a layer: q, o 4096 x 4096, k, v 4096 x 1024, the MLP
      3 x 4096 x 12288) and 1.24B in the untied embedding and lm head: 131 GB in all, 3.09 GB a layer.
    * Activation checkpointing keeps each layer's bf16 input: seq x hidden x 2 B a layer (134 MB at 16k).
    * Headroom, independent of the layer count: the fused loss at the lm-head backward ~12 B x V x H
      (its fp32 weight gradient formed in the forward, the scaled copy backward returns, the bf16
      unsharded embedding and lm head of FSDP2's root: 4 + 4 + 2 + 2 B; 7.5 GB at Qwen3-8B's shape),
      one layer's recompute in backward (~4 bf16 seq x intermediate MLP tensors and ~6 seq x hidden
      attention ones: 2.4 GB at 16k), two layers' bf16 all-gathered weights (0.8 GB), and 3 GB for the
      CUDA context, cuBLAS workspaces and fragmentation. At 16k tokens: 13.7 GB + 19.9 GB (the
      embedding and lm head's 16 B/param) before the first layer, then 3.22 GB a layer: an H100
      (80 GiB, ~84.5 GB free) trains 15 layers, an H200 (141 GB, ~140 GB free) 32.
    """
    fixed, per_layer, headroom = memory_plan(shape, seq)
    layers = max(0, min(shape["num_hidden_layers"], int((free_bytes - fixed) // per_layer)))
    return layers, (f"{free_bytes / 1e9:.1f} GB free - {fixed / 1e9:.1f} GB (embedding and lm head at 16 B/param "
                    f"+ {headroom / 1e9:.1f} GB headroom) = {layers} x {per_layer / 1e9:.2f} GB a layer")


def memory_plan(shape: dict, seq: int) -> tuple[float, float, float]:
    """(bytes before the first layer, bytes a layer, the headroom within the first): see ``layers_that_fit``."""
    h, v, i = shape["hidden_size"], shape["vocab_size"], shape["intermediate_size"]
    heads, kv, hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    layer_params = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * i + 2 * h + 2 * hd
    fixed_params = v * h * (1 if shape["tie_word_embeddings"] else 2) + h
    headroom = 12 * v * h + (4 * seq * i + 6 * seq * h) * 2 + 2 * 2 * layer_params + 3e9
    return 16 * fixed_params + headroom, 16 * layer_params + seq * h * 2, headroom


def _train_shaped(config, device: torch.device, seq: int, inject_oom: bool, attempt: dict) -> dict:
    """Build, shard and train ``config`` for 4 steps (1 warm-up + 3 timed): step time, peak, size.
    ``attempt`` receives a weak reference to the module (so the caller can see it freed); ``inject_oom``
    raises an out-of-memory error in the middle of the second step's backward (the dry run's retry
    path: optimizer state allocated, FSDP2 halfway through its backward hooks)."""
    import weakref

    from t3s_ray import distributed
    from t3s_ray.models import empty_model_from_config
    from t3s_ray.worker import LogprobModule, fsdp_units

    model = empty_model_from_config(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = LogprobModule(model, 256)
    attempt["module"] = weakref.ref(module)
    distributed.shard_model(module, fsdp_units(model), bf16_compute=True)
    distributed.materialize(module, device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    module.train()
    steps_done = [0]
    if inject_oom:
        def arm(layer, args, output):  # the gradient reaching the first layer's output raises
            if steps_done[0] and output.requires_grad:
                output.register_hook(lambda grad: _raise_oom())

        model.model.layers[0].register_forward_hook(arm)
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
        steps_done[0] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return {"step": sorted(times[1:])[1], "peak": peak, "n_params": n_params}


def _raise_oom():
    raise torch.OutOfMemoryError("CUDA out of memory (injected by the dry run, halfway through a backward)")


def check_8b_shaped(device_under_test: str, small: bool) -> None:
    """Section 6: an 8B-shaped model trained on 16k-token rows with FSDP2 on this one GPU."""
    from transformers import Qwen3Config

    shape = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                 tie_word_embeddings=False, rope_theta=1e6)
    seq = 16384
    if small:  # the dry run: the same code on a shape a CPU trains in seconds
        shape.update(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=64, vocab_size=4096)
        seq = 256
    device = torch.device(device_under_test, torch.cuda.current_device()) if device_under_test == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:  # the dry run pretends to have just the room for all its layers, then injects an OOM (retry path)
        fixed, per_layer, _ = memory_plan(shape, seq)
        free = fixed + shape["num_hidden_layers"] * per_layer
    layers, arithmetic = layers_that_fit(shape, seq, free)
    print(f"layer count from free memory: {arithmetic}", flush=True)

    def plan(n: int) -> float:
        fixed, per_layer, _ = memory_plan(shape, seq)
        return (fixed + n * per_layer) / 1e9

    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    while layers >= 1:
        config = Qwen3Config(**{**shape, "num_hidden_layers": layers})
        attempt: dict = {}
        oom = None
        try:
            got = _train_shaped(config, device, seq, inject_oom=small and layers == shape["num_hidden_layers"],
                                attempt=attempt)
        except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS failing to allocate its workspace
            if not isinstance(e, torch.OutOfMemoryError) and "ALLOC_FAILED" not in str(e):
                raise
            oom = str(e).splitlines()[0][:160]
        # The attempt's module and optimizer sit in reference cycles (FSDP2's hooks refer back to their
        # modules): leaving the attempt frees nothing until the cycle collector runs. Collect, then give
        # the cached blocks back, after a failed attempt (before a smaller retry) and after a good one
        # (before the next checks).
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if oom is None:
            tokens_per_s = seq / got["step"]
            check(f"Qwen3-8B-shaped ({layers} of 36 layers, {got['n_params'] / 1e6:,.0f}M params), {seq}-token "
                  "rows, FSDP2 bf16/fp32-master/AC", True,
                  f"step {got['step']:.2f} s, {tokens_per_s:,.0f} tokens/s/GPU ({tokens_per_s / 5762:.2f}x "
                  f"torchtitan's 5,762 for Llama-3.1-8B on H100), peak allocated {got['peak']:.1f} GB"
                  + ("" if small else f"; the plan: {plan(layers):.0f} GB at {layers} layers, ~{plan(36):.0f} GB at 36"))
            return
        print(f"{layers} layers do not fit ({oom}); the attempt freed, retrying with fewer", flush=True)
        left = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        freed = attempt.get("module") is None or attempt["module"]() is None
        check(f"after an out-of-memory error at {layers} layers, the attempt's memory is freed before the retry",
              freed and left - baseline < 2**30, f"module collected: {freed}, allocated "
              f"{(left - baseline) / 1e9:.2f} GB above the level before the attempt")
        layers = layers * 2 // 3
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
    for side in abba("t3s_ray", "hf", rounds):
        got = [step(side) for _ in range(4)]
        times[side] += got[1:]
    ratio = statistics.median(times["t3s_ray"]) / statistics.median(times["hf"])
    check(f"training step vs plain HF ({shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, "
          f"{batch} x {seq} tokens, bf16)", ratio <= 1.05 or small,
          f"ratio t3s_ray/hf = {ratio:.3f}, {batch * seq / statistics.median(times['t3s_ray']):,.0f} vs "
          f"{batch * seq / statistics.median(times['hf']):,.0f} tokens/s")


def check_loss_chunks(device_under_test: str, small: bool, chunks=(256, 2048, 4096), calls: int = 5) -> None:
    """Section 7: the fused training loss (``token_loss_and_confidence``) at Qwen3-8B's lm-head shape
    under bf16 autocast, at several ``chunk_size``: median time of a call (forward + backward) and the
    peak memory above the model and inputs. At chunk 256 each chunk's matmuls are small and every
    chunk reads and adds into the fp32 V x H weight gradient, so the head is memory-bound; a larger
    chunk must not be slower, and must stay under the bound 12 B x V x H + 8 B x chunk x V + 20 B x
    tokens x H + 0.5 GB: in the forward the fp32 weight gradient (4 B x V x H), the bf16 weight (2) and
    a chunk's bf16 product before it is added (2), in backward that gradient and its scaled copy (8),
    4 B slack; a chunk's fp32 logits turned into their gradient in place and its bf16 copy (6 B x
    chunk x V, 2 slack); the hidden rows, their gradient and the norm's (~5 fp32 tokens x H)."""
    import statistics

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from t3s_ray.t3s import token_loss_and_confidence

    h, v, n = 4096, 151936, 16384
    if small:  # bf16 matmuls are emulated on most CPUs: a shape and a count of calls that take seconds
        h, v, n, calls = 64, 2048, 2048, 2
    device = torch.device(device_under_test)
    # No decoder layers: the embedding, the final norm and the lm head, so that the call's time and
    # memory are the head's. fp32 weights under bf16 autocast, as the worker's unsharded path.
    config = Qwen3Config(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=0, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=v, tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:  # initialised where it runs: 1.2B random weights are slow to draw on a CPU
        model = Qwen3ForCausalLM(config).train()
    # The input embedding's gradient (4 B x V x H, dense) is not the head's: frozen, the peak is the head's.
    model.get_input_embeddings().weight.requires_grad_(False)
    ids = torch.randint(0, v, (1, n), device=device)
    attention = torch.ones_like(ids)
    target = torch.ones_like(ids, dtype=torch.bool)
    weights = target.float() / target.sum()
    rows = []
    for chunk in chunks:
        times, loss = [], None
        for k in range(calls + 1):  # a warm-up, then the timed calls
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                if k == 1:
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
            started = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = token_loss_and_confidence(model, ids, attention, target, weights, chunk_size=chunk)[0]
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9 if device.type == "cuda" else float("nan")
        bound = (12 * v * h + 8 * chunk * v + 20 * n * h) / 1e9 + 0.5
        rows.append((chunk, statistics.median(times[1:]), peak, bound, float(loss.detach())))
    print(f"fused loss, hidden {h}, vocab {v:,}, 1 x {n} tokens, bf16 autocast, forward + backward:", flush=True)
    print(f"{'chunk':>7} {'ms/call':>9} {'vs 256':>7} {'peak GB':>8} {'bound GB':>9}", flush=True)
    base_time = rows[0][1]
    for chunk, t, peak, bound, _ in rows:
        print(f"{chunk:>7} {t * 1e3:>9.1f} {t / base_time:>7.2f} {peak:>8.2f} {bound:>9.2f}", flush=True)
    same_loss = all(abs(r[4] - rows[0][4]) <= 1e-2 * abs(rows[0][4]) for r in rows)
    for chunk, t, peak, bound, _ in rows[1:]:
        # 3 % for timing noise; the dry run's CPU timings and memory say nothing about a GPU
        fast = t <= 1.03 * base_time or small
        fits = peak <= bound or device.type != "cuda"
        check(f"fused loss at chunk {chunk} vs 256 (hidden {h}, vocab {v:,}, {n} tokens, bf16)",
              fast and fits and same_loss, f"{t * 1e3:.1f} vs {base_time * 1e3:.1f} ms/call "
              f"({t / base_time:.2f}x), peak {peak:.2f} GB (bound {bound:.2f} GB), same loss: {same_loss}")


def check_diffusion(device_under_test: str, dut: str) -> None:
    """Section 3: the diffusion sampler, greedy against the CPU, then sampling at temperature > 0 through
    ``HFGenerator`` (which seeds a CPU generator whatever device the model is on)."""
    from t3s_ray.engines.hf import HFGenerator

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

    def sample(device: str, seed: int) -> list[dict]:
        gen = HFGenerator("builtin:tiny-dllm", temperature=1.0, top_p=0.95, topk_logprobs=0, dtype="float32",
                          device=device, sampler="diffusion", diffusion_steps=6, diffusion_block_length=4)
        rows = [{"id": str(i), "sample_index": 0, "prompt_text": p, "max_tokens": 12, "seed": seed}
                for i, p in enumerate(PROMPTS)]
        return gen.generate_rows(rows)

    first, again, other, cpu = (sample(device_under_test, 7), sample(device_under_test, 7),
                                sample(device_under_test, 8), sample("cpu", 7))
    errors = [r["error"] for r in first + again + other if r["finish_reason"] == "error"]
    tokens = [t for r in first + other for t in r["token_ids"]]
    mask = mask_token_id(tok, "", "builtin:tiny-dllm")
    in_vocab = bool(tokens) and all(0 <= t < len(tok) and t != mask for t in tokens)
    same = [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    check(f"diffusion sampler at temperature 1.0, top-p 0.95, on {dut} (seeded CPU generator)",
          not errors and same and in_vocab,
          f"{len(errors)} failed samples{' (' + errors[0][:120] + ')' if errors else ''}; same seed, same tokens: "
          f"{same}; {len(tokens)} tokens in the vocabulary, none the mask: {in_vocab}; another seed differs: "
          f"{[r['token_ids'] for r in other] != [r['token_ids'] for r in first]}; the same seed on the CPU gives "
          f"{sum(a['token_ids'] == b['token_ids'] for a, b in zip(first, cpu))}/3 equal sequences")


# LLaDA2.0-mini's width (hidden 2048, 16 heads / 4 key-value heads of 128, partial RoPE, 256 experts of
# 512 in 8 groups, top 8 of the 4 best groups, a shared expert, vocabulary 157,184) cut to 2 layers: the
# dense first layer and one MoE layer (0.82B of its 1.5B parameters).
LLADA2_MINI_2L = dict(vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=128, partial_rotary_factor=0.5,
                      num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, num_shared_experts=1,
                      moe_intermediate_size=512, first_k_dense_replace=1, routed_scaling_factor=2.5,
                      max_position_embeddings=32768, pad_token_id=156892, eos_token_id=156892)
LLADA2_SMALL = dict(LLADA2_MINI_2L, vocab_size=2048, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                    moe_intermediate_size=32, pad_token_id=2047, eos_token_id=2047)


class _Denoiser(torch.nn.Module):
    """The root FSDP module of a block-diffusion step: its forward is the whole loss
    (``denoiser_loss``), so that the lm head and final norm it holds are gathered for it, as the
    worker's ``LogprobModule`` does for the AR loss."""

    def __init__(self, model, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, batch):
        from t3s_ray.t3s.diffusion import denoiser_loss

        return denoiser_loss(self.model, batch, chunk_size=self.chunk_size)[0]


def _to(batch, device):
    import dataclasses

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})


def _llada2_rows(vocab: int, lengths: list[int], prompt: int, generator: torch.Generator):
    """Right-padded random rows: ids, padding mask, response mask (after ``prompt`` tokens), forced tokens
    (a fifth of the response, as T3S's yet-to-learn tokens)."""
    ids = torch.randint(8, vocab - 8, (len(lengths), max(lengths)), generator=generator)
    cols = torch.arange(max(lengths))[None]
    attention = (cols < torch.tensor(lengths)[:, None]).long()
    target = attention.bool() & (cols >= prompt)
    forced = target & (torch.rand(ids.shape, generator=generator) < 0.2)
    return ids, attention, target, forced


def _sdpa_kernels(run) -> list[str]:
    """The CUDA kernels of ``run()`` that implement attention, by name (memory-efficient: ``fmha_cutlass*``,
    cuDNN: ``cudnn*``, flash: ``flash*``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "cuda" in str(e.device_type).lower()}
    return sorted(n for n in names if any(k in n.lower() for k in ("fmha", "cutlass", "attention", "cudnn", "flash",
                                                                 "sdpa")))


def _kernel_kind(names: list[str]) -> str:
    joined = " ".join(names).lower()
    kinds = [kind for kind, key in (("memory-efficient", "fmha"), ("cuDNN", "cudnn"), ("flash", "flash"))
             if key in joined]
    return "+".join(kinds) or "none of memory-efficient/cuDNN/flash (math?)"


def check_llada2_tiny(device_under_test: str, dut: str) -> None:
    """Section 8, checks 1-2: builtin:tiny-llada2 in fp32 on the device against the CPU: the block-diffusion
    loss and its gradients, and the block sampler's tokens (with and without the prefix cache)."""
    from t3s_ray.models import fill_token_id
    from t3s_ray.t3s.diffusion import block_diffusion_generate, denoiser_loss, diffusion_batch

    tok = load_tokenizer("builtin:tiny-llada2")
    models_by_device = {d: load_model("builtin:tiny-llada2", dtype="float32").to(d) for d in ("cpu", device_under_test)}
    fill = fill_token_id(models_by_device["cpu"], tok)
    ids, attention, target, forced = _llada2_rows(len(tok), [40, 33, 21], 8, torch.Generator().manual_seed(0))
    worst = []
    for layout, fill_on in (("block", True), ("block", False), ("full", True)):
        batch = diffusion_batch(ids, attention, target, forced, mask_id=tok.mask_token_id, fill_id=fill, block_size=8,
                                layout=layout, fill=fill_on, generator=torch.Generator().manual_seed(1))
        got = {}
        for device, model in models_by_device.items():
            model.zero_grad(set_to_none=True)
            loss, logprobs = denoiser_loss(model, _to(batch, device), chunk_size=16)
            loss.backward()
            got[device] = (float(loss.detach()), logprobs.cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()
                                                         if p.grad is not None})
        (l_cpu, lp_cpu, g_cpu), (l_dut, lp_dut, g_dut) = got["cpu"], got[device_under_test]
        gdiff = max((g_cpu[n] - g_dut[n]).abs().max().item() / max(g_cpu[n].abs().max().item(), 1e-12) for n in g_cpu)
        worst.append((layout, fill_on, abs(l_cpu - l_dut) / abs(l_cpu), (lp_cpu - lp_dut).abs().max().item(), gdiff,
                      set(g_cpu) == set(g_dut), l_cpu))
    ok = all(ld < 1e-5 and lpd < 1e-4 and gd < 1e-3 and same for _, _, ld, lpd, gd, same, _ in worst)
    check(f"tiny-llada2 block-diffusion loss and gradients, {dut} fp32 vs CPU (layouts block, block without fill, "
          "full)", ok, "; ".join(f"{lay}{'' if f else ' no fill'}: loss {lc:.4f} rel diff {ld:.1e}, logprobs "
                                 f"{lpd:.1e}, gradients max rel {gd:.1e}" for lay, f, ld, lpd, gd, _, lc in worst))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    eos = {tok.eos_token_id, fill}
    out = {}
    for device, model in models_by_device.items():
        for cache in (True, False):
            out[device, cache] = [o["token_ids"] for o in block_diffusion_generate(
                model.eval(), prompts, 24, mask_id=tok.mask_token_id, eos_ids=eos, block_length=8, threshold=0.95,
                use_cache=cache)]
    same = out["cpu", True] == out[device_under_test, True] == out[device_under_test, False] == out["cpu", False]
    check(f"tiny-llada2 block sampler greedy, {dut} vs CPU, prefix cache vs none", same,
          f"{sum(len(t) for t in out['cpu', True])} tokens; {dut} cached vs CPU "
          f"{sum(a == b for a, b in zip(out['cpu', True], out[device_under_test, True]))}/3, {dut} cached vs "
          f"uncached {sum(a == b for a, b in zip(out[device_under_test, True], out[device_under_test, False]))}/3 "
          "sequences equal")


def _llada2_train(config, device: torch.device, length: int, prompt: int, chunk: int) -> dict:
    """Build, shard and run 3 block-diffusion steps (1 profiled warm-up + 2 timed) of ``config``; on CUDA
    with SDPA restricted to the memory-efficient and cuDNN kernels. Returns the times, losses, peak,
    parameter count, the error that stopped it (None) and what each SDPA backend does with the mask."""
    import contextlib

    from t3s_ray import distributed
    from t3s_ray.models import empty_model_from_config
    from t3s_ray.t3s.diffusion import diffusion_batch
    from t3s_ray.worker import fsdp_units

    if not torch.distributed.is_initialized():  # section 4 starts it; this runs on its own too
        distributed.init_process_group(device, timeout_s=300)
    model = empty_model_from_config(config, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    root = _Denoiser(model, chunk)
    distributed.shard_model(root, fsdp_units(model), bf16_compute=True)
    distributed.materialize(root, device)
    with torch.no_grad():
        for name, param in root.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    root.train()
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    ids, attention, target, forced = _llada2_rows(config.vocab_size, [length], prompt, generator)
    batch = _to(diffusion_batch(ids, attention, target, forced, mask_id=config.vocab_size - 2,
                                fill_id=config.pad_token_id, block_size=32, generator=generator), device)
    out = {"n_params": sum(p.numel() for p in root.parameters()), "backends": {}, "default": [], "kernels": [],
           "error": None, "steps": []}
    allowed = contextlib.nullcontext()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # What each allowed backend does with the layout's attention alone (forward and backward), and
        # what SDPA picks unrestricted.
        q = torch.randn(1, config.num_attention_heads, 2 * length, config.head_dim, device=device,
                        dtype=torch.bfloat16, requires_grad=True)

        def attend():
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=batch.attention_mask).sum().backward()

        for name, backend in (("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    attend()
                out["backends"][name] = "runs"
            except RuntimeError as e:
                out["backends"][name] = f"refused ({str(e).splitlines()[0][:80]})"
        out["default"] = _sdpa_kernels(attend)
        del q
        allowed = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = root(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(root.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["steps"].append((time.perf_counter() - started, float(loss.detach())))

    try:
        with allowed:
            if device.type == "cuda":
                out["kernels"] = _sdpa_kernels(step)  # the warm-up step, profiled
            else:
                step()
            step()
            step()
    except RuntimeError as e:  # "No available kernel": the math fallback was the only one left
        out["error"] = str(e).splitlines()[0][:200]
    out["peak"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return out


def _llada2_sample(config, device: torch.device, rows: int, prompt: int, answer: int) -> dict[bool, tuple]:
    """The block sampler on an unsharded bf16 model of ``config`` (initialised on the device), greedy at
    threshold 0.95, with the prefix cache and without (after a warm-up run on CUDA): per mode (seconds,
    tokens, stats, token ids)."""
    from t3s_ray.llada2 import LLaDA2MoeModelLM
    from t3s_ray.t3s.diffusion import block_diffusion_generate

    torch.manual_seed(0)
    with device:
        model = LLaDA2MoeModelLM._from_config(config, attn_implementation="sdpa").to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(8, config.vocab_size - 8, (prompt + 7 * i,), generator=generator).tolist()
               for i in range(rows)]
    runs = {}
    for cache in (True, False, True) if device.type == "cuda" else (True, False):  # the first warms CUDA up
        stats: dict = {}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = block_diffusion_generate(model, prompts, answer, mask_id=config.vocab_size - 2, eos_ids=set(),
                                       block_length=32, threshold=0.95, use_cache=cache, stats=stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs[cache] = (time.perf_counter() - started, sum(len(o["token_ids"]) for o in out), stats,
                       [o["token_ids"] for o in out])
    return runs


def check_llada2_mini(device_under_test: str, dut: str, small: bool) -> None:
    """Section 8, checks 3-5: a LLaDA2.0-mini-width model cut to 2 layers (dense + 256-expert MoE) under
    FSDP2 world 1, bf16 compute over fp32 masters, per-layer activation checkpointing: one block-diffusion
    step at L = 8,192 (2L = 16,384 through the decoder), its peak memory and time, with SDPA restricted to
    the memory-efficient and cuDNN kernels (a math fallback would raise) and the kernels that ran named;
    then the block sampler's tokens/s with and without the prefix cache (bf16, greedy, threshold 0.95: a
    random model passes none, one token a step, the slowest regime). The dry run: a small width, L = 128."""
    from t3s_ray.llada2 import LLaDA2MoeConfig

    config = LLaDA2MoeConfig(**(LLADA2_SMALL if small else LLADA2_MINI_2L))
    length, prompt = (128, 32) if small else (8192, 1024)
    device = torch.device(device_under_test, torch.cuda.current_device()) if device_under_test == "cuda" \
        else torch.device("cpu")
    got = _llada2_train(config, device, length, prompt, chunk=32 if small else 2048)
    gc.collect()  # FSDP2 modules sit in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times, losses = [t for t, _ in got["steps"][1:]], [lo for _, lo in got["steps"]]
    finite = len(losses) == 3 and all(math.isfinite(lo) for lo in losses)
    detail = got["error"] or (
        f"step {statistics.median(times):.2f} s ({2 * length / statistics.median(times):,.0f} tokens/s through the "
        f"decoder), loss {losses[0]:.3f} -> {losses[-1]:.3f}, peak allocated "
        + (f"{got['peak']:.1f} GB" if device.type == "cuda" else "n/a on the CPU"))
    cuda = device.type == "cuda"
    check(f"LLaDA2.0-mini width, 2 layers (dense + {config.num_experts} experts, {got['n_params'] / 1e6:,.1f}M "
          f"params), block-diffusion step at L = {length} (2L = {2 * length}), FSDP2 world 1, bf16/fp32-master/AC, "
          f"SDPA {'memory-efficient or cuDNN only' if cuda else 'as the CPU picks'}", got["error"] is None and finite,
          detail + (f"; attention kernels of the step: {_kernel_kind(got['kernels'])}" if cuda else ""))
    if cuda:
        check("SDPA with the block-diffusion mask: no math fallback", got["error"] is None and
              _kernel_kind(got["kernels"]) != _kernel_kind([]),
              f"alone: {', '.join(f'{k} {v}' for k, v in got['backends'].items())}; SDPA's own choice: "
              f"{_kernel_kind(got['default'])} ({', '.join(got['default'])[:200]}); the step's: "
              f"{', '.join(got['kernels'])[:200]}")
    rows, prompt, answer = (2, 40, 48) if small else (8, 256, 128)  # prompts spanning blocks, answers several
    runs = _llada2_sample(config, device, rows, prompt, answer)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    (t_c, n_c, s_c, tok_c), (t_n, n_n, s_n, tok_n) = runs[True], runs[False]
    agree = sum(a == b for x, y in zip(tok_c, tok_n) for a, b in zip(x, y)) / max(1, sum(len(x) for x in tok_c))
    check(f"LLaDA2.0-mini-width block sampler, {rows} rows x {answer} tokens, bf16: tokens/s with and without the "
          "prefix cache", n_c == n_n == rows * answer, f"cache {n_c / t_c:,.1f} tokens/s ({s_c['tokens_run']:,} tokens "
          f"run in {s_c['forwards']} forwards), no cache {n_n / t_n:,.1f} tokens/s ({s_n['tokens_run']:,} in "
          f"{s_n['forwards']}): {t_n / t_c:.2f}x; the same tokens at {agree:.1%} of the positions (bf16 rounds "
          "the two differently)")


def main() -> int:
    # --device cpu runs every comparison CPU against CPU: a dry run of this script without a GPU.
    device_under_test = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    if device_under_test == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu for a dry run)")
        return 2
    name = torch.cuda.get_device_name() if device_under_test == "cuda" else "CPU (dry run)"
    print(f"torch {torch.__version__} on {name}", flush=True)
    started = time.perf_counter()
    dut = device_under_test.upper()
    small = device_under_test != "cuda"

    section(1, "token confidence and the fused training loss")
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
    check(f"padding-free micro-batch ({attn.split(',')[0]}) vs padded, {dut}", packed_diff < (5e-2 if not attn.startswith("sdpa") else 1e-4),
          f"max |diff| of the confidences {packed_diff:.2e} ({attn})")

    section(2, "greedy generation (HFGenerator)")
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

    section(3, "the diffusion sampler (tiny denoiser)")
    check_diffusion(device_under_test, dut)

    check_worker(device_under_test, dut)  # sections 4 and 5
    section(6, "Qwen3-8B-shaped training on this one device, then a training step against plain Hugging Face")
    check_8b_shaped(device_under_test, small=small)
    check_step_vs_hf(device_under_test, small=small)
    section(7, "the fused loss at Qwen3-8B's lm-head shape: chunk size")
    check_loss_chunks(device_under_test, small=small)
    section(8, "LLaDA2: block-diffusion training and the block sampler")
    check_llada2_tiny(device_under_test, dut)
    check_llada2_mini(device_under_test, dut, small=small)
    section(9, "what this ran without")
    imported = sorted(m for m in ABSENT if m in sys.modules)
    check("nothing imported Ray, vLLM, pyarrow, datasets, math-verify or matplotlib", not imported,
          f"imported: {imported or 'none'}")

    if device_under_test == "cuda":
        section(10, "bench/confidence_memory.py on CUDA")
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "confidence_memory.py")], capture_output=True,
                              text=True)
        print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
        check("bench/confidence_memory.py on CUDA", proc.returncode == 0, f"exit {proc.returncode}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed{' (dry run)' if small else ''} in "
          f"{time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
