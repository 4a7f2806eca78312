"""The arithmetic of a step, apart from the model: the learning rate at a step, the loss normaliser
over the global batch, whether micro-batches are packed, the seeds of per-example draws, and the
prefetcher that fetches a step's anchor masks from the store during the step before."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import distributed as dist_utils
from ..config import StudentConfig, TrainConfig


def learning_rate(t: TrainConfig, step: int, max_steps: int) -> float:
    """``train.lr`` at ``step``: linear warmup, then constant or cosine decay to ``max_steps``."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps)
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr


def loss_denominator(keeps: list[torch.Tensor], normalization: str) -> float:
    """The loss normaliser of a step: kept tokens (``token_mean``) or rows with a kept token
    (``seq_mean``) over the whole global batch, every micro-batch of every rank, so that the update
    does not depend on how the batch is split over workers and micro-batches; 1 for ``sum``."""
    if normalization == "sum":
        return 1.0
    count = sum(float((k.any(-1) if normalization == "seq_mean" else k).sum()) for k in keeps)
    return max(1.0, dist_utils.all_reduce(torch.tensor([count], dtype=torch.float64)).item())


def padding_free(student: StudentConfig, train: TrainConfig) -> bool:
    """Whether micro-batches are packed into one row (``train.padding_free``; by default exactly when
    the attention kernel is flash attention, whose variable-length path keeps the rows apart)."""
    if student.kind == "dllm":
        return False
    if train.padding_free is not None:
        return train.padding_free
    return student.attn_implementation.startswith("flash_attention")


def stable_seed(*parts: Any) -> int:
    """A seed from ``parts`` alone (not from the process or the split): per-example draws (the random
    protocol's kept tokens, a dLLM's noise) do not depend on which rank or micro-batch an example is in."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


class MaskPrefetcher:
    """This rank's anchor masks for a step, fetched from the store one step ahead."""

    def __init__(self, store, share_of_step: Callable[[int], list[int]]):
        self.store, self.share_of_step, self.pending = store, share_of_step, None

    def prefetch(self, step: int) -> None:
        self.pending = (step, self.store.get_masks_async(np.asarray(self.share_of_step(step))))

    def drop(self) -> None:
        """A refresh published a new version: what was fetched before it is stale."""
        self.pending = None

    def get(self, step: int) -> tuple[int, list[np.ndarray]]:
        if self.pending is None or self.pending[0] != step:
            self.prefetch(step)
        version, anchors = self.pending[1].result()
        self.pending = None
        return version, anchors
