"""Which examples a training step sees, and how a rank turns its share into tensors.

Plain numpy and torch, no Ray: the driver, the worker and the tests use the same functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_PERMS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERMS:
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]


def global_batch(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a stream of per-epoch permutations cut into batches.

    Deterministic from (seed, step) alone, so a resumed run sees exactly the batches an
    uninterrupted one would, epoch boundaries included, and no example is ever dropped.
    """
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_examples)
        out.append(int(_permutation(n_examples, seed, epoch)[pos]))
    return out


def epoch_of(step: int, n_examples: int, batch_size: int) -> int:
    return (step * batch_size) // n_examples


def rank_share(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous slice of a global batch (``batch_size`` is a multiple of the world)."""
    per_rank = len(batch) // world
    return batch[rank * per_rank:(rank + 1) * per_rank]


def micro_batches(ids: list[int], micro_batch_size: int) -> list[list[int]]:
    return [ids[i:i + micro_batch_size] for i in range(0, len(ids), micro_batch_size)]


def collate(examples: list[dict[str, Any]], ids: list[int], pad_id: int, device: torch.device):
    """``input_ids``, ``attention_mask`` and ``target_mask`` of the examples ``ids``, right-padded
    to the longest of them."""
    length = max(len(examples[i]["input_ids"]) for i in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), length), dtype=torch.long)
    target = torch.zeros((len(ids), length), dtype=torch.bool)
    for b, i in enumerate(ids):
        ex = examples[i]
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.as_tensor(np.array(ex["input_ids"]))  # a copy: Ray hands read-only arrays
        attention[b, :n] = 1
        target[b, :n] = torch.as_tensor(np.array(ex["target_mask"]))
    return input_ids.to(device), attention.to(device), target.to(device)


def per_example_values(values: torch.Tensor, target_mask: torch.Tensor) -> list[np.ndarray]:
    """Split ``[B, T]`` per-token values into one array per example over its target positions."""
    values = values.detach().float().cpu().numpy()
    mask = target_mask.cpu().numpy()
    return [values[b][mask[b]] for b in range(values.shape[0])]


def to_positions(per_example: list[np.ndarray], target_mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`per_example_values` for boolean masks: ``[B, T]``, False elsewhere."""
    out = torch.zeros(target_mask.shape, dtype=torch.bool)
    for b, values in enumerate(per_example):
        out[b, target_mask[b].cpu()] = torch.from_numpy(np.asarray(values, dtype=bool))
    return out.to(target_mask.device)
