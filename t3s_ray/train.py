"""Stage 2: student training on Ray Train with T3S token selection and the global confidence store.

Read top to bottom:

* ``run_train`` (driver): tokenises the kept traces with the student's chat template, runs the
  probe when the protocol needs one (``run_probe``: SFT from θ0, train accuracy at each saved
  model, θb = argmin), then one ``fit``.
* ``fit`` (driver): creates the ConfidenceStore actors and a ``TorchTrainer`` whose workers run
  ``train_loop_per_worker``.
* ``StudentTrainer`` (one per worker): ``setup`` (model, optimizer, resume or scoring passes),
  ``train`` (the loop), ``save_checkpoint``.

Every step, each worker takes its share of a deterministic global batch, looks up the anchor masks
of its examples (prefetched from the store during the previous step), computes the token
log-probabilities once (they are both the loss, ``CE_t = -logprob_t``, and the confidence pushed to
the store), steps the optimizer, and pushes the detached confidences without waiting. Refreshes
(every ``selection.refresh_interval`` steps, online protocol) are the only points where workers wait
for the store: each waits for its own pushes, then rank 0 reclassifies and publishes a new mask
version, so every rank trains on the same version at the same step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, RunConfig, from_dict
from .data import tokenize_pair
from .t3s import token_confidence

CHECKPOINT_STATE = "trainer_state.json"


# --------------------------------------------------------------------------------------------
# Driver side: data
# --------------------------------------------------------------------------------------------


def _trace_prompt(trace: dict[str, Any]):
    return json.loads(trace["prompt"]) if trace.get("prompt_format") == "messages" else trace["prompt"]


def tokenize_traces(traces: list[dict[str, Any]], tokenizer, *, system_prompt: str | None, chat_template: bool,
                    max_seq_len: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenise kept traces into training examples; too-long or empty ones are skipped and counted."""
    examples, too_long, empty = [], [], []
    for trace in traces:
        pair = tokenize_pair(tokenizer, _trace_prompt(trace), trace["response"], system_prompt=system_prompt,
                             chat_template=chat_template)
        tag = f"{trace['id']}#{trace['sample_index']}"
        if len(pair.input_ids) > max_seq_len:
            too_long.append(f"{tag} ({len(pair.input_ids)} tokens)")
            continue
        if not pair.num_response_tokens:
            empty.append(tag)
            continue
        examples.append({"example_id": len(examples), "trace": tag, "prompt_id": trace["id"],
                         "input_ids": np.asarray(pair.input_ids, dtype=np.int64),
                         "target_mask": np.asarray(pair.response_mask, dtype=bool)})
    skipped = {"too_long": too_long, "no_response_tokens": empty}
    if too_long:
        print(f"[train] skipped {len(too_long)} traces longer than data.max_seq_len={max_seq_len}: "
              f"{', '.join(too_long[:5])}{' ...' if len(too_long) > 5 else ''}", file=sys.stderr, flush=True)
    return examples, skipped


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


_PERMS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERMS:
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]


def epoch_of(step: int, n_examples: int, batch_size: int) -> int:
    return (step * batch_size) // n_examples


# --------------------------------------------------------------------------------------------
# What the driver hands to every worker
# --------------------------------------------------------------------------------------------


@dataclass
class TrainJob:
    """One training run: the config plus what the driver decided (protocol phase, paths, store)."""

    cfg: dict[str, Any]
    out_dir: str
    model_ref: str                    # the weights θ0 to start from
    model_kind: str                   # "ar" or "dllm"
    scoring_ref: str                  # the AR model whose confidences fill the store (selector for dLLM)
    keep_method: str                  # "none" | "t3s" | "inverse" | "random"
    online: bool                      # reclassify during training (t3s_online)
    anchor_model: str | None          # θb for the static protocol (its Δc picks the anchors once)
    max_steps: int                    # the schedule's horizon (cosine decay, last step)
    store_name: str
    stop_at: int | None = None        # pause after this step (a checkpoint and the model are saved there)
    model_every: int = 0              # also save a bare HF model every this many steps (the probe)
    examples_ref: Any = None          # ObjectRef of the tokenised examples
    prompts: list[dict[str, Any]] = field(default_factory=list)  # train prompts (bottleneck accuracy)


def _rule_kwargs(cfg: RunConfig, kind: str) -> dict[str, Any]:
    s = cfg.selection
    if kind == "dllm":
        return {"rule": "forced", "tau": s.tau, "max_anchor_frac": s.max_anchor_frac}
    return {"rule": s.rule, "tau": s.tau, "top_frac": s.top_frac, "max_anchor_frac": s.max_anchor_frac}


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _per_example_values(values, target_mask) -> list[np.ndarray]:
    """Split ``[B, T]`` per-token values into one array per example over its target positions."""
    values = values.detach().float().cpu().numpy()
    mask = target_mask.cpu().numpy()
    return [values[b][mask[b]] for b in range(values.shape[0])]


def _to_positions(per_example: list[np.ndarray], target_mask):
    """The inverse of ``_per_example_values`` for boolean masks: ``[B, T]`` with False elsewhere."""
    out = torch.zeros(target_mask.shape, dtype=torch.bool)
    for b, values in enumerate(per_example):
        out[b, target_mask[b].cpu()] = torch.from_numpy(np.asarray(values, dtype=bool))
    return out.to(target_mask.device)


def bottleneck_passed(accuracies: list[float], patience: int) -> bool:
    """True once train accuracy has risen at each of the last ``patience`` evaluations, all of them
    after its minimum (the first minimum): the imitation bottleneck is behind us."""
    if len(accuracies) < patience + 1:
        return False
    low = int(np.argmin(accuracies))
    recent = accuracies[-patience - 1:]
    return len(accuracies) - 1 - low >= patience and all(b > a for a, b in zip(recent, recent[1:]))


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


class StudentTrainer:
    """The per-worker recipe: ``setup``, ``train``, ``save_checkpoint``."""

    def __init__(self, job: TrainJob):
        import ray.train

        self.job = job
        self.cfg = from_dict(job.cfg)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.out_dir = Path(job.out_dir)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import ray
        import ray.train

        from .models import load_model, load_tokenizer
        from .store import connect_store

        t, s = self.cfg.train, self.cfg.selection
        torch.manual_seed(t.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
        self.examples = ray.get(self.job.examples_ref)
        self.n_examples = len(self.examples)
        self.store = connect_store(self.job.store_name, s.store_shards, namespace=self.cfg.ray.namespace)
        self.tokenizer = load_tokenizer(self.job.model_ref, trust_remote_code=self.cfg.student.trust_remote_code)
        self.state = {"step": 0, "mask_version": 0, "masking_on": self.job.keep_method != "none" and
                      (not self.job.online or s.switch == "immediate"), "accuracy": [], "switched_at": None}
        checkpoint = ray.train.get_checkpoint()
        ckpt_ctx = checkpoint.as_directory() if checkpoint is not None else None
        ckpt_dir = Path(ckpt_ctx.__enter__()) if ckpt_ctx else None
        try:
            source = str(ckpt_dir / "model") if ckpt_dir else self.job.model_ref
            self.model = load_model(source, dtype=t.dtype, trust_remote_code=self.cfg.student.trust_remote_code)
            self.model.to(self.device)
            if ckpt_dir is None:
                self._initial_scoring()  # on the full model, before it is wrapped or sharded
            self._wrap_model()
            self._build_optimizer()  # after sharding: FSDP2 replaces parameters with DTensors
            if ckpt_dir is not None:
                self._load_checkpoint(ckpt_dir)
        finally:
            if ckpt_ctx:
                ckpt_ctx.__exit__(None, None, None)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if self.rank == 0:
            self._truncate_metrics(self.state["step"])
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        self.optimizer = torch.optim.AdamW(self.forward.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                           weight_decay=t.weight_decay)

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        if t.warmup_steps and step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, self.job.max_steps - t.warmup_steps)
            return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return t.lr

    def _wrap_model(self) -> None:
        """DDP (or FSDP2) around a module whose forward returns token log-probabilities, so that the
        chunked confidence is computed inside the wrapped forward and gradients are synchronised."""
        from .models import is_masked_lm, mask_token_id

        self.model.train()
        # The config says which loss to use: a remote-code dLLM (LLaDA-2.0) registers as a causal LM.
        self.is_dllm = self.job.model_kind == "dllm"
        if is_masked_lm(self.model) and not self.is_dllm:
            raise ValueError(f"{self.job.model_ref} is a masked LM (a diffusion denoiser): set student.kind: dllm")
        if self.is_dllm:
            self.mask_id = mask_token_id(self.tokenizer, self.cfg.student.mask_token, self.job.model_ref)
        if self.cfg.train.activation_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable()
        self.module = LogprobModule(self.model, self.cfg.train.confidence_chunk)
        self.forward = self.module
        self._sharded = self.world > 1 and self.cfg.train.strategy == "fsdp"
        if self.world > 1:
            if self.cfg.train.strategy == "fsdp":
                self.forward = _fully_shard(self.module, self.cfg.train.dtype)
            else:
                self.forward = torch.nn.parallel.DistributedDataParallel(self.module)

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop metric lines of steps that are about to be redone."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    # ---------------------------------------------------------------- scoring passes
    def _my_examples(self) -> list[int]:
        return list(range(self.rank, self.n_examples, self.world))

    def _batches(self, ids: list[int]):
        mb = self.cfg.train.micro_batch_size
        for i in range(0, len(ids), mb):
            yield ids[i:i + mb]

    def _collate(self, ids: list[int]):
        length = max(len(self.examples[i]["input_ids"]) for i in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), length), dtype=torch.long)
        target = torch.zeros((len(ids), length), dtype=torch.bool)
        for b, i in enumerate(ids):
            ex = self.examples[i]
            n = len(ex["input_ids"])
            input_ids[b, :n] = torch.as_tensor(np.array(ex["input_ids"]))
            attention[b, :n] = 1
            target[b, :n] = torch.as_tensor(np.array(ex["target_mask"]))
        return input_ids.to(self.device), attention.to(self.device), target.to(self.device)

    def _score(self, model_ref: str | None = None, model=None, forward=None) -> dict[int, np.ndarray]:
        """Confidences of this rank's share of the examples (no grad) under a model ref, a model, or
        the wrapped training forward (``forward``: under FSDP every rank runs the same number of
        forward passes, since each one is a collective)."""
        from .models import load_model

        if forward is None:
            if model is None:
                model = load_model(model_ref, dtype=self.cfg.train.dtype,
                                   trust_remote_code=self.cfg.student.trust_remote_code).to(self.device)
            forward = LogprobModule(model, self.cfg.train.confidence_chunk)
        batches = list(self._batches(self._my_examples()))
        n_batches = math.ceil(math.ceil(self.n_examples / self.world) / self.cfg.train.micro_batch_size)
        was_training = forward.training
        forward.eval()
        out = {}
        with torch.no_grad():
            for k in range(n_batches):
                ids = batches[min(k, len(batches) - 1)]
                input_ids, attention, target = self._collate(ids)
                conf = forward(input_ids, attention, target)
                if k < len(batches):
                    out.update(zip(ids, _per_example_values(conf, target)))
        forward.train(was_training)
        return out

    def _initial_scoring(self) -> None:
        """c0 for every token; for the static protocol also c(θb), then the one classification."""
        import ray

        if self.rank == 0:
            # A from-scratch (re)start must not see an earlier attempt's visits or mask versions.
            from .store import ConfidenceStore

            configs = self.store.config()
            self.store.load_state_dict({"num_shards": len(configs),
                                        "shards": [ConfidenceStore(**c).state_dict() for c in configs]})
            # One rank registers every example in id order, so the store's layout (and its
            # snapshots) do not depend on which rank got there first.
            ids = np.arange(self.n_examples)
            self.store.register(ids, np.asarray([int(ex["target_mask"].sum()) for ex in self.examples]))
        _barrier()
        same_model = self.job.scoring_ref == self.job.model_ref and self.job.model_kind == "ar"
        c0 = self._score(None if same_model else self.job.scoring_ref, model=self.model if same_model else None)
        self.store.set_base(np.asarray(list(c0)), list(c0.values()))
        if self.job.anchor_model:
            cb = self._score(self.job.anchor_model)
            ray.get(self.store.record(0, np.asarray(list(cb)), list(cb.values())))
        _barrier()
        if self.job.anchor_model and self.rank == 0:
            stats = self.store.refresh(0, **_rule_kwargs(self.cfg, self.job.model_kind))
            print(f"[train] static selection from {self.job.anchor_model}: anchor fraction "
                  f"{stats['anchor_frac']:.3f}", file=sys.stderr, flush=True)
        _barrier()

    # ---------------------------------------------------------------- the loop
    def train(self) -> None:
        import ray
        import ray.train
        t, s = self.cfg.train, self.cfg.selection
        mb_per_rank = t.batch_size // self.world
        pushes: list[Any] = []
        prefetch = None
        last = min(self.job.stop_at or self.job.max_steps, self.job.max_steps)
        while self.state["step"] < last:
            step = self.state["step"]
            started = time.perf_counter()
            batch = global_batch(step, self.n_examples, t.batch_size, t.seed)
            mine = batch[self.rank * mb_per_rank:(self.rank + 1) * mb_per_rank]
            # Online refresh: the only point where workers wait for the store.
            if self.job.online and self.state["masking_on"] and step > 0 and step % s.refresh_interval == 0 \
                    and self.state.get("refreshed_at") != step:
                ray.get(pushes)
                pushes = []
                self._refresh(step)
                prefetch = None
            if prefetch is None or prefetch[0] != step:
                prefetch = (step, self.store.get_masks_async(np.asarray(mine)))
            version, anchors = prefetch[1].result()
            self.state["mask_version"] = version
            # Prefetch the next step's masks now, so the next step does not wait on the store.
            next_step = step + 1
            if next_step < last and not (self.job.online and next_step % s.refresh_interval == 0):
                nb = global_batch(next_step, self.n_examples, t.batch_size, t.seed)
                prefetch_next = (next_step, self.store.get_masks_async(
                    np.asarray(nb[self.rank * mb_per_rank:(self.rank + 1) * mb_per_rank])))
            else:
                prefetch_next = None

            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            metrics = self._train_step(step, mine, anchors, pushes)
            prefetch = prefetch_next
            self.state["step"] = step + 1
            # One all-reduce gives both: max(v) and max(-v) = -min(v) over ranks.
            versions = _all_reduce_dict({"max": version, "neg_min": -version}, "max")
            versions["min"] = -versions["neg_min"]
            metrics.update({"step": step + 1, "epoch": epoch_of(step, self.n_examples, t.batch_size), "lr": lr,
                            "mask_version": version, "mask_version_min_rank": int(versions["min"]),
                            "mask_version_max_rank": int(versions["max"]), "masking_on": self.state["masking_on"],
                            "batch": batch,
                            "step_time_s": time.perf_counter() - started})
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
            if self.job.online and s.switch == "bottleneck" and not self.state["masking_on"] \
                    and (step + 1) % self.cfg.probe.eval_every == 0:
                self._bottleneck_check(step + 1, metrics)
            if t.diagnostics_every and (step + 1) % t.diagnostics_every == 0:
                metrics.update(self._diagnostics(mine, anchors))
            checkpoint_now = (step + 1) % t.checkpoint_every == 0 or step + 1 == last
            if self.job.model_every and (step + 1) % self.job.model_every == 0:
                self._save_hf(self.out_dir / "models" / f"step-{step + 1:06d}")
            if checkpoint_now:
                ray.get(pushes)
                pushes = []
            self._log(metrics)
            self.save_checkpoint(metrics, with_checkpoint=checkpoint_now)
        ray.get(pushes)
        _barrier()
        self._save_hf(self.out_dir / "model")
        if self.rank == 0:
            self.tb.close()

    def _refresh(self, step: int) -> None:
        """Publish a new mask version; with ``refresh_source: scoring_pass`` first record an exact
        scoring pass of the current weights over every example (instead of the last visits)."""
        import ray

        if self.cfg.selection.refresh_source == "scoring_pass":
            scores = self._score(forward=self.forward)
            ray.get(self.store.record(step, np.asarray(list(scores)), list(scores.values())))
        _barrier()
        if self.rank == 0:
            self.store.refresh(step, **_rule_kwargs(self.cfg, self.job.model_kind))
        _barrier()
        self.state["refreshed_at"] = step

    def _keep_and_targets(self, step: int, ids: list[int], anchors_np: list[np.ndarray], target):
        from .t3s import keep_mask

        anchors = _to_positions(anchors_np, target)
        method = self.job.keep_method if self.state["masking_on"] else "none"
        generator = torch.Generator().manual_seed(_stable_seed(self.cfg.train.seed, step, *ids))
        return keep_mask(method, anchors, target, generator=generator), anchors

    def _train_step(self, step: int, mine: list[int], anchors: list[np.ndarray], pushes: list) -> dict[str, Any]:
        import torch.distributed as dist

        from .t3s import dllm_forced_mask, dllm_loss, normalize_token_losses

        t = self.cfg.train
        micro = list(self._batches(list(range(len(mine)))))
        collated = []
        for part in micro:
            ids = [mine[i] for i in part]
            input_ids, attention, target = self._collate(ids)
            keep, anchor_mask = self._keep_and_targets(step, ids, [anchors[i] for i in part], target)
            collated.append((ids, input_ids, attention, target, keep, anchor_mask))
        # The loss normaliser covers the whole global batch (all micro-batches of all ranks), so the
        # update does not depend on how the batch is split into workers and micro-batches.
        if self.is_dllm:
            denom_local = 0.0  # the dLLM loss is a mean per micro-batch, averaged below
        elif t.loss_normalization == "token_mean":
            denom_local = float(sum(c[4].sum().item() for c in collated))
        elif t.loss_normalization == "seq_mean":
            denom_local = float(sum(c[4].any(-1).sum().item() for c in collated))
        else:
            denom_local = 1.0
        denom = torch.tensor([denom_local], dtype=torch.float64)
        if dist.is_initialized() and not self.is_dllm:
            dist.all_reduce(denom)
        denom = max(1.0, denom.item()) if t.loss_normalization != "sum" else 1.0
        totals = {"loss": 0.0, "kept": 0, "targets": 0, "anchors": 0, "conf_anchor": 0.0, "conf_other": 0.0,
                  "tokens": 0}
        for k, (ids, input_ids, attention, target, keep, anchor_mask) in enumerate(collated):
            last = k == len(collated) - 1
            sync = _no_sync(self.forward) if not last else contextlib.nullcontext()
            with sync:
                if self.is_dllm:
                    generator = torch.Generator().manual_seed(_stable_seed(t.seed, "dllm", step, *ids))
                    forced = anchor_mask if self.state["masking_on"] else torch.zeros_like(anchor_mask)
                    noised, masked, _ = dllm_forced_mask(input_ids, target, forced, self.mask_id,
                                                         self.cfg.selection.mask_lo, self.cfg.selection.mask_hi,
                                                         generator=generator)
                    logits = self.forward(noised, attention, target, logits_only=True)
                    loss = dllm_loss(logits, input_ids, masked, weighting=self.cfg.selection.dllm_weighting)
                    scaled = loss / len(collated)
                    logprobs = None
                else:
                    logprobs = self.forward(input_ids, attention, target)
                    ce = -logprobs
                    if t.loss_normalization == "seq_mean":
                        local = normalize_token_losses(ce, keep, "seq_mean") * keep.any(-1).sum()
                    else:
                        local = normalize_token_losses(ce, keep, "sum")
                    scaled = local / denom * self.world  # DDP averages gradients over ranks
                    loss = scaled / self.world
                scaled.backward()
            totals["loss"] += loss.item()
            totals["kept"] += int(keep.sum())
            totals["targets"] += int(target.sum())
            totals["anchors"] += int(anchor_mask.sum())
            totals["tokens"] += int(attention.sum())
            if logprobs is not None:
                lp = logprobs.detach()
                totals["conf_anchor"] += float(lp[anchor_mask].sum())
                totals["conf_other"] += float(lp[target & ~anchor_mask].sum())
                pushes.extend(self.store.record(step, np.asarray(ids), _per_example_values(lp, target)))
        if t.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.forward.parameters(), t.grad_clip))
        else:
            grad_norm = float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = _all_reduce_dict(totals)  # metrics describe the global batch, not rank 0's share
        n_other = totals["targets"] - totals["anchors"]
        return {
            "loss": totals["loss"],
            "kept_frac": totals["kept"] / max(1, totals["targets"]),
            "anchor_frac": totals["anchors"] / max(1, totals["targets"]),
            "mean_conf_anchor": totals["conf_anchor"] / totals["anchors"] if totals["anchors"] else None,
            "mean_conf_other": totals["conf_other"] / n_other if n_other else None,
            "grad_norm": grad_norm,
            "tokens": int(totals["tokens"]),
        }

    def _diagnostics(self, mine: list[int], anchors: list[np.ndarray]) -> dict[str, float]:
        """The paper's gradient-conflict measurement on this rank's first micro-batch."""
        from .t3s import gradient_conflict

        if self.is_dllm or self.cfg.train.strategy == "fsdp":
            return {}
        ids = mine[: self.cfg.train.micro_batch_size]
        input_ids, attention, target = self._collate(ids)
        anchor_mask = _to_positions(anchors[: len(ids)], target)
        logprobs = self.module(input_ids, attention, target)  # unwrapped: no gradient synchronisation
        d = gradient_conflict(self.model, logprobs, anchor_mask, target)
        self.optimizer.zero_grad(set_to_none=True)
        return {f"diag_{k}": v for k, v in d.items()}

    def _bottleneck_check(self, step: int, metrics: dict[str, Any]) -> None:
        """Measure train accuracy; switch masking on once it has risen for ``patience`` evaluations."""
        acc = self._train_accuracy()
        history = self.state["accuracy"]
        history.append({"step": step, "accuracy": acc})
        metrics["train_accuracy"] = acc
        accs = [h["accuracy"] for h in history]
        low = int(np.argmin(accs))
        if bottleneck_passed(accs, self.cfg.probe.patience):
            self.state["masking_on"] = True
            self.state["switched_at"] = step
            metrics["switched"] = True
            if self.rank == 0:
                print(f"[train] bottleneck passed at step {step} (min accuracy {accs[low]:.3f} at step "
                      f"{history[low]['step']}): masking on", file=sys.stderr, flush=True)
            # Classify from the trajectories so far, then optionally restart the weights from θ0.
            self._refresh(step)
            if self.cfg.selection.rewind:
                self._rewind()

    def _rewind(self) -> None:
        from safetensors.torch import load_file

        from .models import resolve

        folder = Path(resolve(self.job.model_ref))
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        self.model.load_state_dict(state, strict=False)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        self._build_optimizer()

    def _train_accuracy(self) -> float:
        """Each rank samples for its share of the train prompts with its own replica; counts are summed."""
        from .generate import GenerationSpec, HFGenerator, prepare_requests
        from .verify import get_verifier

        p = self.cfg.probe
        prompts = self.job.prompts[: p.max_prompts] if p.max_prompts else self.job.prompts
        mine = prompts[self.rank::self.world]
        spec = GenerationSpec(model_ref=self.job.model_ref, n=p.samples, temperature=p.temperature,
                              max_tokens=p.max_tokens, seed=self.cfg.seed, system_prompt=self.cfg.data.system_prompt,
                              max_model_len=self.cfg.data.max_seq_len + p.max_tokens)
        requests, _ = prepare_requests(mine, spec, self.tokenizer)
        gen = HFGenerator.from_model(self.model, self.tokenizer, p.temperature, 1.0)
        check = get_verifier(self.cfg.traces.verifier)
        answers = {r["id"]: r.get("answer") for r in mine}
        self.model.eval()
        correct = 0
        for i in range(0, len(requests), self.cfg.train.micro_batch_size * 4):
            for out in gen.generate_rows(requests[i:i + self.cfg.train.micro_batch_size * 4]):
                correct += bool(not out.get("error") and check(out["response"], answers[out["id"]]).correct)
        self.model.train()
        self.tokenizer.padding_side = "right"
        counts = torch.tensor([correct, len(requests)], dtype=torch.float64)
        if _dist_ready():
            import torch.distributed as dist

            dist.all_reduce(counts)
        return float(counts[0] / max(1.0, counts[1]))

    # ---------------------------------------------------------------- checkpoints and metrics
    def _log(self, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.tb.add_scalar(key, value, metrics["step"])
        if metrics["step"] == 1 or metrics["step"] % 5 == 0 or metrics["step"] == self.job.max_steps:
            print(f"[train] step {metrics['step']}/{self.job.max_steps} loss {metrics['loss']:.4f} "
                  f"kept {metrics['kept_frac']:.2f} anchors {metrics['anchor_frac']:.2f} "
                  f"{metrics['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (a collective under FSDP: every rank must call it)."""
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return full if self.rank == 0 else None
        return self.model.state_dict() if self.rank == 0 else None

    def _save_hf(self, folder: Path) -> None:
        """Write a Hugging Face folder (safetensors + tokenizer) from rank 0; every rank calls it."""
        state = self._full_model_state()
        if self.rank != 0:
            return
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)

    def save_checkpoint(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Report the step; at checkpoint steps also the model, optimizer, trainer state and store."""
        import ray.train
        from ray.train import Checkpoint

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}
        if not with_checkpoint:
            ray.train.report(clean)
            return
        _barrier()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            torch.save(torch.get_rng_state(), tmp / f"rng_rank{self.rank}.pt")
            self._save_hf(tmp / "model")
            if self._sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

                optim_state = get_optimizer_state_dict(self.forward, self.optimizer, options=StateDictOptions(
                    full_state_dict=True, cpu_offload=True))
            else:
                optim_state = self.optimizer.state_dict()
            if self.rank == 0:
                torch.save(optim_state, tmp / "optimizer.pt")
                self.store.save(tmp / "store.npz")
                (tmp / CHECKPOINT_STATE).write_text(json.dumps(
                    {**self.state, "epoch": metrics["epoch"],
                     "data_cursor": self.state["step"] * self.cfg.train.batch_size}, indent=2))
            ray.train.report(clean, checkpoint=Checkpoint.from_directory(str(tmp)))

    def _load_checkpoint(self, ckpt: Path) -> None:
        """Weights were loaded from ``ckpt/model``; restore optimizer, trainer state, RNG and the store."""
        self.state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
        optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.forward, self.optimizer, optim_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(optim_state)
        rng = ckpt / f"rng_rank{self.rank}.pt"
        if rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=True))
        if self.rank == 0:
            self.store.load(ckpt / "store.npz")  # a restarted store shard comes back empty
        _barrier()
        if self.rank == 0:
            print(f"[train] resumed from step {self.state['step']} ({ckpt})", file=sys.stderr, flush=True)


class LogprobModule(torch.nn.Module):
    """Forward = per-token log-probabilities (AR) or logits (dLLM denoiser), so that DDP/FSDP wrap the
    whole computation, chunked lm head included, and synchronise its gradients."""

    def __init__(self, model, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, target_mask, logits_only: bool = False):
        if logits_only:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return token_confidence(self.model, input_ids, attention_mask, target_mask, self.chunk_size)


def _fully_shard(module, dtype: str):
    """FSDP2: shard every decoder layer, then the root; bf16 compute when training in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
    layers = getattr(getattr(module.model, "model", None), "layers", None)
    for layer in layers or []:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_ready():
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_dict(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or min/max) a dict of numbers over ranks in one collective."""
    if not _dist_ready():
        return dict(values)
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return dict(zip(values, t.tolist()))


def _no_sync(forward):
    return forward.no_sync() if hasattr(forward, "no_sync") else contextlib.nullcontext()


def train_loop_per_worker(job_dict: dict[str, Any]) -> None:
    _quiet_report_log()
    job = TrainJob(**job_dict)
    trainer = StudentTrainer(job)
    trainer.setup()
    trainer.train()


def _quiet_report_log() -> None:
    """Ray 2.60 logs "Reporting training result N: TrainingReport(...)" for every report of every
    rank through a logger named by its file path (not under ``ray.train``), so ``LoggingConfig``
    does not reach it; at INFO it doubled the console output of a run."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    if isinstance(getattr(context, "logger", None), logging.Logger):
        context.logger.setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# Driver side: one training run
# --------------------------------------------------------------------------------------------


def fit(cfg: RunConfig, job: TrainJob, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Run one ``TorchTrainer`` for ``job`` and return a summary; resumes from its own latest checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from .store import connect_store, create_store

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:  # a store left by an earlier fit in this Ray session: start clean (a resume restores its snapshot)
        connect_store(job.store_name, cfg.selection.store_shards, namespace=cfg.ray.namespace).kill()
    except ValueError:
        pass
    store = create_store(job.store_name, cfg.selection.store_shards, namespace=cfg.ray.namespace,
                         trajectory_len=cfg.selection.trajectory_len, summary=cfg.selection.summary,
                         ema_alpha=cfg.selection.ema_alpha)
    job.examples_ref = ray.put(examples)
    t = cfg.train
    # Ray Train's print patch sends each worker print to its logger *and* (Ray having redirected
    # stderr) to stderr, so every progress line reached the console twice. Ray Train hands this
    # variable from the driver to its controller and workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": 1} if not t.use_gpu else None),
        run_config=RayRunConfig(name="ray_train", storage_path=str(out.resolve()),
                                failure_config=FailureConfig(max_failures=t.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_last or None),
                                # Ray Train logs every report and checkpoint at INFO, a long line each:
                                # our progress lines and metrics.jsonl say the same. Its files keep all.
                                logging_config=LoggingConfig(log_level="WARNING")),
    )
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    stats = store.stats()
    history = store.history()
    (out / "store_stats.json").write_text(json.dumps({"final": stats, "refreshes": history}, indent=2) + "\n")
    store.save(out / "store.npz")
    store.kill()
    summary = {"out_dir": str(out), "model": str(out / "model"), "seconds": round(time.time() - started, 1),
               "examples": len(examples), "store": stats,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    return summary


def train_prompts(traces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unique (id, prompt, answer) rows of the traces: the train prompts for accuracy probes."""
    seen, rows = set(), []
    for tr in traces:
        if tr["id"] not in seen:
            seen.add(tr["id"])
            rows.append({"id": tr["id"], "prompt": _trace_prompt(tr), "answer": tr.get("answer")})
    return rows


def run_probe(cfg: RunConfig, examples, prompts, scoring_ref: str, tokenizer_ref: str) -> dict[str, Any]:
    """The static protocol's probe: SFT from θ0, saving a model every ``probe.eval_every`` steps,
    train accuracy of each, θb = argmin (earliest on ties). Resumable; returns the probe result."""
    from .cluster import ray_session
    from .generate import GenerationSpec, generate_and_verify
    from .verify import score_counts

    probe_dir = (cfg.run_dir / "probe").resolve()  # its model paths are read by workers elsewhere
    result_path = probe_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    p = cfg.probe
    job = TrainJob(cfg=cfg.to_dict(), out_dir=str(probe_dir), model_ref=scoring_ref, model_kind="ar",
                   scoring_ref=scoring_ref, keep_method="none", online=False, anchor_model=None,
                   max_steps=p.steps, store_name=f"t3s-store-{cfg.name}-probe", model_every=p.eval_every)
    print(f"[probe] SFT from θ0 for {p.steps} steps, a model every {p.eval_every}", file=sys.stderr, flush=True)
    with ray_session(cfg.ray):
        fit(cfg, job, examples)
        rows = prompts[: p.max_prompts] if p.max_prompts else prompts
        candidates = [(0, scoring_ref)] + [(int(d.name.split("-")[1]), str(d))
                                           for d in sorted((probe_dir / "models").glob("step-*"))]
        accuracies = []
        for step, ref in candidates:
            spec = GenerationSpec(model_ref=ref, backend="hf", n=p.samples, temperature=p.temperature,
                                  max_tokens=p.max_tokens, seed=cfg.seed, system_prompt=cfg.data.system_prompt,
                                  concurrency=max(1, min(cfg.traces.concurrency, len(rows))),
                                  batch_size=cfg.traces.batch_size,
                                  max_model_len=cfg.data.max_seq_len + p.max_tokens)
            # Train accuracy is avg@k over the train prompts, scored as the evaluation stage scores.
            counts = [(len(samples), sum(s["correct"] for s in samples)) if samples else (p.samples, 0)
                      for _, samples, _err in generate_and_verify(rows, spec, cfg.traces.verifier,
                                                                  label=f"probe step {step}")]
            accuracy = score_counts(counts)["avg@k"]
            accuracies.append({"step": step, "accuracy": accuracy, "model": ref})
            print(f"[probe] step {step}: train accuracy {sum(c for _, c in counts)}/{sum(n for n, _ in counts)} "
                  f"= {accuracy:.3f}", file=sys.stderr, flush=True)
    result = choose_bottleneck(accuracies)
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def choose_bottleneck(accuracies: list[dict[str, Any]]) -> dict[str, Any]:
    """θb = the saved probe model with the lowest train accuracy, earliest on ties (θ0 excluded)."""
    candidates = [a for a in accuracies if a["step"] > 0]
    if not candidates:
        raise ValueError("the probe saved no model: probe.steps must be >= probe.eval_every")
    best = min(candidates, key=lambda a: (a["accuracy"], a["step"]))
    return {"accuracies": accuracies, "bottleneck_step": best["step"], "bottleneck_model": best["model"]}


KEEP_OF_PROTOCOL = {"sft": "none", "t3s_static": "t3s", "t3s_online": "t3s", "inverse": "inverse", "random": "random"}


def run_train(cfg: RunConfig, stop_at: int | None = None) -> dict[str, Any]:
    """Stage 2 entry: tokenise the traces, probe if needed, train, write ``train/summary.json``.

    ``stop_at`` pauses after that step (the schedule still spans ``train.max_steps``); calling again
    with a later ``stop_at`` (or none) resumes from that checkpoint: how a sweep scores a trial
    part-way through its training.
    """
    from .cluster import ray_session
    from .models import declares_masked_lm, load_tokenizer
    from .traces import load_traces

    s = cfg.selection
    out = cfg.run_dir / "train"
    summary_path = out / "summary.json"
    target = min(stop_at or cfg.train.max_steps, cfg.train.max_steps)
    if summary_path.exists() and (out / "model" / "config.json").exists():
        previous = json.loads(summary_path.read_text())
        if previous.get("step", cfg.train.max_steps) >= target:
            print(f"[train] already at step {previous.get('step')}: {out / 'model'}", file=sys.stderr, flush=True)
            return previous
    traces = load_traces(cfg.run_dir)
    kind = cfg.student.kind
    if kind == "ar" and declares_masked_lm(cfg.student.ref):
        raise ConfigError(f"student.ref {cfg.student.ref} is a masked LM (a diffusion denoiser): set student.kind: dllm "
                          "and student.selector_ref")
    scoring_ref = cfg.student.selector_ref if kind == "dllm" else cfg.student.ref
    tokenizer = load_tokenizer(cfg.student.ref, trust_remote_code=cfg.student.trust_remote_code)
    examples, skipped = tokenize_traces(traces, tokenizer, system_prompt=cfg.data.system_prompt,
                                        chat_template=cfg.traces.chat_template, max_seq_len=cfg.data.max_seq_len)
    if len(examples) < cfg.train.batch_size:
        raise ValueError(f"only {len(examples)} usable traces under {cfg.run_dir / 'traces'} but train.batch_size is "
                         f"{cfg.train.batch_size}: lower the batch size or generate more traces")
    prompts = train_prompts(traces)
    probe = None
    if s.protocol in ("t3s_static", "inverse", "random"):
        probe = run_probe(cfg, examples, prompts, scoring_ref, cfg.student.ref)
    job = TrainJob(cfg=cfg.to_dict(), out_dir=str(out.resolve()), model_ref=cfg.student.ref, model_kind=kind,
                   scoring_ref=scoring_ref, keep_method=KEEP_OF_PROTOCOL[s.protocol],
                   online=s.protocol == "t3s_online", anchor_model=probe["bottleneck_model"] if probe else None,
                   max_steps=cfg.train.max_steps, store_name=f"t3s-store-{cfg.name}", prompts=prompts,
                   stop_at=target)
    with ray_session(cfg.ray):
        summary = fit(cfg, job, examples)
    summary.update({"step": target, "protocol": s.protocol, "skipped": {k: len(v) for k, v in skipped.items()},
                    "skipped_ids": skipped, "probe": probe})
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"[train] done in {summary['seconds']}s: final model {summary['model']}", file=sys.stderr, flush=True)
    return summary

