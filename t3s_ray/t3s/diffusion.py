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
"""

from __future__ import annotations

from typing import Any

import torch

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
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return _inverse_cdf_sample(probs.reshape(-1, probs.shape[-1]), generator).reshape(probs.shape[:-1])


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
