"""Token confidence: teacher-forced log-probabilities of the trace's own tokens.

``c_t(θ) = log p_θ(y_t | y_<t, x)`` is read off the log-softmax of the logits at position
``t - 1``.  Every per-token tensor in this package is ``[B, T]`` and aligned with ``input_ids``:
position ``t`` holds the quantity *for the token* ``input_ids[b, t]``, and is 0 wherever
``target_mask`` is False (prompt, padding, position 0).

Training uses :func:`token_loss_and_confidence`: the weighted CE and the confidences from one
pass, with the lm head's gradients formed chunk by chunk *in the forward pass* (the loss weights
are known before it), so that backward neither keeps nor recomputes any logits. That is what
makes the step as fast as a plain Hugging Face step while holding only ``O(chunk_size · V)``.

Why the chunking: at V = 49k, T = 1024, B = 4 the fp32 logits and their log-softmax are 0.8 GB
each, and in training autograd would keep them alive until the backward pass.  Here only the target
positions are gathered (prompt and padding rows cost nothing) and their logits are formed and
normalised ``chunk_size`` rows at a time, so the extra memory is ``O(chunk_size · V)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "gather_log_softmax",
    "linear_token_loss",
    "packed_attention_kwargs",
    "scatter_to_positions",
    "token_confidence",
    "token_logprobs_from_hidden",
    "token_logprobs_from_logits",
    "token_loss_and_confidence",
    "uses_flash_attention",
]

# Config attributes of Hugging Face models whose lm head output is post-processed (Gemma's
# final softcapping, Cohere's logit_scale, Granite's logits_scaling, ...).  For such models
# ``hidden @ W.T`` is not the logits, so token_confidence uses the full forward instead.
_LOGIT_POSTPROCESSING_CONFIG_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def gather_log_softmax(
    source: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    chunk_size: int = 256,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    checkpoint_chunks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 log-softmax over the vocabulary, evaluated only at selected positions and labels.

    This is the one place where vocabulary-sized tensors are formed; every loss and confidence
    in the package goes through it.

    Args:
        source: ``[B, T, V]`` logits, or ``[B, T, H]`` hidden states when ``project`` maps rows
            ``[n, H]`` to logits ``[n, V]``.
        positions: ``[B, T]`` bool, the positions ``t`` to evaluate.
        labels: ``[B, T]`` or ``[B, T, K]`` vocabulary ids; the values at ``positions`` are read.
        shift: True (autoregressive) reads the distribution from source row ``t - 1``, the row
            that predicts token ``t``; positions at ``t = 0`` are ignored.  False (diffusion
            denoiser) reads row ``t`` itself.
        chunk_size: number of selected positions (flattened sequence by sequence over the
            batch) whose logits are formed at once.  Peak extra memory is a small
            multiple (2-3) of ``chunk_size · V · 4`` bytes.
        project: maps source rows to logits (an lm head); None means source already is logits.
        checkpoint_chunks: recompute each chunk in backward (``torch.utils.checkpoint``) instead
            of letting autograd keep every chunk's fp32 logits alive until backward.

    Returns:
        ``(logprobs, batch_index, position_index)``: ``logprobs`` is fp32 ``[N]`` (or ``[N, K]``)
        for the N selected positions in row-major order, with their coordinates.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    positions = positions.bool()
    if shift:
        positions = positions.clone()
        positions[:, 0] = False  # nothing predicts the first token
    batch_index, position_index = positions.nonzero(as_tuple=True)
    source_index = position_index - 1 if shift else position_index
    selected_labels = labels[batch_index, position_index]

    def chunk_logprobs(
        source: torch.Tensor, rows_b: torch.Tensor, rows_t: torch.Tensor, rows_labels: torch.Tensor
    ) -> torch.Tensor:
        # The row gather happens inside the (possibly checkpointed) function so that autograd
        # saves only a reference to `source`, never a copy of the gathered rows.
        rows = source[rows_b, rows_t]
        logits = (project(rows) if project is not None else rows).float()
        log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
        if rows_labels.dim() == 1:
            return (logits.gather(-1, rows_labels[:, None]) - log_normaliser).squeeze(-1)
        return logits.gather(-1, rows_labels) - log_normaliser

    chunks = []
    for start in range(0, batch_index.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (source, batch_index[chunk], source_index[chunk], selected_labels[chunk])
        if checkpoint_chunks:
            chunks.append(checkpoint(chunk_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(chunk_logprobs(*args))
    if chunks:
        logprobs = torch.cat(chunks)
    else:
        # No selected position: an empty result that is still attached to `source`'s graph, so
        # a loss built from it can be backpropagated (to zero gradients) without special cases.
        logprobs = source.new_zeros(selected_labels.shape, dtype=torch.float32)
        logprobs = logprobs + source.flatten()[:0].sum().float()
    return logprobs, batch_index, position_index


def scatter_to_positions(
    values: torch.Tensor, batch_index: torch.Tensor, position_index: torch.Tensor, shape
) -> torch.Tensor:
    """Place per-position ``values`` ``[N]`` into a zero ``[B, T]`` fp32 tensor (differentiable)."""
    out = torch.zeros(tuple(shape), dtype=torch.float32, device=values.device)
    return out.index_put((batch_index, position_index), values.float())


def _default_checkpointing(*tensors: torch.Tensor | None) -> bool:
    """Checkpoint when a backward pass will follow: grad mode on and some input needs grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def token_logprobs_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """``[B, T]`` fp32 log-probabilities of each target token from ``[B, T, V]`` logits.

    Position ``t`` holds ``log_softmax(logits[b, t-1].float())[input_ids[b, t]]`` where
    ``target_mask[b, t]``, else 0.  The log-softmax is formed in fp32 ``chunk_size`` target rows
    at a time, so even for bf16 logits no ``B×T×V`` fp32 tensor is created.  Differentiable
    w.r.t. ``logits``; with grad enabled each chunk is recomputed in backward rather than stored.
    """
    logprobs, batch_index, position_index = gather_log_softmax(
        logits,
        target_mask,
        input_ids,
        chunk_size=chunk_size,
        checkpoint_chunks=_default_checkpointing(logits),
    )
    return scatter_to_positions(logprobs, batch_index, position_index, input_ids.shape)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    chunk_size: int = 256,
    lm_head_bias: torch.Tensor | None = None,
    checkpoint_chunks: bool | None = None,
) -> torch.Tensor:
    """``[B, T]`` fp32 target-token log-probabilities from last hidden states ``[B, T, H]``.

    The lm head (``hidden @ lm_head_weight.T + lm_head_bias``) is applied only to the rows that
    predict a target token, ``chunk_size`` rows at a time, so neither the ``B×T×V`` logits nor
    their fp32 log-softmax ever exist whole.  The projection runs in the weights' dtype (as the
    model's own forward does) and the normalisation in fp32.

    This is differentiable and is what the training loss is built from (``CE_t = -logprob_t``).
    ``checkpoint_chunks`` (default: grad enabled and some input requires grad) recomputes each
    chunk's logits in backward, so autograd holds ``O(chunk_size · V)`` rather than ``O(N · V)``.
    """
    if checkpoint_chunks is None:
        checkpoint_chunks = _default_checkpointing(hidden, lm_head_weight, lm_head_bias)
    logprobs, batch_index, position_index = gather_log_softmax(
        hidden,
        target_mask,
        input_ids,
        chunk_size=chunk_size,
        project=lambda rows: F.linear(rows, lm_head_weight, lm_head_bias),
        checkpoint_chunks=checkpoint_chunks,
    )
    return scatter_to_positions(logprobs, batch_index, position_index, input_ids.shape)


def _separable_lm_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) when logits are exactly ``lm_head(decoder(...).last_hidden_state)``."""
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_POSTPROCESSING_CONFIG_KEYS):
        return None
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(lm_head, torch.nn.Linear):
        return None
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if not isinstance(decoder, torch.nn.Module):
        return None
    return decoder, lm_head


def uses_flash_attention(model) -> bool:
    """Whether the model's attention is a flash-attention kernel (``flash_attention_2``/``3``, a hub
    kernel such as ``kernels-community/flash-attn``): "flash" in its name, transformers' own test."""
    return "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def packed_attention_kwargs(cu_seq_lens: torch.Tensor, max_seq_len: int) -> dict[str, torch.Tensor | int]:
    """The flash-attention keyword arguments of a packed row (transformers' ``FlashAttentionKwargs``):
    the cumulative sequence lengths ``[0, n_1, n_1 + n_2, ...]`` (int32) and the longest sequence,
    for queries and keys alike."""
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": int(max_seq_len), "max_length_k": int(max_seq_len)}


def _model_inputs(model, input_ids, attention_mask, position_ids, cu_seq_lens, max_seq_len) -> dict:
    """The decoder's keyword arguments. A packed row (no attention mask) under flash attention also
    gets its sequence boundaries: without them transformers re-derives them from ``position_ids`` in
    every layer's attention, a device-to-host sync per layer; the other kernels ignore them (sdpa and
    eager separate the sequences through the mask built from ``position_ids``)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False}
    if cu_seq_lens is not None and attention_mask is None and uses_flash_attention(model):
        inputs.update(packed_attention_kwargs(cu_seq_lens.to(input_ids.device), max_seq_len))
    return inputs


def token_confidence(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_mask: torch.Tensor,
    chunk_size: int = 256,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """``c_t(θ)``: ``[B, T]`` fp32 confidence of a Hugging Face causal LM in its current state.

    Runs the decoder to get the last hidden states and applies the lm head chunk-wise through
    :func:`token_logprobs_from_hidden`, so the model's full logits are never built.  Tied
    embeddings need nothing special (the output embedding *is* the input embedding), and bf16
    models are normalised in fp32.  Models whose logits are post-processed after the lm head
    (final logit softcapping, logit scaling), or that expose no ``nn.Linear`` output embedding
    and separable decoder, use the full forward and :func:`token_logprobs_from_logits`: still
    correct and fp32-normalised in chunks, but the model's own logits are materialised.

    Runs under the caller's grad mode: wrap in ``torch.no_grad()`` for scoring passes; with grad
    enabled the result is differentiable and can feed the training loss directly.
    ``position_ids`` with ``attention_mask=None``: a padding-free batch (see
    :func:`token_loss_and_confidence`, also for ``cu_seq_lens`` and ``max_seq_len``).
    """
    input_ids = input_ids.to(model.device) if hasattr(model, "device") else input_ids
    attention_mask = attention_mask.to(input_ids.device) if attention_mask is not None else None
    target_mask = target_mask.to(input_ids.device)
    inputs = _model_inputs(model, input_ids, attention_mask, position_ids, cu_seq_lens, max_seq_len)
    parts = _separable_lm_head(model)
    if parts is None:
        return token_logprobs_from_logits(model(**inputs).logits, input_ids, target_mask, chunk_size)
    decoder, lm_head = parts
    hidden = decoder(**inputs).last_hidden_state
    return token_logprobs_from_hidden(
        hidden, lm_head.weight, input_ids, target_mask, chunk_size, lm_head_bias=lm_head.bias
    )


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the surrounding code runs in: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


class _LinearTokenLoss(torch.autograd.Function):
    """``loss = Σ_n w_n · (−log softmax(h_n Wᵀ + b)[y_n])`` and the log-probabilities, with the
    gradients of ``h``, ``W`` and ``b`` formed chunk by chunk during the forward pass.

    ``d loss / d logits_n = w_n · (softmax_n − onehot(y_n))`` needs only the chunk's own logits, so
    each chunk's logits are used for the value, then turned in place into that gradient and
    multiplied back through the lm head: nothing vocabulary-sized outlives its chunk, and backward
    only scales the stored gradients by the upstream scalar. Versus recomputing each chunk in
    backward this saves one lm-head matmul per token; the price is the fp32 ``W`` gradient
    (``V · H · 4`` bytes) held from forward to backward.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, labels, loss_weights, chunk_size, compute_dtype):
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        n = rows.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        with torch.autocast(device_type=rows.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            for start in range(0, n, chunk_size):
                chunk = slice(start, start + chunk_size)
                h, y = rows[chunk].to(compute_dtype), labels[chunk]
                logits = F.linear(h, w, b).float()
                log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
                logprobs[chunk] = logits.gather(-1, y[:, None]).squeeze(-1) - log_normaliser.squeeze(-1)
                if not (need_rows or need_weight or need_bias):
                    continue
                grad_logits = logits.sub_(log_normaliser).exp_()  # softmax, in the logits' memory
                grad_logits[torch.arange(y.numel(), device=y.device), y] -= 1
                grad_logits = grad_logits.mul_(loss_weights[chunk, None]).to(compute_dtype)
                if need_rows:
                    grad_rows[chunk] = (grad_logits @ w).to(rows.dtype)
                if need_weight:
                    if compute_dtype == torch.float32:
                        grad_weight.addmm_(grad_logits.T, h)
                    else:
                        grad_weight.add_(grad_logits.T @ h)
                if need_bias:
                    grad_bias.add_(grad_logits.sum(0))
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.input_dtypes = (rows.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(logprobs)
        return -(loss_weights * logprobs).sum(), logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs):
        grads = [None if g is None else (g * grad_loss).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)]
        return (*grads, None, None, None, None)


def linear_token_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    loss_weights: torch.Tensor,
    chunk_size: int = 256,
    lm_head_bias: torch.Tensor | None = None,
    shift: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logprobs)``: ``loss = Σ_t loss_weights[t] · CE_t`` over the target positions and the
    detached ``[B, T]`` fp32 log-probabilities (the confidences), from last hidden states.

    The same values as ``-(loss_weights * token_logprobs_from_hidden(...)).sum()``, but the lm
    head's backward is done chunk by chunk in the forward pass (see ``_LinearTokenLoss``): no
    logits are kept for backward and none are recomputed. Without grad (or with no input that
    needs one) nothing but the log-probabilities is computed. ``shift=False`` (a diffusion
    denoiser): hidden row ``t`` predicts token ``t`` itself, as in :func:`gather_log_softmax`.
    """
    positions = target_mask.bool().clone()
    if shift:
        positions[:, 0] = False  # nothing predicts the first token
    batch_index, position_index = positions.nonzero(as_tuple=True)
    rows = hidden[batch_index, position_index - 1 if shift else position_index]
    labels = input_ids[batch_index, position_index]
    weights = loss_weights[batch_index, position_index].float()
    dtype = _compute_dtype(hidden.device, lm_head_weight)
    loss, logprobs = _LinearTokenLoss.apply(rows, lm_head_weight, lm_head_bias, labels, weights, chunk_size, dtype)
    return loss, scatter_to_positions(logprobs, batch_index, position_index, input_ids.shape)


def token_loss_and_confidence(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_mask: torch.Tensor,
    loss_weights: torch.Tensor,
    chunk_size: int = 256,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    max_seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's forward: ``(Σ_t loss_weights[t] · CE_t, c_t detached)`` of a Hugging Face
    causal LM, from one decoder pass and :func:`linear_token_loss` (models whose logits are
    post-processed fall back to their full logits, as in :func:`token_confidence`).

    ``position_ids`` with ``attention_mask=None`` is a padding-free batch: several sequences
    concatenated in one row, positions restarting at 0 at each (``batching.MicroBatch``). Its
    ``cu_seq_lens`` (int32 ``[0, n_1, n_1 + n_2, ...]``) and ``max_seq_len`` go to flash attention
    as they are, when the model runs it, instead of being derived from ``position_ids`` in every layer.
    """
    parts = _separable_lm_head(model)
    inputs = _model_inputs(model, input_ids, attention_mask, position_ids, cu_seq_lens, max_seq_len)
    if parts is None:
        logprobs = token_logprobs_from_logits(model(**inputs).logits, input_ids, target_mask, chunk_size)
        return -(loss_weights * logprobs).sum(), logprobs.detach()
    decoder, lm_head = parts
    hidden = decoder(**inputs).last_hidden_state
    return linear_token_loss(hidden, lm_head.weight, input_ids, target_mask, loss_weights, chunk_size,
                             lm_head_bias=lm_head.bias)
