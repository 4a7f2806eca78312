"""LLaDA2 (inclusionAI LLaDA2.0, ``model_type: llada2_moe``), written for this project from the
architecture and weight-compatible with the Hub checkpoints; in causal mode also BailingMoeV2
(Ling 2.0, ``BailingMoeV2ForCausalLM``), the same network trained autoregressively.

Why a native class: the Hub's remote code does not import under transformers 5
(``is_torch_fx_available`` and ``ROPE_INIT_FUNCTIONS["default"]`` are gone, and its v4-style
``_tied_weights_keys`` list breaks ``save_pretrained``), and its attention would turn the padded 2-D
mask of a batch into a causal one. Ling-mini-2.0's remote code has the same imports, hence the
causal mode. See ``docs/llada2.md`` for the design and what still has to be verified on the real
checkpoint.

The network (every name below is a state-dict key of the Hub checkpoint):
  * ``model.word_embeddings`` (padding row = ``pad_token_id``, as the official module, so the EOS
    fill token's embedding gets no gradient there either), ``model.norm``, an untied ``lm_head``;
  * per layer ``model.layers.N.``: ``input_layernorm``, ``attention.query_key_value`` (fused
    Q | K | V, grouped-query), ``attention.query_layernorm`` / ``key_layernorm`` (RMSNorm per head,
    ``use_qk_norm``), ``attention.dense``, ``post_attention_layernorm``, and ``mlp``: a SwiGLU MLP
    (``gate_proj``, ``up_proj``, ``down_proj``) for the first ``first_k_dense_replace`` layers, else a
    mixture of experts: ``mlp.gate.weight`` and the ``mlp.gate.expert_bias`` buffer,
    ``mlp.experts.E.{gate,up,down}_proj``, ``mlp.shared_experts.{gate,up,down}_proj``;
  * partial RoPE: the first ``head_dim * partial_rotary_factor`` dimensions of each head rotate;
  * the router: fp32 logits, sigmoid scores; ``expert_bias`` is added for the *choice* only; experts
    come in ``n_group`` groups, a group scored by the sum of its two best (biased) experts, the
    ``topk_group`` best groups kept, the ``num_experts_per_tok`` best experts chosen among them; their
    unbiased scores, normalised to sum 1, times ``routed_scaling_factor`` weight the experts' outputs,
    to which the shared expert's output is added.

Attention is never causal by itself in diffusion mode: ``attention_mask`` is None (every token sees
every token) or an explicit 4-D ``[B or 1, 1, q, k]`` mask, boolean (True = may attend) or additive.
A 2-D padding mask is refused when it has zeros (it says nothing about blocks), and accepted when it
is all ones. ``position_ids`` are taken as given (the block-diffusion layout repeats positions).
``past_key_values`` is any object with transformers' cache method ``update(key, value, layer_idx)``
(a ``DynamicCache``, or the block sampler's prefix cache): keys are cached after RoPE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

__all__ = [
    "BailingMoeV2Config",
    "BailingMoeV2ForCausalLM",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "group_limited_topk",
    "register",
]

MODEL_TYPE = "llada2_moe"
BAILING_V2_ARCHITECTURE = "BailingMoeV2ForCausalLM"


@strict
class LLaDA2MoeConfig(PreTrainedConfig):
    """The Hub's ``configuration_llada2_moe.LLaDA2MoeConfig`` keys; defaults are LLaDA2.0-mini's (but
    for the token ids, which a real config always names).

    Keys of the Hub config that the network does not read (``rotary_dim``, ``norm_softmax``,
    ``use_rmsnorm``, ``router_dtype``, ...) are kept as attributes and written back on save.
    """

    model_type = MODEL_TYPE
    causal = False  # class attribute, not a key: BailingMoeV2Config sets it
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None  # empty: hidden_size / num_attention_heads (LLaDA2.0-mini: 128)
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    use_qk_norm: bool = True
    rms_norm_eps: float | int = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float | int = 600000.0
    partial_rotary_factor: float | int = 0.5
    rope_scaling: dict | None = None
    num_experts: int = 256
    num_shared_experts: int | None = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float | int = 2.5
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    score_function: str = "sigmoid"
    norm_head: bool = False
    attention_dropout: float | int = 0.0
    initializer_range: float | int = 0.02
    output_router_logits: bool = False
    use_cache: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None  # LLaDA2.0-mini: 156892 (<|endoftext|>), the EOS fill token
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        rope_parameters = getattr(self, "rope_parameters", None)  # transformers-5-style configs (newer Ling)
        if isinstance(rope_parameters, dict):
            self.rope_theta = rope_parameters.get("rope_theta", self.rope_theta)
            if rope_parameters.get("rope_type", "default") != "default" and self.rope_scaling is None:
                self.rope_scaling = dict(rope_parameters)
        problems = []
        if self.score_function != "sigmoid":
            problems.append(f"score_function {self.score_function!r} (only 'sigmoid' is implemented)")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            problems.append(f"{self.num_experts} experts in {self.n_group} groups, {self.topk_group} kept")
        if self.rope_scaling and (self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")) != "default":
            problems.append(f"rope_scaling {self.rope_scaling} (only the default RoPE is implemented)")
        if self.norm_head:
            problems.append("norm_head: true (a normalised lm head is not implemented)")
        if getattr(self, "use_sliding_window", False):
            problems.append("use_sliding_window: true (not implemented)")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"{self.num_attention_heads} heads for {self.num_key_value_heads} key-value heads")
        if problems:
            raise ValueError(f"{self.model_type} config: unsupported {'; '.join(problems)}")

    @property
    def rotary_dims(self) -> int:
        """How many leading dimensions of each head RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)


class BailingMoeV2Config(LLaDA2MoeConfig):
    """Ling 2.0 (``BailingMoeV2ForCausalLM``): LLaDA2's network with causal attention. Its Hub
    ``model_type`` is ``bailing_moe``, which Ling 1.x (another network) shares, so ``models`` picks
    this class by the architecture, and it is not registered with ``AutoConfig``. The multi-token
    prediction layers (``num_nextn_predict_layers``) are not built: their weights are ignored."""

    model_type = "bailing_moe"
    causal = True


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class LLaDA2MoeRMSNorm(nn.Module):
    """RMSNorm normalised in fp32, scaled in the input's dtype (as the official module)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class LLaDA2MoeRotaryEmbedding(nn.Module):
    """Default RoPE over ``config.rotary_dims`` dimensions. Named and shaped as transformers' rotary
    modules (``inv_freq``, ``original_inv_freq``, ``compute_default_rope_parameters``) so that the
    library recomputes the (non-persistent) frequencies after a meta-device load."""

    rope_type = "default"

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.config = config
        inv_freq, _ = self.compute_default_rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: LLaDA2MoeConfig, device=None, seq_len=None):
        dim = config.rotary_dims
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[B, T, rotary_dims]`` (computed in fp32, returned in ``dtype``)."""
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_partial_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate the first ``cos.shape[-1]`` dimensions of ``q``, ``k`` (``[B, heads, T, head_dim]``)."""
    cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]

    def rotate(x):
        return torch.cat((x[..., :rot] * cos + _rotate_half(x[..., :rot]) * sin, x[..., rot:]), dim=-1)

    return rotate(q), rotate(k)


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU: the dense layers, each expert and the shared expert."""

    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def group_limited_topk(choice: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """``[N, top_k]`` expert indices: the ``top_k`` best of ``choice`` ``[N, E]`` among the experts of
    the ``topk_group`` best groups (``E / n_group`` consecutive experts each), a group scored by the
    sum of its two best experts (its only one when groups have one expert)."""
    n, experts = choice.shape
    per_group = experts // n_group
    group_scores = choice.view(n, n_group, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
    groups = group_scores.topk(topk_group, dim=-1).indices
    allowed = torch.zeros(n, n_group, dtype=torch.bool, device=choice.device).scatter_(1, groups, True)
    allowed = allowed.repeat_interleave(per_group, dim=1)
    return choice.masked_fill(~allowed, float("-inf")).topk(top_k, dim=-1).indices


class LLaDA2MoeGate(nn.Module):
    """The router, in fp32 whatever the compute dtype (autocast off)."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[N, H]`` -> (expert indices ``[N, k]``, fp32 weights ``[N, k]``)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
            chosen = group_limited_topk(scores + self.expert_bias.float(), self.n_group, self.topk_group, self.top_k)
            weights = scores.gather(1, chosen)
            if self.top_k > 1:  # the official gate normalises whenever it picks more than one
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            return chosen, weights * self.routed_scaling_factor


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts plus the shared expert(s)."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        # Ling 2.0 configs may name the shared expert's width; LLaDA2's is experts' width x their number.
        shared = getattr(config, "moe_shared_expert_intermediate_size", None) or \
            (config.moe_intermediate_size * (config.num_shared_experts or 0))
        self.shared_experts = LLaDA2MoeMLP(config, shared) if config.num_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        chosen, weights = self.gate(flat)
        # The (token, slot) pairs sorted by expert: each expert runs once on its own tokens (one host
        # sync for the counts), then the outputs go back to their slots. Gathers rather than
        # index_add_, which is slow on a CPU under load.
        slots = chosen.flatten()
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=self.num_experts).tolist()
        tokens_in_order = flat[order // chosen.shape[1]]
        weights_in_order = weights.flatten()[order, None]
        outputs, unused, start = [], None, 0
        for e, n in enumerate(counts):
            if n == 0:
                # An expert no token chose still gets a (zero) gradient: FSDP2 reduce-scatters every
                # parameter of a unit on every rank, DDP waits for every parameter's gradient, and a
                # rank whose routing left an expert empty would otherwise hold None there.
                if torch.is_grad_enabled():
                    zero = sum(p.sum() for p in self.experts[e].parameters()) * 0.0
                    unused = zero if unused is None else unused + zero
                continue
            part = slice(start, start + n)
            outputs.append(self.experts[e](tokens_in_order[part]).float() * weights_in_order[part])
            start += n
        if not outputs:  # no token at all
            outputs.append(flat.new_zeros((0, flat.shape[-1]), dtype=torch.float32))
        per_slot = torch.cat(outputs)[order.argsort()]  # back to (token, slot) order
        out = per_slot.view(*chosen.shape, -1).sum(1)
        if unused is not None:
            out = out + unused.float()
        out = out.to(x.dtype).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, kv_heads, T, d]`` -> ``[B, kv_heads * groups, T, d]`` (grouped-query attention). Explicit
    rather than SDPA's ``enable_gqa``, which the memory-efficient kernel (the one that takes a
    boolean mask on GPUs) does not support."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.query_layernorm = self.key_layernorm = None
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, past_key_values: Any = None) -> torch.Tensor:
        b, q, _ = x.shape
        qkv = self.query_key_value(x).view(b, q, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.split([self.num_heads, self.num_kv_heads,
                                                                   self.num_kv_heads], dim=2))
        if self.query_layernorm is not None:
            query, key = self.query_layernorm(query), self.key_layernorm(key)
        query, key = apply_partial_rope(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            scores = (query @ key.transpose(2, 3)) / math.sqrt(self.head_dim)
            if is_causal:
                mask = torch.ones(q, key.shape[2], dtype=torch.bool, device=x.device).tril(key.shape[2] - q)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(query.dtype), dropout, self.training)
            out = probs @ value
        else:
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.to(query.dtype)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal)
        return self.dense(out.transpose(1, 2).reshape(b, q, self.num_heads * self.head_dim))


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention and MLP with residuals. A ``GradientCheckpointingLayer``: after
    ``gradient_checkpointing_enable`` each layer recomputes its activations in backward (non-
    reentrant with ``use_reentrant: False``)."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        dense = config.num_experts is None or layer_idx < config.first_k_dense_replace
        self.mlp = (LLaDA2MoeMLP(config, config.intermediate_size) if dense else LLaDA2MoeSparseMoeBlock(config))
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal: bool = False, past_key_values: Any = None):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, is_causal, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    config: LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Not flash attention: it cannot take the block-diffusion mask (transformers refuses to load
    # the model with attn_implementation="flash_attention_*", naming the model class).
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LLaDA2MoeGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.expert_bias)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """The decoder: embeddings, layers, final norm; returns the last hidden states."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LLaDA2MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        causal = type(self.config).causal
        if causal and use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 0
        mask, is_causal, position_ids = attention_inputs(attention_mask, position_ids, hidden.shape[:2], past,
                                                         causal, hidden.device)
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, is_causal=is_causal, past_key_values=past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values if causal and use_cache else None)


def attention_inputs(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, shape, past: int,
                     causal: bool, device) -> tuple[torch.Tensor | None, bool, torch.Tensor]:
    """(4-D mask or None, SDPA's ``is_causal``, position ids) of a forward over ``shape`` = (B, q) new
    tokens after ``past`` cached ones.

    Diffusion mode: None and 4-D masks pass as they are; a 2-D mask must be all ones (it then means
    None). Causal mode: a 2-D padding mask (over past + new keys) becomes a causal 4-D mask in which
    every query also sees itself (a left-padded row's padding then attends to something instead of
    producing NaN); without a mask, packed rows (positions restarting at 0) get a causal mask per
    sequence; positions default to the running count of real tokens.
    """
    batch, q = shape
    if attention_mask is not None and attention_mask.dim() not in (2, 4):
        raise ValueError(f"attention_mask must be 2-D [B, T] or 4-D [B, 1, q, k], got shape "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False, _positions(position_ids, None, batch, q, past, device)
    if not causal:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "LLaDA2 attention takes no 2-D padding mask: its attention is bidirectional (or block-causal through "
                "an explicit 4-D mask), and a padded [B, T] mask says nothing about blocks. Pass attention_mask=None "
                "(full bidirectional) or a 4-D boolean [B, 1, q, k] mask; t3s_ray.t3s.diffusion builds the "
                "block-diffusion ones.")
        return None, False, _positions(position_ids, None, batch, q, past, device)
    position_ids = _positions(position_ids, attention_mask, batch, q, past, device)
    if attention_mask is None and past == 0:
        starts = (position_ids == 0).long().cumsum(-1)  # sequence index of each token of a packed row
        if bool((starts[:, -1] <= 1).all()):
            return None, q > 1, position_ids
        same = starts[:, :, None] == starts[:, None, :]
        return (same & torch.ones(q, q, dtype=torch.bool, device=device).tril())[:, None], False, position_ids
    keys = past + q
    rows = torch.arange(q, device=device)[:, None] + past
    cols = torch.arange(keys, device=device)[None, :]
    mask = (cols <= rows)[None].expand(batch, q, keys)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, -keys:]
    mask = mask | (cols == rows)[None]
    return mask[:, None], False, position_ids


def _positions(position_ids, attention_mask, batch, q, past, device):
    if position_ids is not None:
        return position_ids.expand(batch, q) if position_ids.shape[0] == 1 else position_ids
    if attention_mask is not None and attention_mask.dim() == 2:
        counted = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return counted[:, -q:]
    return torch.arange(past, past + q, device=device)[None].expand(batch, q)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """LLaDA2: the decoder (``model``, as ``get_decoder()``) and an untied ``nn.Linear`` lm head, so
    that the project's chunked lm-head losses and the block sampler (``t3s.diffusion``) use the
    hidden states and the head's weight without forming every position's logits. ``forward``
    returns all of them, in the head's dtype (the official class upcasts to fp32)."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}  # used only when tied

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)


class BailingMoeV2ForCausalLM(LLaDA2MoeModelLM, GenerationMixin):
    """Ling 2.0 (the AR selector of LLaDA2.0): the same network in causal mode, with ``generate``."""

    config_class = BailingMoeV2Config
    config: BailingMoeV2Config


_REGISTERED = False


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` know ``llada2_moe`` in this
    process, so that a saved folder loads without remote code (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, LLaDA2MoeConfig, exist_ok=True)
    AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel, exist_ok=True)
    AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)
    _REGISTERED = True


register()
