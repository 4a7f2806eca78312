"""The model every rank runs, and what goes in and out of it whole: ``LogprobModule`` (the forward that
DDP/FSDP wrap), ``fsdp_units`` (what FSDP shards on its own), ``score_examples`` (a no-grad pass over a
rank's share of the examples) and ``export_hf_model`` (a Hugging Face folder gathered on rank 0)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist_utils
from ..batching import micro_batches
from ..distributed import Ranks
from ..t3s import token_confidence, token_loss_and_confidence
from ..t3s.diffusion import denoiser_loss


class LogprobModule(torch.nn.Module):
    """Forward = per-token log-probabilities (AR), the weighted training loss with them, logits (a
    LLaDA-style denoiser), or a block-diffusion denoiser's loss (LLaDA2), so that DDP/FSDP wrap the
    whole computation, chunked lm head included, and synchronise its gradients."""

    def __init__(self, model, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids=None, attention_mask=None, target_mask=None, logits_only: bool = False,
                loss_weights=None, position_ids=None, cu_seq_lens=None, max_seq_len=None, denoise=None):
        """``denoise`` (a ``t3s.diffusion.DenoiserBatch``): ``denoiser_loss``'s ``(loss, logprobs)`` on it
        (no shift, masked noisy positions; ``loss_weights`` ``[B, L]`` or None for the mean over them),
        the other tensors unused. ``logits_only``: the logits. ``loss_weights`` (``[B, T]``):
        ``(Σ w·CE, confidences detached)`` with the lm head's backward done in the forward pass. Else:
        differentiable log-probabilities."""
        if denoise is not None:
            # Here rather than in the trainer: the root FSDP unit holds the lm head and the final norm,
            # which the chunked loss reads directly, so they are gathered only inside the root's forward.
            return denoiser_loss(self.model, denoise, loss_weights, self.chunk_size)
        if logits_only:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if loss_weights is not None:
            return token_loss_and_confidence(self.model, input_ids, attention_mask, target_mask, loss_weights,
                                             self.chunk_size, position_ids=position_ids, cu_seq_lens=cu_seq_lens,
                                             max_seq_len=max_seq_len)
        return token_confidence(self.model, input_ids, attention_mask, target_mask, self.chunk_size,
                                position_ids=position_ids, cu_seq_lens=cu_seq_lens, max_seq_len=max_seq_len)


def fsdp_units(model) -> list[torch.nn.Module]:
    """The modules FSDP shards as units of their own, beside the root: every repeated block (Llama/Qwen
    ``model.layers``, BERT ``encoder.layer``) and, when it is not tied to the lm head, the input
    embedding (needed only at the start of the forward). The lm head and final norm stay in the root,
    since the chunked lm head reads the weight directly rather than through the module's forward."""
    units: list[torch.nn.Module] = []
    for path in ("model.layers", "bert.encoder.layer", "transformer.h", "model.decoder.layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.ModuleList):
            units = list(node)
            break
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        units.append(embed)
    return units


def score_examples(module: LogprobModule, collate_ids, n_examples: int, ranks: Ranks, micro_batch_size: int,
                   autocast) -> dict[int, np.ndarray]:
    """Confidences (no grad) of this rank's share of the examples, ``id % world == rank``. Every rank
    runs the same number of forward passes (the last batch repeated where a rank has fewer), since
    under FSDP each one is a collective."""
    batches = micro_batches(list(range(ranks.rank, n_examples, ranks.world)), micro_batch_size)
    n_batches = math.ceil(math.ceil(n_examples / ranks.world) / micro_batch_size)
    module.eval()
    out = {}
    with torch.no_grad(), autocast():
        for k in range(n_batches):
            ids = batches[min(k, len(batches) - 1)]
            batch = collate_ids(ids)
            conf = module(batch.input_ids, batch.attention_mask, batch.predicted_mask, **batch.packing)
            if k < len(batches):
                out.update(zip(ids, batch.per_example(conf)))
    dist_utils.reshard(module)  # a forward without backward leaves FSDP's root group gathered
    module.train()
    return out


def export_hf_model(module: LogprobModule, tokenizer, dtype: torch.dtype, folder: Path) -> None:
    """Write ``module``'s model as a Hugging Face folder (safetensors in ``dtype``, tokenizer). A
    collective under FSDP (every rank gathers); rank 0 writes (Qwen3-8B in bf16: 16 GB, about a
    minute at 1 GB/s), so the others wait at most that long in their next collective."""
    state = dist_utils.gather_full_state(module, dtype)
    if state is None:
        return
    state = {k.removeprefix("model."): v for k, v in state.items()}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    # save_pretrained records the dtype of the module's (fp32 master) parameters, not of the files.
    config_file = tmp / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "dtype": str(dtype).removeprefix("torch.")}, indent=2) + "\n")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
