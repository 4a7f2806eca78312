"""The T3S algorithm core: confidence, selection rules, losses and diagnostics.

Plain torch (no Ray): every function works on padded ``[B, T]`` batches aligned with
``input_ids`` and is unit tested on small hand-computed tensors.
"""

from .confidence import (
    gather_log_softmax,
    linear_token_loss,
    token_confidence,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
    token_loss_and_confidence,
)
from .diagnostics import gradient_conflict, rrt_merge
from .losses import (
    dllm_forced_mask,
    dllm_loss,
    masked_token_loss,
    normalize_token_losses,
    token_loss_weights,
    topk_kd_loss,
)
from .selection import (
    KEEP_ALL,
    KEEP_METHODS,
    cap_anchor_frac,
    delta_latest,
    ema_update,
    keep_mask,
    select_delta,
    select_forced,
    select_top_frac,
)

__all__ = [
    "KEEP_ALL",
    "KEEP_METHODS",
    "cap_anchor_frac",
    "delta_latest",
    "dllm_forced_mask",
    "dllm_loss",
    "ema_update",
    "gather_log_softmax",
    "gradient_conflict",
    "keep_mask",
    "linear_token_loss",
    "masked_token_loss",
    "normalize_token_losses",
    "rrt_merge",
    "select_delta",
    "select_forced",
    "select_top_frac",
    "token_confidence",
    "token_logprobs_from_hidden",
    "token_logprobs_from_logits",
    "token_loss_and_confidence",
    "token_loss_weights",
    "topk_kd_loss",
]
