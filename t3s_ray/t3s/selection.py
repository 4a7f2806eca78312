"""Token-selection rules: which target tokens are imitation anchors, and which stay targets.

All rules are pure functions over per-token tensors ``[..., T]`` (``[B, T]`` batches or a single
``[T]`` sequence from the confidence store) plus the ``target_mask``; the masks they return are
bool and always False outside ``target_mask``.  "Per sequence" means along the last dimension.

The store keeps numpy arrays, so every function also accepts numpy arrays and then returns
numpy arrays (conversion is zero-copy on CPU).

``delta`` is the confidence change ``Δc_t = c_t(θ_b) − c_t(θ_0)``: anchors are the tokens the
student learns to imitate first (Δc > tau); dLLM "forced" tokens are those it is still
unlearning (Δc < −tau) and are always masked.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

__all__ = [
    "KEEP_ALL",
    "KEEP_METHODS",
    "cap_anchor_frac",
    "delta_latest",
    "ema_update",
    "keep_mask",
    "select_delta",
    "select_forced",
    "select_top_frac",
]

KEEP_ALL = "all"  # plain SFT: every target is kept
KEEP_METHODS = (KEEP_ALL, "t3s", "inverse", "random")
_RENAMED_KEEP_METHODS = {"none": KEEP_ALL}  # old spelling: new one

# Fractions such as 0.1 * 30 = 3.0000000000000004 must count as 3, not round up to 4.
_COUNT_EPS = 1e-9


def _numpy_compatible(function):
    """Let a torch rule take numpy arrays: convert them in, and the tensor results back out."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        numpy_in = any(isinstance(a, np.ndarray) for a in (*args, *kwargs.values()))
        if not numpy_in:
            return function(*args, **kwargs)
        args = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
        kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        result = function(*args, **kwargs)
        return result.numpy() if isinstance(result, torch.Tensor) else result

    return wrapper


def uniform(shape, *, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """U[0, 1) samples drawn on the generator's device and moved to ``device``.

    Drawing where the generator lives keeps a seeded CPU generator usable for GPU batches, and
    the draw identical whichever device the batch is on.
    """
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def _rank_within_sequence(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rank of each eligible position by descending score within its sequence (0 = highest).

    Ties keep sequence order (earlier first); NaN scores rank after every number; ineligible
    positions rank after all eligible ones, so ``rank < k`` picks at most k eligible positions.
    """
    keys = torch.nan_to_num(scores.float(), nan=-math.inf)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    eligible_in_order = eligible.gather(-1, order)
    order = order.gather(-1, torch.sort(eligible_in_order.int(), dim=-1, descending=True, stable=True).indices)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _per_sequence_count(frac: float, n: torch.Tensor, rounding) -> torch.Tensor:
    """``rounding(frac · n)`` per sequence, robust to floating-point noise in the product."""
    product = frac * n.double()
    if rounding is math.ceil:
        return torch.ceil(product - _COUNT_EPS).long()
    return torch.floor(product + _COUNT_EPS).long()


@_numpy_compatible
def select_delta(delta, target_mask, tau: float = 0.0):
    """Anchors ``{t : Δc_t > tau}`` (the paper's AR rule, default tau = 0)."""
    return (delta > tau) & target_mask.bool()


@_numpy_compatible
def select_forced(delta, target_mask, tau: float = 0.2):
    """dLLM forced set ``{t : Δc_t < −tau}``: yet-to-learn tokens that are always masked."""
    return (delta < -tau) & target_mask.bool()


@_numpy_compatible
def select_top_frac(delta, target_mask, rho: float):
    """Anchors = the ``ceil(rho · n_targets)`` target tokens of each sequence with highest Δc.

    Ceiling, so any rho > 0 marks at least one token of a non-empty sequence; ties are broken
    by position (earlier first).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    target_mask = target_mask.bool()
    count = _per_sequence_count(rho, target_mask.sum(-1), math.ceil)
    return (_rank_within_sequence(delta, target_mask) < count[..., None]) & target_mask


@_numpy_compatible
def cap_anchor_frac(anchors, delta, target_mask, max_frac: float):
    """Keep at most ``floor(max_frac · n_targets)`` anchors per sequence, highest Δc first."""
    if not 0.0 <= max_frac <= 1.0:
        raise ValueError(f"max_frac must be in [0, 1], got {max_frac}")
    anchors = anchors.bool() & target_mask.bool()
    cap = _per_sequence_count(max_frac, target_mask.bool().sum(-1), math.floor)
    return (_rank_within_sequence(delta, anchors) < cap[..., None]) & anchors


@_numpy_compatible
def keep_mask(method: str, anchors, target_mask, generator: torch.Generator | None = None):
    """Which target tokens contribute to the loss (anchors stay in the context either way).

    * ``"all"``: plain SFT, every target is kept (``"none"``, its old name, is still accepted).
    * ``"t3s"``: targets minus anchors.
    * ``"inverse"``: anchors only (the paper's "-T3S" ablation, expected to collapse).
    * ``"random"``: drop as many uniformly random targets per sequence as that sequence has
      anchors, keep the rest; deterministic for a given ``generator`` state.
    """
    if method in _RENAMED_KEEP_METHODS:
        warnings.warn(f"keep method {method!r} is now called {_RENAMED_KEEP_METHODS[method]!r}", DeprecationWarning,
                      stacklevel=3)
        method = _RENAMED_KEEP_METHODS[method]
    target_mask = target_mask.bool()
    anchors = anchors.bool() & target_mask
    if method == KEEP_ALL:
        return target_mask.clone()
    if method == "t3s":
        return target_mask & ~anchors
    if method == "inverse":
        return anchors
    if method == "random":
        scores = uniform(target_mask.shape, device=target_mask.device, generator=generator)
        dropped = _rank_within_sequence(scores, target_mask) < anchors.sum(-1, keepdim=True)
        return target_mask & ~dropped
    raise ValueError(f"unknown keep method {method!r}; expected one of {', '.join(KEEP_METHODS)}")


@_numpy_compatible
def delta_latest(c_latest, c0):
    """``Δc = c_latest − c0`` in fp32 (the store keeps the latest confidence in fp16)."""
    return c_latest.float() - c0.float()


@_numpy_compatible
def ema_update(ema, value, alpha: float, visited):
    """One EMA step over visits: ``ema ← (1 − alpha) · ema + alpha · value`` where ``visited``.

    Positions not visited keep their previous value.  A NaN in ``ema`` means "no visit yet" and
    is replaced by the value itself on the first visit, so the caller can start from NaNs.
    Returns a new fp32 tensor.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    ema, value, visited = ema.float(), value.float(), visited.bool()
    blended = torch.where(torch.isnan(ema), value, (1.0 - alpha) * ema + alpha * value)
    return torch.where(visited, blended, ema)
