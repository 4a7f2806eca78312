"""Training losses: masked next-token CE (SFT / T3S), the dLLM forced-mask objective, top-k KD.

Per-token inputs are ``[B, T]`` and aligned like confidence (position t is the token
``input_ids[b, t]``).  Vocabulary-sized work goes through
:func:`t3s_ray.t3s.confidence.gather_log_softmax`, so it is fp32 and chunked everywhere.
"""

from __future__ import annotations

import torch

from .confidence import gather_log_softmax, scatter_to_positions
from .selection import uniform

__all__ = [
    "NORMALIZATIONS",
    "dllm_forced_mask",
    "dllm_loss",
    "masked_token_loss",
    "normalize_token_losses",
    "token_loss_weights",
    "topk_kd_loss",
]

NORMALIZATIONS = ("token_mean", "sum", "seq_mean")
DLLM_WEIGHTINGS = ("none", "inv_t")

# Probabilities below this are treated as this inside logarithms (top-k KD tail bucket).
_PROB_FLOOR = 1e-12


def normalize_token_losses(token_losses: torch.Tensor, keep_mask: torch.Tensor, normalization: str = "token_mean"):
    """Reduce per-token losses ``[B, T]`` over the kept positions to a scalar.

    * ``token_mean``: ``Σ keep·loss / max(1, Σ keep)`` (the paper's T3S loss).
    * ``sum``: ``Σ keep·loss``.
    * ``seq_mean``: mean, over sequences with at least one kept token, of that sequence's mean
      kept loss (every sequence weighs the same whatever its length).

    Values outside ``keep_mask`` are ignored even when they are inf or NaN.  With nothing kept
    the result is a 0 that is still attached to the graph.
    """
    keep_mask = keep_mask.bool()
    kept_losses = torch.where(keep_mask, token_losses, torch.zeros((), device=token_losses.device))
    if normalization == "sum":
        return kept_losses.sum()
    if normalization == "token_mean":
        return kept_losses.sum() / keep_mask.sum().clamp(min=1)
    if normalization == "seq_mean":
        kept_per_sequence = keep_mask.sum(-1)
        sequence_means = kept_losses.sum(-1) / kept_per_sequence.clamp(min=1)
        return sequence_means.sum() / (kept_per_sequence > 0).sum().clamp(min=1)
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")


def token_loss_weights(keep_mask: torch.Tensor, normalization: str, denominator: float) -> torch.Tensor:
    """``[B, T]`` fp32 weights ``w`` with ``Σ w · CE`` = this micro-batch's share of the step's loss.

    ``denominator`` is the whole step's normaliser (every micro-batch of every rank, see
    ``training.steps.loss_denominator``): kept tokens for ``token_mean``, sequences with a kept token for
    ``seq_mean``, 1 for ``sum``. Summed over micro-batches the shares give
    :func:`normalize_token_losses` of the whole batch, however it was split.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
    weights = keep_mask.float()
    if normalization == "seq_mean":  # each sequence's kept tokens share that sequence's weight
        weights = weights / keep_mask.sum(-1, keepdim=True).clamp(min=1)
    return weights / denominator


def masked_token_loss(token_logprobs: torch.Tensor, keep_mask: torch.Tensor, normalization: str = "token_mean"):
    """Next-token CE over the kept targets: ``CE_t = −token_logprobs[t]``, reduced by
    :func:`normalize_token_losses`.  Dropped anchors stay in the context but get no gradient."""
    return normalize_token_losses(-token_logprobs, keep_mask, normalization)


def dllm_forced_mask(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    forced: torch.Tensor,
    mask_token_id: int,
    mask_lo: float = 0.3,
    mask_hi: float = 0.8,
    generator: torch.Generator | None = None,
):
    """Noise a batch for a masked-diffusion student, always masking the forced tokens.

    Per sample ``σ ~ U(mask_lo, mask_hi)``, random mask ``R_t ~ Bernoulli(σ)`` over response
    tokens, ``M = (R ∪ F) ∩ response``; prompt and padding are never masked.

    Returns ``(noised_ids, masked [B, T] bool, sigma [B] fp32)``; ``noised_ids`` is
    ``input_ids`` with ``M`` replaced by ``mask_token_id``.  Deterministic for a given
    ``generator`` state (σ is drawn first, then R).
    """
    if not 0.0 <= mask_lo <= mask_hi <= 1.0:
        raise ValueError(f"need 0 <= mask_lo <= mask_hi <= 1, got mask_lo={mask_lo}, mask_hi={mask_hi}")
    batch_size = input_ids.shape[0]
    device = input_ids.device
    sigma = mask_lo + (mask_hi - mask_lo) * uniform((batch_size,), device=device, generator=generator)
    random_mask = uniform(input_ids.shape, device=device, generator=generator) < sigma[:, None]
    masked = (random_mask | forced.bool()) & response_mask.bool()
    noised_ids = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noised_ids, masked, sigma


def dllm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    weighting: str = "none",
    sigma: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
):
    """CE of the denoiser's prediction of the original token at each masked position.

    No shift: ``logits[b, t]`` predicts ``input_ids[b, t]``.  The CE is fp32 and chunked.

    * ``weighting="none"``: mean CE over all masked positions of the batch (the T3S dLLM loss).
    * ``weighting="inv_t"``: the LLaDA ELBO weighting, each sample's CE scaled by ``1 / t_b``
      and normalised by its response length ``n_b``, then averaged over the samples with at
      least one masked token: ``mean_b (1/t_b) · Σ_{t∈M_b} CE_bt / n_b``.  ``t_b`` is the
      realised masked fraction ``|M_b| / n_b`` unless ``sigma`` is given, in which case it is
      the nominal rate ``σ_b`` (and ``response_mask`` is required for ``n_b``).  With the
      realised fraction the expression reduces exactly to the per-sample mean masked CE, which
      is how it is computed (``response_mask`` is then not needed).
    """
    if weighting not in DLLM_WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(DLLM_WEIGHTINGS)}")
    logprobs, batch_index, position_index = gather_log_softmax(
        logits, masked, input_ids, shift=False, chunk_size=chunk_size
    )
    token_ce = -scatter_to_positions(logprobs, batch_index, position_index, input_ids.shape)
    if weighting == "none":
        return normalize_token_losses(token_ce, masked, "token_mean")
    if sigma is None:
        return normalize_token_losses(token_ce, masked, "seq_mean")
    if response_mask is None:
        raise ValueError("dllm_loss(weighting='inv_t', sigma=...) needs response_mask for the response lengths")
    response_lengths = response_mask.bool().sum(-1).clamp(min=1)
    per_sample = token_ce.sum(-1) / (sigma.to(token_ce.device).float() * response_lengths)
    return per_sample.sum() / masked.bool().any(-1).sum().clamp(min=1)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    keep_mask: torch.Tensor,
    tail_bucket: bool = False,
    normalization: str = "token_mean",
    chunk_size: int = 256,
):
    """Forward KL(teacher ‖ student) on the teacher's top-k support, per kept position.

    Alignment is the confidence one: ``teacher_topk_*[b, t]`` describe the teacher's
    distribution over the token at position t (predicted from position t−1), compared with the
    student's ``student_logits[b, t-1]``.

    * Without ``tail_bucket`` both distributions are renormalised over the K support ids (the
      student's full-vocabulary normaliser cancels, so only the K logits matter).
    * With ``tail_bucket`` the support keeps its raw probabilities and a (K+1)-th bucket holds
      the remaining mass, ``1 − Σ p`` for each side; tail masses are floored at 1e-12 inside
      the logarithm.

    The per-position KL is reduced like :func:`masked_token_loss`.  It is 0 when the student
    matches the teacher on the support.
    """
    student_logprobs, batch_index, position_index = gather_log_softmax(
        student_logits, keep_mask, teacher_topk_ids.long(), chunk_size=chunk_size
    )
    teacher_logprobs = teacher_topk_logprobs[batch_index, position_index].float()
    if tail_bucket:
        teacher_logprobs = _with_tail_bucket(teacher_logprobs)
        student_logprobs = _with_tail_bucket(student_logprobs)
    else:
        teacher_logprobs = torch.log_softmax(teacher_logprobs, dim=-1)
        student_logprobs = torch.log_softmax(student_logprobs, dim=-1)
    teacher_probs = teacher_logprobs.exp()
    # 0 · log 0 = 0: support entries the teacher gives no mass (e.g. -inf padding) add nothing.
    kl_terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_logprobs - student_logprobs), 0.0)
    kl = kl_terms.sum(-1)
    token_kl = scatter_to_positions(kl, batch_index, position_index, keep_mask.shape)
    valid = keep_mask.bool().clone()
    valid[:, 0] = False  # position 0 has no predicting row, as in confidence
    return normalize_token_losses(token_kl, valid, normalization)


def _with_tail_bucket(support_logprobs: torch.Tensor) -> torch.Tensor:
    """Append ``log(1 − Σ_k p_k)`` (floored) to ``[N, K]`` log-probabilities → ``[N, K+1]``."""
    tail = (1.0 - support_logprobs.exp().sum(-1, keepdim=True)).clamp(min=_PROB_FLOOR)
    return torch.cat([support_logprobs, tail.log()], dim=-1)
