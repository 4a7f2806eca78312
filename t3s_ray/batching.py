"""Which examples a training step sees, and how a rank turns its share into tensors.

Plain numpy and torch, no Ray: the driver, the worker and the tests use the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def token_budget_micro_batches(lengths: list[int], max_tokens: int, padding_free: bool) -> list[list[int]]:
    """Cut a rank's share of a step into micro-batches under a token budget (verl's
    ``max_token_len_per_gpu``): lists of indices into ``lengths``, as few micro-batches as the budget
    allows, each costing at most ``max_tokens`` (a row longer than the budget is one of its own).

    * ``padding_free``: the cost is the sum of the lengths; rows go longest first into the first
      micro-batch with room (first-fit decreasing), and there is no padding.
    * padded: the cost is rows × the longest row. Rows sorted by length are cut into contiguous runs
      (an exchange argument shows that mixing the order only adds padding): the fewest runs, and among
      those the least padding, found exactly by a small dynamic programme (a rank holds tens of rows).

    The longest rows come first, so a budget that does not fit memory shows at the first micro-batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if padding_free:
        parts: list[list[int]] = []
        room: list[int] = []
        for i in order:
            k = next((k for k, r in enumerate(room) if lengths[i] <= r), None)
            if k is None:
                parts.append([i])
                room.append(max_tokens - lengths[i])
            else:
                parts[k].append(i)
                room[k] -= lengths[i]
        return parts
    n = len(order)
    sorted_lengths = [lengths[i] for i in order]
    # best[j] = (micro-batches, computed tokens, start of the last run) for the first j sorted rows.
    best: list[tuple[int, int, int]] = [(0, 0, 0)] + [(n + 1, 0, 0)] * n
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            cost = (j - i) * sorted_lengths[i]  # the run's longest row is its first
            if cost > max_tokens and j - i > 1:
                break  # longer runs only cost more
            candidate = (best[i][0] + 1, best[i][1] + cost, i)
            if candidate[:2] < best[j][:2]:
                best[j] = candidate
    runs, j = [], n
    while j:
        i = best[j][2]
        runs.append(order[i:j])
        j = i
    return runs[::-1]


@dataclass
class MicroBatch:
    """The tensors of one forward pass and where each example sits in them.

    Padded (the default): one row per example, right-padded to the longest, with an attention mask.
    Padding-free (``packed``): every example concatenated into one row, ``position_ids`` restarting
    at 0 at each example and no attention mask, which flash attention (and transformers' packed-
    sequence masks) turn into attention within each example only. ``spans[k] = (row, start, end)``
    is example ``ids[k]``'s slice, so per-example arrays (confidences, anchor masks, loss weights)
    go in and out the same way in both layouts. A packed batch also holds its sequence boundaries,
    ``cu_seq_lens`` (int32 ``[0, n_1, n_1 + n_2, ...]``, on the batch's device) and ``max_seq_len``,
    which flash attention takes as they are instead of deriving them from ``position_ids`` on the
    device in every layer.
    """

    ids: list[int]
    input_ids: torch.Tensor
    target_mask: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    spans: list[tuple[int, int, int]]
    cu_seq_lens: torch.Tensor | None = None
    max_seq_len: int | None = None

    @property
    def packing(self) -> dict[str, Any]:
        """The model call's keyword arguments that say where its sequences are (``position_ids``,
        ``cu_seq_lens``, ``max_seq_len``; all None for a padded batch)."""
        return {"position_ids": self.position_ids, "cu_seq_lens": self.cu_seq_lens, "max_seq_len": self.max_seq_len}

    @property
    def computed_tokens(self) -> int:
        """Positions the forward pass computes, padding included."""
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return sum(end - start for _, start, end in self.spans)

    @property
    def predicted_mask(self) -> torch.Tensor:
        """``target_mask`` without each example's first position, which nothing of its own predicts
        (in a packed row the position before it belongs to the previous example)."""
        mask = self.target_mask.clone()
        for r, s, _ in self.spans:
            mask[r, s] = False
        return mask

    def per_example(self, values: torch.Tensor) -> list[np.ndarray]:
        """Split per-position values ``[B, T]`` into one array per example over its target positions."""
        values = values.detach().float().cpu().numpy()
        mask = self.target_mask.cpu().numpy()
        return [values[r, s:e][mask[r, s:e]] for r, s, e in self.spans]

    def to_positions(self, per_example: list[np.ndarray], dtype=torch.bool) -> torch.Tensor:
        """The inverse of :meth:`per_example`: ``[B, T]`` of ``dtype``, zero outside the targets."""
        out = torch.zeros(self.target_mask.shape, dtype=dtype)
        mask = self.target_mask.cpu()
        for (r, s, e), values in zip(self.spans, per_example):
            row = out[r, s:e]
            row[mask[r, s:e]] = torch.as_tensor(np.asarray(values)).to(dtype)
        return out.to(self.target_mask.device)


def build_micro_batch(examples: list[dict[str, Any]], ids: list[int], pad_id: int, device: torch.device,
                      packed: bool = False) -> MicroBatch:
    """The :class:`MicroBatch` of the examples ``ids`` (``packed``: padding-free, one row)."""
    # Copies: Ray hands read-only arrays, which torch refuses to wrap.
    seqs = [np.array(examples[i]["input_ids"], dtype=np.int64) for i in ids]
    targets = [np.array(examples[i]["target_mask"], dtype=bool) for i in ids]
    lengths = [len(x) for x in seqs]
    if packed:
        starts = np.cumsum([0] + lengths[:-1])
        input_ids = torch.as_tensor(np.concatenate(seqs))[None]
        target = torch.as_tensor(np.concatenate(targets))[None]
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        spans = [(0, int(s), int(s) + n) for s, n in zip(starts, lengths)]
        cu_seq_lens = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
        return MicroBatch(list(ids), input_ids.to(device), target.to(device), None, position_ids.to(device), spans,
                          cu_seq_lens.to(device), max(lengths))
    length = max(lengths)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), length), dtype=torch.long)
    target = torch.zeros((len(ids), length), dtype=torch.bool)
    for b, (seq, tgt) in enumerate(zip(seqs, targets)):
        input_ids[b, :len(seq)] = torch.as_tensor(seq)
        attention[b, :len(seq)] = 1
        target[b, :len(seq)] = torch.as_tensor(tgt)
    spans = [(b, 0, n) for b, n in enumerate(lengths)]
    return MicroBatch(list(ids), input_ids.to(device), target.to(device), attention.to(device), None, spans)


def collate(examples: list[dict[str, Any]], ids: list[int], pad_id: int, device: torch.device):
    """``input_ids``, ``attention_mask`` and ``target_mask`` of the examples ``ids``, right-padded
    to the longest of them."""
    batch = build_micro_batch(examples, ids, pad_id, device)
    return batch.input_ids, batch.attention_mask, batch.target_mask
