"""The per-GPU memory plan of FSDP training for the paper's students (arithmetic, no GPU needed).

Shapes are the public Hugging Face configs of Qwen/Qwen3-8B and Qwen/Qwen3-32B (nothing is
downloaded). Each row is what one GPU holds at the peak of a training step under FSDP2 with fp32
master weights, bf16 compute (``train.dtype: bfloat16``) and full activation checkpointing (every
decoder layer recomputed in backward), for ``--seq`` tokens per row and the configs' micro-batch:

* sharded, for the whole run: fp32 parameters 4P/N, fp32 gradients 4P/N, AdamW moments 8P/N;
* the FSDP root (final norm and lm head, which the chunked lm head reads directly) unsharded in bf16;
* the fused loss's lm-head gradient (``t3s.confidence._LinearTokenLoss``): an fp32 ``V x H``
  accumulator held from the forward pass to the backward, where it is scaled (a second fp32 copy)
  and cast to the parameter's bf16, next to the bf16 product of the last chunk: ~12 B x V x H at
  the start of backward (10 GB for Qwen3-32B's 778M-entry head);
* an untied input embedding is an FSDP unit of its own: all-gathered in bf16 for the first forward
  and again in backward, where its dense bf16 gradient and the fp32 copy FSDP reduce-scatters
  coexist: ~8 B x V x H (Qwen3-8B and -32B do not tie their embeddings);
* one decoder layer all-gathered in bf16, with the next one prefetched, and its fp32 gradient;
* activations: the checkpointed input of every layer (bf16, T x hidden each), plus the working set
  of the one layer being recomputed and backpropagated (about twice its forward activations);
* the chunked lm head: a few fp32 [chunk x vocab] tensors (never the [T x vocab] logits), at the
  configs' ``train.confidence_chunk`` (2048: 3.7 GB at Qwen3's vocabulary);
* with several micro-batches a step and ``train.fsdp_reduce_every_micro_batch: false``, the whole
  fp32 gradient accumulated unsharded between micro-batches (4P): shown apart, since the configs
  for 80 GB GPUs reduce every micro-batch instead.

These are estimates from tensor sizes (an allocator adds fragmentation, NCCL its buffers, CUDA its
context, ~3-5 GB together); ``bench/gpu_check.py`` measures the real peak of an 8B-shaped model on
one GPU. Run: python bench/memory_plan.py [--seq 16384]

LLaDA2.0-mini (``--llada2``; the shape of its public config, as ``t3s_ray.llada2.LLaDA2MoeConfig``'s
defaults: 16.26B parameters, 19 of its 20 layers a mixture of 256 experts) trained by blocks on 8 GPUs
under FSDP2 without expert parallelism (every GPU all-gathers a whole MoE layer, 0.82B parameters, in
its turn), on rows of ``--seq`` tokens in the ``[noisy ; clean]`` layout (2 x seq tokens through the
decoder); the activations of the MoE layer being recomputed follow ``llada2.py``'s dispatch: every
(token, expert) slot of the top 8 carries a hidden-size row, in bf16 into the experts and in fp32 out
of them, several copies (gathered inputs, outputs, weighted, concatenated, reordered) and as many
gradients. And its block sampler at an evaluation batch: the bf16 weights, the prefix KV cache, one
block's fp32 logits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate + 2 * self.hidden \
            + 2 * self.head_dim

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden

    def layer_activation_bytes(self, tokens: int) -> int:
        """bf16 forward activations of one decoder layer (norm, q/k/v, attention output, o_proj, MLP)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * tokens * (4 * self.hidden + 2 * q + 2 * kv + 3 * self.intermediate)


QWEN3_8B = Shape("Qwen3-8B", 4096, 12288, 36, 32, 8, 128, 151936)
QWEN3_32B = Shape("Qwen3-32B", 5120, 25600, 64, 64, 8, 128, 151936)


def plan(shape: Shape, gpus: int, micro_batch: int, seq: int, chunk: int = 2048) -> dict[str, float]:
    p, tokens = shape.params, micro_batch * seq
    head = shape.vocab * shape.hidden
    rows = {
        "fp32 params (sharded)": 4 * p / gpus,
        "fp32 grads (sharded)": 4 * p / gpus,
        "AdamW moments (sharded)": 8 * p / gpus,
        "root: lm head bf16 (unsharded)": 2 * head,
        "fused loss: lm-head grad at backward": 12 * head,
        "untied embedding unit in backward": 8 * head,
        "layer all-gather x2 bf16 + fp32 grad": 2 * 2 * shape.layer_params + 4 * shape.layer_params,
        "activations: layer inputs (AC)": 2 * tokens * shape.hidden * shape.layers,
        "activations: one layer recomputed": 2 * shape.layer_activation_bytes(tokens),
        "chunked lm head (fp32)": 3 * 4 * chunk * shape.vocab,
    }
    rows["total"] = sum(rows.values())
    return {k: v / GB for k, v in rows.items()}


@dataclass
class MoeShape:
    """A LLaDA2 / Ling 2.0 network: ``first_dense`` SwiGLU layers, the rest a mixture of ``experts``
    (``top_k`` routed a token, plus ``shared`` experts) of width ``expert_intermediate``."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    expert_intermediate: int
    top_k: int
    shared: int
    first_dense: int

    @property
    def attention_params(self) -> int:
        return self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * \
            self.hidden + 2 * self.head_dim + 2 * self.hidden  # fused QKV, dense, QK-norms, the layer's two norms

    @property
    def moe_layer_params(self) -> int:
        return self.attention_params + 3 * self.hidden * self.expert_intermediate * (self.experts + self.shared) + \
            self.experts * self.hidden  # experts, shared expert(s), router

    @property
    def params(self) -> int:
        dense = self.attention_params + 3 * self.hidden * self.intermediate
        return self.first_dense * dense + (self.layers - self.first_dense) * self.moe_layer_params + \
            2 * self.vocab * self.hidden + self.hidden


LLADA2_MINI = MoeShape("LLaDA2.0-mini", hidden=2048, intermediate=5120, layers=20, heads=16, kv_heads=4, head_dim=128,
                       vocab=157184, experts=256, expert_intermediate=512, top_k=8, shared=1, first_dense=1)


def llada2_plan(shape: MoeShape, gpus: int, micro_batch: int, seq: int, chunk: int = 2048) -> dict[str, float]:
    """Per-GPU bytes of block-diffusion training (see the module docstring), in GB."""
    p, head = shape.params, shape.vocab * shape.hidden
    tokens = 2 * micro_batch * seq  # [noisy ; clean]
    slots = tokens * shape.top_k
    moe = shape.moe_layer_params
    rows = {
        "fp32 params (sharded)": 4 * p / gpus,
        "fp32 grads (sharded)": 4 * p / gpus,
        "AdamW moments (sharded)": 8 * p / gpus,
        "root: lm head bf16 (unsharded)": 2 * head,
        "fused loss: lm-head grad at backward": 12 * head,
        "untied embedding unit in backward": 8 * head,
        "MoE layer all-gather x2 bf16 + fp32 grad": 2 * 2 * moe + 4 * moe,
        "activations: layer inputs (AC)": 2 * tokens * shape.hidden * shape.layers,
        # one [2L, 2L] boolean mask, and SDPA's additive bf16 copy of it for the memory-efficient kernel
        "block mask (bool + bf16 bias)": 3 * tokens * tokens,
        # one MoE layer recomputed, at the end of its forward (its backward holds about as much): per
        # (token, expert) slot a bf16 row of gathered inputs and four fp32 rows (the weighted expert
        # outputs, which the product saves, their list, concatenated, reordered), and the experts' four
        # bf16 inner activations (gate, up, SiLU, product) of expert width
        "activations: one MoE layer recomputed": slots * shape.hidden * (2 + 4 * 4) +
        slots * shape.expert_intermediate * 4 * 2,
        "chunked lm head (fp32, noisy half only)": 3 * 4 * chunk * shape.vocab,
    }
    rows["total"] = sum(rows.values())
    return {k: v / GB for k, v in rows.items()}


def llada2_sampler_plan(shape: MoeShape, batch: int, prompt: int, max_tokens: int, block: int = 32) -> dict[str, float]:
    """One GPU sampling ``batch`` answers by blocks (``t3s.diffusion.block_diffusion_generate`` with its
    prefix cache), in GB: what stays and the largest per-step transient."""
    columns = -(-(prompt + max_tokens) // block) * block
    rows = {
        "bf16 weights": 2 * shape.params,
        "prefix KV cache (bf16 K and V, every layer)": 2 * 2 * batch * shape.kv_heads * columns * shape.head_dim *
        shape.layers,
        # one layer's cached K and V expanded to every query head (grouped-query attention, repeat_kv)
        "a step: K and V expanded to the query heads": 2 * 2 * batch * shape.heads * columns * shape.head_dim,
        # the block's logits in the head's bf16, then fp32, its log-softmax and its softmax
        "a step: the block's logits": batch * block * shape.vocab * (2 + 3 * 4),
    }
    rows["total"] = sum(rows.values())
    return {k: v / GB for k, v in rows.items()}


def print_llada2(seq: int, chunk: int) -> None:
    shape = LLADA2_MINI
    print(f"{shape.name}: {shape.params / 1e9:.2f}B parameters ({shape.moe_layer_params / 1e9:.2f}B a MoE layer), "
          f"sharded over 8 GPUs (FSDP2, no expert parallelism), micro-batch 1 x {seq} tokens "
          f"([noisy ; clean]: {2 * seq}), confidence_chunk {chunk} (configs/llada2-mini-dllm.yaml)")
    rows = llada2_plan(shape, 8, 1, seq, chunk)
    for key, value in rows.items():
        print(f"  {key:42s} {value:7.1f} GB")
    unsharded = 4 * shape.params / GB
    print(f"  (gradients reduced once per step instead: + {unsharded:.1f} GB unsharded fp32 gradient = "
          f"{rows['total'] + unsharded:.1f} GB: the config reduces every micro-batch)")
    print(f"{shape.name} block sampler on one GPU, eval batch 16, 512-token prompts, 8,192-token answers:")
    for key, value in llada2_sampler_plan(shape, 16, 512, 8192).items():
        print(f"  {key:44s} {value:7.1f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384, help="tokens per row (data.max_seq_len)")
    parser.add_argument("--chunk", type=int, default=0, help="train.confidence_chunk (default: each config's)")
    parser.add_argument("--llada2", action="store_true", help="LLaDA2.0-mini's plan (block diffusion, 8 GPUs); "
                        "--seq defaults to 8192 there")
    args = parser.parse_args()
    if args.llada2:
        print_llada2(args.seq if args.seq != 16384 else 8192, args.chunk or 2048)
        return
    # (shape, GPUs the state is sharded over, micro-batch, confidence_chunk, where)
    setups = [(QWEN3_8B, 8, 2, 2048, "configs/qwen3-8b-boba200.yaml, 8x H100/H200"),
              (QWEN3_32B, 16, 1, 1024, "configs/qwen3-32b.yaml, 16x H100, flat FSDP"),
              (QWEN3_32B, 8, 2, 2048, "Qwen3-32B on 8x H200 (141 GB), or 2 nodes x 8 H200 with "
               "train.fsdp_shard_size: 8 (hybrid: each GPU holds a node's 1/8)")]
    for shape, gpus, mb, chunk, where in setups:
        chunk = args.chunk or chunk
        print(f"{shape.name}: {shape.params / 1e9:.2f}B parameters, sharded over {gpus} GPUs, micro-batch {mb} x "
              f"{args.seq} tokens, confidence_chunk {chunk} ({where})")
        rows = plan(shape, gpus, mb, args.seq, chunk)
        for key, value in rows.items():
            print(f"  {key:38s} {value:7.1f} GB")
        unsharded = 4 * shape.params / GB
        print(f"  (gradients reduced once per step instead: + {unsharded:.1f} GB unsharded fp32 gradient = "
              f"{rows['total'] + unsharded:.1f} GB)")
        print(f"  (DDP would hold 16 B/param = {16 * shape.params / GB:.0f} GB per GPU before activations; "
              f"rank 0's host reads θ0 once: {2 * shape.params / GB:.1f} GB in bf16)")


if __name__ == "__main__":
    main()
