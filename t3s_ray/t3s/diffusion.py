"""Sampling from a masked-diffusion LM (dLLM students): iterative unmasking with low-confidence remasking.

The sampler of LLaDA (Nie et al., 2025, "Large Language Diffusion Models", Alg. 5 with semi-
autoregressive blocks): the answer starts as ``max_tokens`` mask tokens after the prompt; the answer
is cut into blocks of ``block_length`` filled left to right; each block gets ``steps / n_blocks``
denoising steps. At every step the model predicts every position at once, a token is drawn at each
still-masked position of the current block, and only the ``k`` drawn tokens the model is most
confident about (probability of the drawn token) are kept; the others stay masked for the next step.
``k`` is the block's size spread evenly over its steps (the first steps take the remainder).

The answer ends at the first end-of-sequence token (the model fills the rest with EOS). The log-
probability reported for a token is that of the step that committed it.

Rows of a batch are laid out ``[prompt][answer masks][padding]``, each starting at column 0, so a
model with absolute positions sees the same positions as for a batch of one.

LLaDA2 (``llada2_moe``) is trained and decoded otherwise, by blocks aligned to position 0 under a
block-causal mask; this module also holds that maths (``docs/llada2.md`` gives the design):

* training (dFactory's regime): :func:`diffusion_batch` lays a batch out as ``[noisy ; clean]``
  (length 2L, positions ``[0..L-1, 0..L-1]``, :func:`block_diffusion_mask`), rows filled with the EOS
  token to a whole number of blocks (maskable and supervised), one σ ~ U(lo, hi) per row, T3S's
  forced tokens always masked in the noisy half (the prompt never); :func:`denoiser_loss` is the
  no-shift CE over the masked noisy positions, through the chunked lm head (no ``[rows × T × V]``
  logits);
* decoding: :func:`block_diffusion_generate`, the block-causal threshold sampler, with or without
  the prefix key/value cache (:class:`PrefixKVCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .confidence import _separable_lm_head, gather_log_softmax, linear_token_loss, scatter_to_positions
from .losses import dllm_forced_mask
from .selection import uniform


def transfer_schedule(block_size: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` steps commits so that ``block_size`` tokens are committed."""
    steps = max(1, min(steps, block_size))
    base, extra = divmod(block_size, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per position: argmax at temperature 0, else nucleus sampling at ``temperature``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = _sampling_probs(logits, temperature, top_p)
    return _inverse_cdf_sample(probs.reshape(-1, probs.shape[-1]), generator).reshape(probs.shape[:-1])


def _sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The tempered probabilities with the tail beyond ``top_p`` set to 0 (not renormalised)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs


def _draw_with_confidence(logits: torch.Tensor, temperature: float, top_p: float,
                          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, confidence): as :func:`_draw`, with the probability of each drawn token in the
    distribution it was drawn from (the softmax at temperature 0; else tempered, cut at ``top_p``
    and renormalised), which the block sampler compares with its threshold, as LLaDA2's own
    ``generate`` does."""
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
    probs = _sampling_probs(logits, temperature, top_p)
    tokens = _inverse_cdf_sample(probs.reshape(-1, probs.shape[-1]), generator).reshape(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None])[..., 0] / probs.sum(-1)


def _inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs`` ([N, V], rows summing to > 0) drawn by inverting its CDF with one
    uniform per row, the uniforms drawn on the generator's device and moved to ``probs``' device.

    ``torch.multinomial`` needs a generator on the probabilities' own device (a seeded CPU generator
    fails on CUDA probabilities), and its draws differ between CPU and CUDA for the same seed. Here
    only N uniforms cross devices (not N x V probabilities), and a seed gives the same uniforms on
    every device, hence the same tokens on CPU and GPU except where a uniform falls within rounding
    of a CDF boundary.
    """
    cdf = probs.cumsum(-1)
    # A token of probability 0 (the mask token, the tail cut by top-p) must never be drawn, whatever
    # the rounding of a (parallel) cumsum: it gets its predecessor's value, and cummax makes the CDF
    # non-decreasing, so the first index whose CDF exceeds u always has probability > 0.
    cdf = torch.where(probs > 0, cdf, torch.zeros((), dtype=cdf.dtype, device=cdf.device)).cummax(-1).values
    total = cdf[:, -1:].contiguous()
    u = uniform((probs.shape[0], 1), device=probs.device, generator=generator).to(cdf.dtype) * total
    drawn = torch.searchsorted(cdf, u, right=True)
    # u * total can round up to total; the last token of probability > 0 is the first to reach it
    return torch.minimum(drawn, torch.searchsorted(cdf, total))[:, 0]


@torch.inference_mode()
def diffusion_generate(model, prompts: list[list[int]], max_tokens: int, *, mask_id: int, pad_id: int,
                       eos_ids: set[int], steps: int = 0, block_length: int = 32, temperature: float = 0.0,
                       top_p: float = 1.0, generator: torch.Generator | None = None) -> list[dict[str, Any]]:
    """Generate ``max_tokens`` answer tokens for each prompt (token id lists) with ``model``.

    ``steps`` is the total number of denoising steps over the whole answer (0: one per token, the most
    accurate and slowest). Returns per prompt: ``token_ids`` (cut after the first EOS), ``logprobs``
    (of each token at the step that committed it, under the untempered model), ``finish_reason``.
    """
    if max_tokens <= 0:
        return [{"token_ids": [], "logprobs": [], "finish_reason": "length"} for _ in prompts]
    device = next(model.parameters()).device
    batch, lengths = len(prompts), torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + max_tokens
    x = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, total), dtype=torch.long, device=device)
    for b, ids in enumerate(prompts):
        x[b, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        x[b, len(ids):len(ids) + max_tokens] = mask_id
        attention[b, :len(ids) + max_tokens] = 1
    answer_cols = lengths[:, None] + torch.arange(max_tokens, device=device)[None, :]  # [B, G]
    committed_logprob = torch.zeros((batch, max_tokens), device=device)

    block_length = max(1, min(block_length, max_tokens))
    n_blocks = -(-max_tokens // block_length)
    steps = steps or max_tokens
    steps_per_block = max(1, steps // n_blocks)
    rows = torch.arange(batch, device=device)[:, None]
    for block in range(n_blocks):
        lo, hi = block * block_length, min(max_tokens, (block + 1) * block_length)
        cols = answer_cols[:, lo:hi]  # [B, n]: this block's columns in each row
        for k in transfer_schedule(hi - lo, steps_per_block):
            logits = model(input_ids=x, attention_mask=attention).logits
            block_logits = logits[rows, cols].float()  # [B, n, V]
            block_logits[..., mask_id] = float("-inf")  # an answer token is never the mask itself
            logprobs = block_logits.log_softmax(-1)
            drawn = _draw(block_logits, temperature, top_p, generator)
            confidence = logprobs.gather(-1, drawn[..., None])[..., 0]
            still_masked = x[rows, cols] == mask_id
            confidence = confidence.masked_fill(~still_masked, float("-inf"))
            chosen = confidence.topk(k, dim=-1).indices  # [B, k]: the k most confident masked positions
            valid = still_masked.gather(1, chosen)
            b_idx, j_idx = rows.expand_as(chosen)[valid], chosen[valid]
            x[b_idx, cols[b_idx, j_idx]] = drawn[b_idx, j_idx]
            committed_logprob[b_idx, lo + j_idx] = confidence[b_idx, j_idx]
    results = []
    answers = x[rows, answer_cols].tolist()
    for b in range(batch):
        ids = answers[b]
        end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), None)
        results.append({"token_ids": ids[:end] if end else ids,
                        "logprobs": committed_logprob[b, :end or max_tokens].tolist(),
                        "finish_reason": "stop" if end else "length"})
    return results


# --------------------------------------------------------------------------------------------
# Block diffusion (LLaDA2): masks, the training layout and loss
# --------------------------------------------------------------------------------------------

LAYOUTS = ("block", "full")


def blocks_ceil(n: torch.Tensor | int, block_size: int):
    """``n`` rounded up to a whole number of blocks."""
    return -(-n // block_size) * block_size


def block_causal_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """``[length, length]`` bool, True where query t may attend key s: s's block (blocks of
    ``block_size`` from position 0) is t's or an earlier one. LLaDA2's decoding mask."""
    blocks = torch.arange(length, device=device) // block_size
    return blocks[None, :] <= blocks[:, None]


def block_diffusion_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """``[2L, 2L]`` bool over the ``[noisy ; clean]`` layout of L tokens (dFactory's training mask):
    a noisy token sees its own block of the noisy half and the strictly earlier blocks of the clean
    half; a clean token sees its own and the earlier blocks of the clean half, never the noisy half.
    So noisy block k is denoised from exactly what decoding gives it: the clean blocks before it."""
    blocks = torch.arange(length, device=device) // block_size
    same = blocks[:, None] == blocks[None, :]
    earlier = blocks[None, :] < blocks[:, None]
    noisy_rows = torch.cat([same, earlier], dim=1)
    clean_rows = torch.cat([torch.zeros_like(same), same | earlier], dim=1)
    return torch.cat([noisy_rows, clean_rows], dim=0)


@dataclass
class DenoiserBatch:
    """A batch laid out for a LLaDA2 denoiser's forward (:func:`diffusion_batch`).

    ``input_ids``/``position_ids``: ``[B, 2L]`` (``[noisy ; clean]``, layout ``block``) or ``[B, L]``
    (the noisy tokens, layout ``full``); ``attention_mask``: 4-D bool; ``targets``: ``[B, L]`` clean
    tokens (the fill included); ``masked``: ``[B, L]`` bool, the masked noisy positions (the loss's);
    ``maskable``: ``[B, L]`` bool (response and fill tokens); ``sigma``: ``[B]`` masking rates.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    masked: torch.Tensor
    maskable: torch.Tensor
    sigma: torch.Tensor

    @property
    def length(self) -> int:
        return self.targets.shape[1]


def diffusion_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                    forced: torch.Tensor, *, mask_id: int, fill_id: int, block_size: int = 32,
                    layout: str = "block", fill: bool = True, mask_lo: float = 0.3, mask_hi: float = 0.8,
                    generator: torch.Generator | None = None) -> DenoiserBatch:
    """Noise a right-padded batch (``[B, T]`` ids, padding mask, response mask, T3S forced tokens)
    for a LLaDA2 denoiser, as dFactory trains it.

    * Rows are cut into blocks of ``block_size`` from position 0; the batch is widened to
      L = T rounded up to whole blocks. With ``fill``, each row's tail up to its own last block's end
      holds ``fill_id`` (LLaDA2: ``<|endoftext|>``), maskable and supervised like response tokens,
      which teaches the model to end an answer inside its block; the batch's padding beyond that is
      ``fill_id`` too, but never masked nor supervised.
    * One σ ~ U(``mask_lo``, ``mask_hi``) per row; each maskable token masked with probability σ,
      and the forced tokens (response positions only) always: :func:`~t3s_ray.t3s.losses.dllm_forced_mask`
      on the noisy copy only. The prompt is never masked.
    * ``layout="block"``: input ``[noisy ; clean]`` (2L), positions ``[0..L-1, 0..L-1]``, the mask of
      :func:`block_diffusion_mask` (one ``[1, 1, 2L, 2L]`` mask for every row: a row's batch padding
      is in later blocks than any of its tokens, which therefore never see it). Without ``fill`` the
      tail of a row's last block is hidden from every query by a per-row mask ``[B, 1, 2L, 2L]``.
      ``layout="full"``: input the noisy tokens, bidirectional over each row's own tokens (and fill).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    batch, width = input_ids.shape
    device = input_ids.device
    length = blocks_ceil(width, block_size)
    cols = torch.arange(length, device=device)
    real = attention_mask.bool()
    lengths = real.sum(-1)
    if not bool((real == (cols[None, :width] < lengths[:, None])).all()):
        raise ValueError("diffusion_batch needs right-padded rows (the padding mask must be 1s then 0s)")
    own_end = blocks_ceil(lengths, block_size) if fill else lengths
    fill_mask = (cols[None] >= lengths[:, None]) & (cols[None] < own_end[:, None])

    def widen(t: torch.Tensor, value) -> torch.Tensor:
        out = torch.full((batch, length), value, dtype=t.dtype, device=device)
        out[:, :width] = t
        return out

    clean = widen(torch.where(real, input_ids, torch.full_like(input_ids, fill_id)), fill_id)
    response = widen(target_mask.bool() & real, False)
    maskable = response | fill_mask
    noisy, masked, sigma = dllm_forced_mask(clean, maskable, widen(forced.bool(), False) & response, mask_id,
                                            mask_lo, mask_hi, generator=generator)
    positions = cols[None].expand(batch, length)
    visible = cols[None] < own_end[:, None]  # [B, L]: the keys a row's own tokens may see
    if layout == "full":
        return DenoiserBatch(noisy, positions, visible[:, None, None, :], clean, masked, maskable, sigma)
    mask = block_diffusion_mask(length, block_size, device)[None, None]
    if not fill:
        mask = mask & torch.cat([visible, visible], dim=1)[:, None, None, :]
    return DenoiserBatch(torch.cat([noisy, clean], dim=1), torch.cat([positions, positions], dim=1), mask, clean,
                         masked, maskable, sigma)


def denoiser_loss(model, batch: DenoiserBatch, loss_weights: torch.Tensor | None = None,
                  chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logprobs)`` of a denoiser on a :class:`DenoiserBatch`: ``loss = Σ w · CE`` over the
    masked noisy positions, no shift (hidden row t predicts token t), and the detached ``[B, L]``
    fp32 log-probabilities of the targets there (0 elsewhere).

    ``loss_weights`` ``[B, L]`` default to ``masked / Σ masked``: the mean CE over the masked tokens,
    with no 1/σ weighting (dFactory's loss). Only the noisy half's hidden states reach the lm head, and
    through :func:`~t3s_ray.t3s.confidence.linear_token_loss` chunk by chunk (the head's own forward is
    never called, no ``[rows × T × V]`` logits exist). A model without a separable ``nn.Linear`` head
    falls back to its full logits.
    """
    masked = batch.masked
    if loss_weights is None:
        loss_weights = masked.float() / masked.sum().clamp(min=1)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": batch.position_ids}
    length = batch.length
    parts = _separable_lm_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :length]
        logprobs, b_idx, t_idx = gather_log_softmax(logits, masked, batch.targets, shift=False,
                                                    chunk_size=chunk_size, checkpoint_chunks=torch.is_grad_enabled())
        logprobs = scatter_to_positions(logprobs, b_idx, t_idx, masked.shape)
        return -(loss_weights * logprobs).sum(), logprobs.detach()
    decoder, lm_head = parts
    hidden = decoder(**inputs).last_hidden_state[:, :length]
    return linear_token_loss(hidden, lm_head.weight, batch.targets, masked, loss_weights, chunk_size,
                             lm_head_bias=lm_head.bias, shift=False)


# --------------------------------------------------------------------------------------------
# Block diffusion (LLaDA2): the block-causal threshold sampler
# --------------------------------------------------------------------------------------------


class PrefixKVCache:
    """The block sampler's key/value cache: per layer one ``[B, kv_heads, T, head_dim]`` buffer over
    the whole canvas, written at explicit columns. A model's attention calls ``update(key, value,
    layer_idx)`` (transformers' cache protocol) with the keys (after RoPE) and values of the tokens it
    runs; they are written at ``columns`` of ``rows`` and the first ``kv_len`` columns of those rows
    are returned, which the attention mask then restricts.

    Exact under a block-causal mask: a block's keys and values depend only on it and earlier blocks,
    so once a block is final they never change; a row's columns past its current block may hold
    stale values, which its mask hides."""

    def __init__(self, batch: int, length: int):
        self.batch, self.length = batch, length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None
        self.kv_len = 0

    def at(self, rows: torch.Tensor, columns: torch.Tensor, kv_len: int) -> "PrefixKVCache":
        """Set where the next forward writes (``columns`` ``[len(rows), q]``) and how much it reads."""
        self.rows, self.columns, self.kv_len = rows, columns, kv_len
        return self

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        if layer_idx not in self.keys:
            shape = (self.batch, key.shape[1], self.length, key.shape[3])
            self.keys[layer_idx], self.values[layer_idx] = key.new_zeros(shape), value.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self.rows[:, None]
        keys[rows, :, self.columns] = key.transpose(1, 2)
        values[rows, :, self.columns] = value.transpose(1, 2)
        if self.rows.numel() == self.batch:  # every row, in order: a view, no copy
            return keys[:, :, :self.kv_len], values[:, :, :self.kv_len]
        return keys[self.rows, :, :self.kv_len], values[self.rows, :, :self.kv_len]


def _descending_rank(values: torch.Tensor) -> torch.Tensor:
    """Each entry's place when its row is sorted in descending order (ties: the earlier column first)."""
    order = values.argsort(dim=-1, descending=True, stable=True)
    places = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)


def _run(model, parts, ids, mask, positions, cache, need_logits: bool):
    """The decoder's hidden states of ``ids`` (``[a, q, H]``), or the model's own output (``parts``
    None: a model without a separable head; then logits)."""
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    if cache is not None:
        inputs["past_key_values"] = cache
    if parts is None:
        return model(**inputs).logits if need_logits else None
    return parts[0](**inputs).last_hidden_state


@torch.inference_mode()
def block_diffusion_generate(model, prompts: list[list[int]], max_tokens: int, *, mask_id: int, eos_ids: set[int],
                             block_length: int = 32, steps_per_block: int = 0, threshold: float = 0.95,
                             temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                             use_cache: bool = True, stats: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """LLaDA2's decoding (its ``generate``, dInfer's and SGLang's threshold decoding) for a batch.

    The canvas of a row is its prompt then masks, up to a whole number of blocks of ``block_length``
    counted from position 0, so the block holding the prompt's tail is the first one decoded. Each
    row decodes its current block under a block-causal mask, seeing only the columns before the
    block's end (never later blocks): per step the model predicts the block, a token is drawn at each
    still-masked position (greedy at temperature 0, else seeded by ``generator``; the mask token
    never), and every position whose confidence (the drawn token's probability) exceeds
    ``threshold`` is committed, or else the most confident ones (1 per step when ``steps_per_block``
    is the block length; in general the block spread over ``steps_per_block`` steps, so a block never
    takes more steps). Rows advance independently: a row whose block is complete moves to the next;
    it stops after a block that holds an EOS in its answer, or at ``max_tokens``.

    Logits are formed for the current block's positions only. ``use_cache``: the committed blocks'
    keys and values are cached (:class:`PrefixKVCache`; prompt blocks prefilled once, a completed
    block run once more to store its final values) and each step runs only the current block;
    without it every step runs the whole prefix. Both give the same tokens (the mask makes the prefix's
    values independent of what follows). ``stats`` (a dict) receives ``forwards`` and ``tokens_run``.

    Returns per prompt: ``token_ids`` (cut after the first EOS), ``logprobs`` (of each token under
    the untempered model at the step that committed it), ``finish_reason``.
    """
    if max_tokens <= 0:
        return [{"token_ids": [], "logprobs": [], "finish_reason": "length"} for _ in prompts]
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    device = next(model.parameters()).device
    size = block_length
    schedule = torch.tensor(transfer_schedule(size, steps_per_block or size), device=device)
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(blocks_ceil(int(lengths.max()) + max_tokens, size))
    x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    for b, ids in enumerate(prompts):
        x[b, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    committed_logprob = torch.zeros((batch, total), device=device)
    answer_end = lengths + max_tokens
    block = lengths // size  # each row's current block: the one holding its first answer position
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    columns = torch.arange(total, device=device)
    in_block = torch.arange(size, device=device)
    parts = _separable_lm_head(model)
    cache = PrefixKVCache(batch, total) if use_cache else None
    counts = {"forwards": 0, "tokens_run": 0}

    def run(rows, ids, mask, positions, need_logits):
        counts["forwards"] += 1
        counts["tokens_run"] += ids.numel()
        return _run(model, parts, ids, mask, positions, cache, need_logits)

    def cached_block(rows, cols, ends, need_logits):
        """The block ``cols`` of ``rows`` against the cache: its keys and values written, the
        columns before each row's block end read."""
        kv_len = int(ends.max())
        cache.at(rows, cols, kv_len)
        mask = (columns[None, :kv_len] < ends[:, None])[:, None, None, :]
        return run(rows, x[rows[:, None], cols], mask, cols, need_logits)

    prefix = int(block.max()) * size
    if cache is not None and prefix:  # the prompts' complete blocks, once
        rows = torch.arange(batch, device=device)
        cache.at(rows, columns[None, :prefix].expand(batch, prefix), prefix)
        run(rows, x[:, :prefix], block_causal_mask(prefix, size, device)[None, None],
            columns[None, :prefix].expand(batch, prefix), need_logits=False)
    while bool(active.any()):
        rows = active.nonzero()[:, 0]
        starts = block[rows] * size
        cols = starts[:, None] + in_block  # [a, size]
        ends = starts + size
        if cache is not None:
            out = cached_block(rows, cols, ends, need_logits=True)
            picked = out
        else:
            width = int(ends.max())
            out = run(rows, x[rows, :width], block_causal_mask(width, size, device)[None, None],
                      columns[None, :width].expand(len(rows), width), need_logits=True)
            picked = out[torch.arange(len(rows), device=device)[:, None], cols]
        logits = (picked if parts is None else parts[1](picked)).float()
        logits[..., mask_id] = float("-inf")  # an answer token is never the mask itself
        current = x[rows[:, None], cols]
        still = current == mask_id
        tokens, confidence = _draw_with_confidence(logits, temperature, top_p, generator)
        logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        confidence = confidence.masked_fill(~still, float("-inf"))
        k = torch.minimum(schedule[steps[rows]], still.sum(-1))  # [a] the fallback's count
        above = confidence > threshold
        fallback = _descending_rank(confidence) < k[:, None]
        commit = torch.where((above.sum(-1) >= k)[:, None], above, fallback) & still
        x[rows[:, None], cols] = torch.where(commit, tokens, current)
        committed_logprob[rows[:, None], cols] = torch.where(commit, logprobs, committed_logprob[rows[:, None], cols])
        steps[rows] += 1
        complete = ~(still & ~commit).any(-1)
        if not bool(complete.any()):
            continue
        done_rows, done_ends = rows[complete], ends[complete]
        window = (columns[None] >= lengths[done_rows, None]) & \
                 (columns[None] < torch.minimum(done_ends, answer_end[done_rows])[:, None])
        finished = (torch.isin(x[done_rows], eos) & window).any(-1) | (done_ends >= answer_end[done_rows])
        active[done_rows[finished]] = False
        moving = done_rows[~finished]
        if len(moving):
            if cache is not None:  # the completed block's final keys and values
                cached_block(moving, cols[complete][~finished], done_ends[~finished], need_logits=False)
            block[moving] += 1
            steps[moving] = 0
    if stats is not None:
        stats.update(counts)
    results = []
    for b in range(batch):
        start = int(lengths[b])
        ids = x[b, start:start + max_tokens].tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), None)
        results.append({"token_ids": ids[:end] if end else ids,
                        "logprobs": committed_logprob[b, start:start + (end or max_tokens)].tolist(),
                        "finish_reason": "stop" if end else "length"})
    return results
