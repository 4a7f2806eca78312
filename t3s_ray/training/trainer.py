"""What one training rank does with a ``WorkerSpec``: ``setup``, ``train``, ``save_checkpoint``.

No Ray in here. The trainer is given its rank, world size and device (``distributed.Ranks``), a
store client (the Ray actors' ``StoreClient``, or ``store.local_store()`` in one process) and a
session (``sessions.RaySession`` or ``sessions.LocalSession``), so the same step runs under Ray Train
and under a plain ``torch.distributed`` process group (``train_standalone``, used by
``bench/gpu_check.py``).

Every step, each rank takes its share of a deterministic global batch, looks up the anchor masks of
its examples (prefetched from the store during the previous step), computes the token
log-probabilities once (they are both the loss, ``CE_t = -logprob_t``, and the confidence pushed to
the store), steps the optimizer, and pushes the detached confidences without waiting. Refreshes
(online protocol) are the only points where ranks wait for the store: each waits for its own
pushes, then rank 0 reclassifies and publishes a new mask version, so every rank trains on the same
version at the same step.

Memory (the arithmetic: the README's "Training at the paper's scale", ``bench/memory_plan.py``): the
model is built on the meta device, sharded under FSDP, materialised on the device and filled from
rank 0's one host copy; weights and AdamW state are fp32 with bf16 compute; checkpoints are sharded
(``torch.distributed.checkpoint``); only exported Hugging Face models (final, probe, stop points) are
gathered, one tensor at a time, on rank 0.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist_utils
from ..batching import (
    MicroBatch,
    build_micro_batch,
    epoch_of,
    global_batch,
    micro_batches,
    rank_share,
    token_budget_micro_batches,
)
from ..distributed import Ranks
from ..runfolder import TrainFolder, changed_keys
from ..t3s import KEEP_ALL
from .metrics import MetricsLog, peak_memory_gb, step_metrics
from .module import LogprobModule, export_hf_model, fsdp_units, score_examples
from .online import bottleneck_passed, sample_accuracy
from .sessions import LocalSession, Session
from .spec import TrainJob, WorkerSpec
from .steps import MaskPrefetcher, learning_rate, loss_denominator, padding_free, stable_seed

CHECKPOINT_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Everything about a run's progress that a checkpoint carries besides weights, optimizer and store."""

    step: int = 0
    epoch: int = 0
    data_cursor: int = 0              # examples consumed: step * batch_size
    mask_version: int = 0
    masking_on: bool = False
    accuracy: list[dict[str, Any]] = field(default_factory=list)  # online bottleneck measurements
    switched_at: int | None = None
    refreshed_at: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # what the run computes with (see run_settings)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        return cls(**json.loads(path.read_text()))


class StudentTrainer:
    """One rank of a training run: ``setup``, ``train``, ``save_checkpoint``."""

    def __init__(self, spec: WorkerSpec | TrainJob, examples: list[dict[str, Any]], ranks: Ranks, store,
                 session: Session):
        # ``cfg``: everything this rank reads (a TrainJob is turned into its spec here, once).
        self.cfg = spec.spec() if isinstance(spec, TrainJob) else spec
        self.examples, self.ranks, self.store, self.session = examples, ranks, store, session
        self.plan = self.cfg.plan
        self.rank, self.world, self.device = ranks.rank, ranks.world, ranks.device
        self.out_dir = Path(self.cfg.out_dir)
        self.n_examples = len(examples)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from ..models import (
            fill_token_id,
            is_masked_lm,
            load_tokenizer,
            mask_token_id,
            saved_dtype,
            uses_block_diffusion,
        )

        t, st = self.cfg.train, self.cfg.student
        torch.manual_seed(t.seed)
        dist_utils.use_expandable_segments(self.device)
        self.tokenizer = load_tokenizer(self.cfg.model_ref, trust_remote_code=st.trust_remote_code)
        self.is_dllm = self.cfg.model_kind == "dllm"
        self.bf16 = t.dtype == "bfloat16"
        self.sharded = t.strategy == "fsdp" and dist_utils.initialized()
        self.mesh = dist_utils.hybrid_mesh(t.fsdp_shard_size, self.device) if self.sharded else None
        self.packed = padding_free(st, t)
        self.export_dtype = (saved_dtype(self.cfg.model_ref, revision=st.revision, trust_remote_code=st.trust_remote_code)
                             if st.dtype == "auto" else getattr(torch, st.dtype))
        self.module = self._build_module(self.cfg.model_ref)
        self.model = self.module.model
        if is_masked_lm(self.model) and not self.is_dllm:
            raise ValueError(f"{self.cfg.model_ref} is a masked LM (a diffusion denoiser): set student.kind: dllm")
        self.diffusion = self.cfg.diffusion if self.is_dllm else None
        if self.is_dllm:
            self.mask_id = mask_token_id(self.tokenizer, st.mask_token, self.cfg.model_ref)
            if uses_block_diffusion(self.model) and self.diffusion is None:
                # LLaDA's objective would run a LLaDA2 student in the wrong regime (see docs/llada2.md).
                raise ValueError(f"{self.cfg.model_ref} is a block-diffusion LM (LLaDA2) but the worker spec has no "
                                 "diffusion layout: build the spec with training.spec.worker_spec")
            if self.diffusion is not None:
                self.fill_id = fill_token_id(self.model, self.tokenizer)
        # Which loss the steps compute, recorded in every metrics line (the rehearsal checks it).
        self.objective = ("ar" if not self.is_dllm else "masked_diffusion" if self.diffusion is None
                          else {"block": "block_diffusion", "full": "full_diffusion"}[self.diffusion.layout])
        self.state = TrainerState(masking_on=self.plan.masking_from_start(), settings=dict(self.cfg.settings))
        self._build_optimizer()
        with self.session.latest_checkpoint() as checkpoint:
            if checkpoint is None:
                self._initial_scoring()
                self._record_confidences(0)
            else:
                self._load_checkpoint(checkpoint)
        self.forward = self.module
        if self.world > 1 and not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.log = (MetricsLog(self.out_dir, self.cfg.max_steps, self.state.step, self.cfg.tracking)
                    if self.ranks.is_main else None)

    def _build_module(self, ref: str) -> LogprobModule:
        """``ref``'s architecture, sharded (FSDP) and allocated on this rank's device, weights not yet
        loaded: no rank ever holds a full copy it does not need."""
        from ..models import empty_model

        st = self.cfg.student
        model = empty_model(ref, revision=st.revision if ref == st.ref else None, trust_remote_code=st.trust_remote_code,
                            attn_implementation=st.attn_implementation)
        if self.cfg.train.activation_checkpointing and model.supports_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module = LogprobModule(model, self.cfg.train.confidence_chunk)
        if self.sharded:
            dist_utils.shard_model(module, fsdp_units(model), bf16_compute=self.bf16, mesh=self.mesh)
        dist_utils.materialize(module, self.device)
        module.train()
        return module

    def _load_weights(self, module: LogprobModule, ref: str) -> None:
        """Rank 0 reads ``ref`` into host memory; every rank keeps its part (strict: every key)."""
        from ..models import full_state

        st = self.cfg.student
        state = None
        if self.ranks.is_main:
            state = {f"model.{k}": v for k, v in full_state(
                ref, revision=st.revision if ref == st.ref else None, trust_remote_code=st.trust_remote_code).items()}
        dist_utils.load_full_state(module, state, ref)
        del state

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        # fused: one kernel over all parameters, no per-step temporaries the size of the model.
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                           weight_decay=t.weight_decay, fused=True)

    def _autocast(self):
        """bf16 compute over fp32 weights; under FSDP the mixed-precision policy does it instead."""
        if self.bf16 and not self.sharded:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- scoring passes
    def _collate(self, ids: list[int]) -> MicroBatch:
        return build_micro_batch(self.examples, ids, self.tokenizer.pad_token_id or 0, self.device, self.packed)

    def _score(self, module: LogprobModule) -> dict[int, np.ndarray]:
        return score_examples(module, self._collate, self.n_examples, self.ranks, self.cfg.train.micro_batch_size,
                              self._autocast)

    def _initial_scoring(self) -> None:
        """c0 for every token; for the static protocol also c(θb), then the one classification. The
        scorer is the training module itself (θb, then θ0, loaded into it) unless the scores come from
        another model (a dLLM's AR selector), which gets a sharded module of its own for the passes."""
        if self.ranks.is_main:
            # A from-scratch (re)start must not see an earlier attempt's visits or mask versions. One
            # rank registers every example in id order, so the store's layout (and its snapshots)
            # does not depend on which rank got there first.
            self.store.reset()
            self.store.register(np.arange(self.n_examples),
                                np.asarray([int(ex["target_mask"].sum()) for ex in self.examples]))
        dist_utils.barrier()
        same = self.cfg.scoring_ref == self.cfg.model_ref and not self.is_dllm
        scorer = self.module if same else self._build_module(self.cfg.scoring_ref)
        cb = None
        if self.cfg.anchor_model:
            self._load_weights(scorer, self.cfg.anchor_model)
            cb = self._score(scorer)
        self._load_weights(scorer, self.cfg.scoring_ref)
        c0 = self._score(scorer)
        if not same:
            # An FSDP2 module sits in reference cycles: without a collection its weights would stay on
            # the device for the whole training (the selector's: 16 GB for Ling-mini-2.0 in bf16).
            del scorer
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._load_weights(self.module, self.cfg.model_ref)
        self.store.set_base(np.asarray(list(c0)), list(c0.values()))
        if cb is not None:
            self.store.wait(self.store.record(0, np.asarray(list(cb)), list(cb.values())))
        dist_utils.barrier()
        if self.cfg.anchor_model and self.ranks.is_main:
            stats = self.store.refresh(0, **self.cfg.selection.rule)
            print(f"[train] static selection from {self.cfg.anchor_model}: anchor fraction "
                  f"{stats['anchor_frac']:.3f}", file=sys.stderr, flush=True)
        dist_utils.barrier()

    def _record_confidences(self, step: int) -> None:
        """The confidences of the first ``confidence_sample`` examples under the current weights, a
        scoring pass as the selection's, written by rank 0 (``TrainFolder.confidence_record``): the
        probe's trajectories, which the report draws without loading a model. A collective (under
        FSDP every forward is one); a resumed run rewrites what it replays."""
        from ..runfolder import write_confidences

        if not self.cfg.confidence_sample or self.is_dllm:  # a denoiser's forward gives no causal confidences
            return
        # At least one example per rank: a rank without any would have no batch to repeat.
        n = min(max(self.cfg.confidence_sample, self.world), self.n_examples)
        mine = score_examples(self.module, self._collate, n, self.ranks, self.cfg.train.micro_batch_size,
                              self._autocast)
        scores = {i: c for part in dist_utils.gather_objects(mine) for i, c in part.items()}
        if self.ranks.is_main:
            ids = sorted(scores)
            tokens = [np.asarray(self.examples[i]["input_ids"])[np.asarray(self.examples[i]["target_mask"], dtype=bool)]
                      for i in ids]
            write_confidences(TrainFolder(self.out_dir).confidence_record(step), ids, tokens, [scores[i] for i in ids])

    # ---------------------------------------------------------------- the loop
    def train(self) -> None:
        t = self.cfg.train
        pushes: list[Any] = []
        masks = MaskPrefetcher(self.store, lambda k: rank_share(
            global_batch(k, self.n_examples, t.batch_size, t.seed), self.rank, self.world))
        last = min(self.cfg.stop_at or self.cfg.max_steps, self.cfg.max_steps)
        while self.state.step < last:
            step = self.state.step
            started = time.perf_counter()
            batch = global_batch(step, self.n_examples, t.batch_size, t.seed)
            mine = rank_share(batch, self.rank, self.world)
            if self.plan.refreshes_before(step, self.state.masking_on) and self.state.refreshed_at != step:
                self.store.wait(pushes)  # the only point where ranks wait for the store
                pushes = []
                self._refresh(step)
                masks.drop()
            version, anchors = masks.get(step)
            self.state.mask_version = version
            if step + 1 < last and not self.plan.refreshes_before(step + 1, self.state.masking_on):
                masks.prefetch(step + 1)  # fetched during this step, so the next one does not wait
            lr = learning_rate(t, step, self.cfg.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            metrics = self._train_step(step, mine, anchors, pushes)
            self.state.step = step + 1
            self.state.epoch = epoch_of(step, self.n_examples, t.batch_size)
            self.state.data_cursor = self.state.step * t.batch_size
            # One all-reduce gives max(v) and max(-v) = -min(v) over ranks, and the memory peaks.
            peaks = dist_utils.all_reduce_numbers({"max": version, "neg_min": -version,
                                                   **peak_memory_gb(self.device)}, "max")
            metrics.update({"step": step + 1, "epoch": self.state.epoch, "lr": lr, "mask_version": version,
                            "mask_version_min_rank": int(-peaks.pop("neg_min")),
                            "mask_version_max_rank": int(peaks.pop("max")), "masking_on": self.state.masking_on,
                            "batch": batch, "step_time_s": time.perf_counter() - started, **peaks})
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
            if self.plan.measures_accuracy_after(step + 1, self.state.masking_on) and self._bottleneck_check(metrics):
                masks.drop()  # masks were republished
            if t.diagnostics_every and (step + 1) % t.diagnostics_every == 0:
                metrics.update(self._diagnostics(mine, anchors))
            if self.cfg.model_every and (step + 1) % self.cfg.model_every == 0:
                self._save_hf(TrainFolder(self.out_dir).saved_model(step + 1))
                self._record_confidences(step + 1)
            checkpoint_now = (step + 1) % t.checkpoint_every == 0 or step + 1 == last
            if checkpoint_now:
                self.store.wait(pushes)
                pushes = []
            if self.log:
                self.log.write(metrics)
            if checkpoint_now:
                self.save_checkpoint(metrics)
        self.store.wait(pushes)
        dist_utils.barrier()
        self._save_hf(TrainFolder(self.out_dir).model)
        if self.log:
            self.log.close()

    def _refresh(self, step: int) -> None:
        """Publish a new mask version; with ``refresh_source: scoring_pass`` first record an exact
        scoring pass of the current weights over every example (instead of the last visits)."""
        if self.cfg.selection.refresh_source == "scoring_pass":
            scores = self._score(self.module)
            self.store.wait(self.store.record(step, np.asarray(list(scores)), list(scores.values())))
        dist_utils.barrier()
        if self.ranks.is_main:
            self.store.refresh(step, **self.cfg.selection.rule)
        dist_utils.barrier()
        self.state.refreshed_at = step

    def _gradient_sync(self, last_micro_batch: bool):
        """Gradients are reduced once per step, after the last micro-batch: DDP's ``no_sync`` before
        it; FSDP2's ``set_requires_gradient_sync(False)`` unless ``train.fsdp_reduce_every_micro_batch``
        (which keeps only sharded gradients, at one reduce-scatter per micro-batch)."""
        if self.sharded:
            sync = last_micro_batch or self.cfg.train.fsdp_reduce_every_micro_batch
            self.module.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if last_micro_batch or not hasattr(self.forward, "no_sync"):
            return contextlib.nullcontext()
        return self.forward.no_sync()

    def _split(self, mine: list[int]) -> list[list[int]]:
        """This rank's micro-batches of a step (indices into ``mine``): fixed ``micro_batch_size`` rows,
        or cut under ``train.max_tokens_per_micro_batch``. Under FSDP every forward is a collective, so
        every rank runs as many micro-batches as the busiest one: the others repeat their last one
        with zero loss weight (``_train_step`` skips its metrics and pushes)."""
        t = self.cfg.train
        if t.max_tokens_per_micro_batch:
            parts = token_budget_micro_batches([len(self.examples[i]["input_ids"]) for i in mine],
                                               t.max_tokens_per_micro_batch, self.packed)
        else:
            parts = micro_batches(list(range(len(mine))), t.micro_batch_size)
        if self.sharded and t.max_tokens_per_micro_batch:
            most = int(dist_utils.all_reduce(torch.tensor([len(parts)], dtype=torch.float64), "max").item())
            parts += [[]] * (most - len(parts))
        return parts

    def _train_step(self, step: int, mine: list[int], anchors: list[np.ndarray], pushes: list) -> dict[str, Any]:
        from ..t3s import dllm_forced_mask, dllm_loss, keep_mask, token_loss_weights
        from ..t3s.diffusion import diffusion_batch

        t, s = self.cfg.train, self.cfg.selection
        method = self.plan.keep_method if self.state.masking_on else KEEP_ALL
        anchor_of = dict(zip(mine, anchors))
        # Kept targets per example, each drawn from a generator of its own (step, example): the
        # random protocol's draw does not depend on how the batch is split over ranks and micro-batches.
        keeps = {}
        for i in mine:
            generator = torch.Generator().manual_seed(stable_seed(t.seed, step, i))
            a = torch.as_tensor(np.asarray(anchor_of[i], dtype=bool))[None]
            keeps[i] = keep_mask(method, a, torch.ones_like(a), generator=generator)
        # The dLLM loss is a mean per micro-batch, averaged below.
        denom = 1.0 if self.is_dllm else loss_denominator(list(keeps.values()), t.loss_normalization)
        parts = self._split(mine)
        totals = {"loss": 0.0, "kept": 0, "targets": 0, "anchors": 0, "conf_anchor": 0.0, "conf_other": 0.0,
                  "tokens": 0, "computed_tokens": 0}
        for k, part in enumerate(parts):
            padding = not part  # an FSDP rank with fewer micro-batches than the busiest: zero weight
            ids = [mine[i] for i in (part or parts[0])]
            batch = self._collate(ids)
            anchor_mask = batch.to_positions([anchor_of[i] for i in ids])
            keep = batch.to_positions([keeps[i][0].numpy() for i in ids])
            with self._gradient_sync(k == len(parts) - 1), self._autocast():
                if self.is_dllm:
                    generator = torch.Generator().manual_seed(stable_seed(t.seed, "dllm", step, *ids))
                    forced = anchor_mask if self.state.masking_on else torch.zeros_like(anchor_mask)
                    if self.diffusion is not None:
                        # LLaDA2 (dFactory's regime): [noisy ; clean] under the block-diffusion mask (or
                        # the noisy row alone, layout full), forced tokens masked in the noisy half only;
                        # the mean no-shift CE over this micro-batch's masked tokens.
                        noisy = diffusion_batch(batch.input_ids, batch.attention_mask, batch.target_mask, forced,
                                                mask_id=self.mask_id, fill_id=self.fill_id, generator=generator,
                                                **asdict(self.diffusion))
                        loss, _ = self.forward(denoise=noisy)
                    else:
                        noised, masked, _ = dllm_forced_mask(batch.input_ids, batch.target_mask, forced, self.mask_id,
                                                             s.mask_lo, s.mask_hi, generator=generator)
                        logits = self.forward(noised, batch.attention_mask, batch.target_mask, logits_only=True)
                        loss = dllm_loss(logits, batch.input_ids, masked, weighting=s.dllm_weighting)
                    scaled, logprobs = loss / len(parts) * (0.0 if padding else 1.0), None
                else:
                    # Σ w·CE over this micro-batch is its share of the step's loss; × world because
                    # DDP and FSDP average gradients over ranks.
                    weights = batch.to_positions(
                        [token_loss_weights(keeps[i], t.loss_normalization, denom)[0].numpy() for i in ids],
                        dtype=torch.float32) * (0.0 if padding else self.world)
                    scaled, logprobs = self.forward(batch.input_ids, batch.attention_mask, batch.predicted_mask,
                                                    loss_weights=weights, **batch.packing)
                    loss = scaled.detach() / self.world
                scaled.backward()
            if padding:
                continue
            totals["loss"] += loss.item()
            totals["kept"] += int(keep.sum())
            totals["targets"] += int(batch.target_mask.sum())
            totals["anchors"] += int(anchor_mask.sum())
            totals["tokens"] += batch.real_tokens
            totals["computed_tokens"] += batch.computed_tokens
            if logprobs is not None:
                lp = logprobs.detach()
                totals["conf_anchor"] += float(lp[anchor_mask].sum())
                totals["conf_other"] += float(lp[batch.target_mask & ~anchor_mask].sum())
                pushes.extend(self.store.record(step, np.asarray(ids), batch.per_example(lp)))
        grad_norm = float("nan")
        if t.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), t.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**step_metrics(dist_utils.all_reduce_numbers(totals)), "grad_norm": grad_norm,
                "micro_batches": len(parts), "objective": self.objective}

    def _diagnostics(self, mine: list[int], anchors: list[np.ndarray]) -> dict[str, float]:
        """The paper's gradient-conflict measurement on this rank's first micro-batch (not under FSDP)."""
        from ..t3s import gradient_conflict

        if self.is_dllm or self.sharded:
            return {}
        n = self.cfg.train.micro_batch_size
        batch = self._collate(mine[:n])
        with self._autocast():
            # Unwrapped: no gradient synchronisation.
            logprobs = self.module(batch.input_ids, batch.attention_mask, batch.predicted_mask,
                                   **batch.packing)
        d = gradient_conflict(self.model, logprobs, batch.to_positions(anchors[:n]), batch.predicted_mask)
        self.optimizer.zero_grad(set_to_none=True)
        return {f"diag_{k}": v for k, v in d.items()}

    def _bottleneck_check(self, metrics: dict[str, Any]) -> bool:
        """Measure train accuracy; switch masking on once it has risen for ``patience`` evaluations
        (then classify from the trajectories so far, and with ``rewind`` restart from θ0). True on a switch."""
        online = self.cfg.online
        correct, total = sample_accuracy(self.model, self.tokenizer, online, self.rank, self.world,
                                         self.cfg.train.micro_batch_size * 4, self._autocast)
        counts = dist_utils.all_reduce(torch.tensor([correct, total], dtype=torch.float64))
        acc = float(counts[0] / max(1.0, counts[1]))
        history = self.state.accuracy
        history.append({"step": self.state.step, "accuracy": acc})
        metrics["train_accuracy"] = acc
        accs = [h["accuracy"] for h in history]
        if not bottleneck_passed(accs, online.patience):
            return False
        low = int(np.argmin(accs))
        self.state.masking_on, self.state.switched_at, metrics["switched"] = True, self.state.step, True
        if self.ranks.is_main:
            print(f"[train] bottleneck passed at step {self.state.step} (min accuracy {accs[low]:.3f} at step "
                  f"{history[low]['step']}): masking on", file=sys.stderr, flush=True)
        self._refresh(self.state.step)
        if online.rewind:
            self.rewind()
        return True

    def rewind(self) -> None:
        """Weights back to θ0 (read again, strictly), AdamW afresh: the static protocol in one run."""
        self._load_weights(self.module, self.cfg.model_ref)
        self._build_optimizer()

    # ---------------------------------------------------------------- checkpoints and exports
    def _save_hf(self, folder: Path) -> None:
        """A Hugging Face folder in ``student.dtype``: every rank takes part in the gather, rank 0 writes."""
        export_hf_model(self.module, self.tokenizer, self.export_dtype, folder)
        if self.is_dllm and self.ranks.is_main:
            from ..models import complete_export

            # A LLaDA2 export keeps the source's auto_map and its own modeling files (dInfer, SGLang and
            # the official code load it) and its generation config (the block sampler's EOS ids).
            st = self.cfg.student
            complete_export(self.cfg.model_ref, folder, revision=st.revision if self.cfg.model_ref == st.ref else None)

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Every rank writes its shard of the model and the optimizer and its RNG state, rank 0 the
        trainer state and the store snapshot; the step is reported to Ray Train with them.

        Only checkpoint steps are reported: Ray Train holds one report at a time and its controller
        collects it once per health check (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), so a report
        every step held each step up to 2 s (the lab's 150-step trainings took 316 s for 24 s of
        steps). Every step is in metrics.jsonl and TensorBoard."""
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}

        def write(folder: Path) -> None:
            dist_utils.save_sharded(folder / "dcp", self.module, self.optimizer)
            torch.save(dist_utils.rng_state(self.device), folder / f"rng_rank{self.rank}.pt")
            if self.ranks.is_main:
                self.store.save(folder / "store.npz")
                self.state.save(folder / CHECKPOINT_STATE)

        self.session.save_checkpoint(self.state.step, clean, write)

    def _load_checkpoint(self, ckpt: Path) -> None:
        """Trainer state (checked against this config), the sharded weights and optimizer, RNG, store."""
        saved = TrainerState.load(ckpt / CHECKPOINT_STATE)
        changed = changed_keys(saved.settings, self.state.settings)
        if changed:
            raise ValueError(f"the checkpoint {ckpt} was trained with other settings ({', '.join(changed[:8])}): "
                             "resume with the same config, or use a new run name")
        self.state = saved
        dist_utils.load_sharded(ckpt / "dcp", self.module, self.optimizer)
        rng = ckpt / f"rng_rank{self.rank}.pt"
        if rng.exists():
            dist_utils.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True), self.device)
        if self.ranks.is_main:
            self.store.load(ckpt / "store.npz")  # a restarted store shard comes back empty
            print(f"[train] resumed from step {self.state.step} ({ckpt})", file=sys.stderr, flush=True)
        dist_utils.barrier()


def train_standalone(spec: WorkerSpec | TrainJob, examples: list[dict[str, Any]], ranks: Ranks) -> StudentTrainer:
    """Run one rank of ``spec`` without Ray: an in-process store, checkpoints under
    ``out_dir/checkpoints`` (resumed from the latest). One rank: the ranks of a multi-process run
    share one store, which the Ray actors give (``t3s train``)."""
    if ranks.world != 1:
        raise ValueError(f"train_standalone runs one rank (its store is in-process), got world size {ranks.world}")
    spec = spec.spec() if isinstance(spec, TrainJob) else spec
    session = LocalSession(TrainFolder(Path(spec.out_dir)).checkpoints, ranks, spec.train.keep_last)
    trainer = StudentTrainer(spec, examples, ranks, spec.store.local(), session)
    trainer.setup()
    trainer.train()
    return trainer
