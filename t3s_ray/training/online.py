"""The online protocol's bottleneck switch (``switch: bottleneck``): each rank samples its share of the
train prompts from its own replica of the model in training and scores them (``sample_accuracy``);
masking goes on once the accuracy has risen after its minimum (``bottleneck_passed``). What to sample
and how to score it (``spec.OnlineSwitch``) was prepared by the driver."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .spec import OnlineSwitch


def bottleneck_passed(accuracies: list[float], patience: int) -> bool:
    """True once train accuracy has risen at each of the last ``patience`` evaluations, all of them
    after its minimum (the first minimum): the imitation bottleneck is behind us."""
    if len(accuracies) < patience + 1:
        return False
    low = int(np.argmin(accuracies))
    recent = accuracies[-patience - 1:]
    return len(accuracies) - 1 - low >= patience and all(b > a for a, b in zip(recent, recent[1:]))


def sample_accuracy(model, tokenizer, online: OnlineSwitch, rank: int, world: int, chunk: int,
                    autocast) -> tuple[int, int]:
    """(correct, sampled) for this rank's share of the train prompts, sampled from its own replica
    of the model in training (``probe.sampling.samples`` each, ``chunk`` requests at a time)."""
    from ..engines.hf import HFGenerator
    from ..generate import prepare_requests
    from ..verify import get_verifier

    mine: list[dict[str, Any]] = list(online.prompts[rank::world])
    requests, _ = prepare_requests(mine, online.generation, tokenizer)
    gen = HFGenerator.from_model(model, tokenizer, online.generation.sampling.temperature, 1.0)
    check = get_verifier(online.verifier)
    answers = {r["id"]: r.get("answer") for r in mine}
    model.eval()
    correct = 0
    with torch.no_grad(), autocast():
        for i in range(0, len(requests), chunk):
            for out in gen.generate_rows(requests[i:i + chunk]):
                correct += bool(not out.get("error") and check(out["response"], answers[out["id"]]).correct)
    model.train()
    tokenizer.padding_side = "right"
    return correct, len(requests)
