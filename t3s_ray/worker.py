"""What one training rank does with a ``TrainJob``: ``setup``, ``train``, ``save_checkpoint``.

No Ray in here. The worker is given its rank, world size and device (``distributed.Ranks``), a
store client (the Ray actors' ``StoreClient``, or ``store.local_store()`` in one process) and a
session (where checkpoints go and metrics are reported: Ray Train's, or ``LocalSession``), so the
same step runs under Ray Train and under a plain ``torch.distributed`` process group
(``train_standalone``, used by ``bench/gpu_check.py``).

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
import hashlib
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist_utils
from .batching import (
    MicroBatch,
    build_micro_batch,
    epoch_of,
    global_batch,
    micro_batches,
    rank_share,
    token_budget_micro_batches,
)
from .config import EngineConfig, ModelConfig, RunConfig, from_dict
from .distributed import Ranks
from .protocols import PROTOCOLS, Protocol
from .runfolder import TrainFolder, changed_keys, run_settings  # run_settings: re-exported (its old home)
from .t3s import KEEP_ALL, token_confidence, token_loss_and_confidence

CHECKPOINT_STATE = "trainer_state.json"


# --------------------------------------------------------------------------------------------
# What the driver hands every rank, and the state that crosses a checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionPlan:
    """What the selection config means for one training run, answered in one place.

    Attributes:
        protocol: The protocol's row (``protocols.PROTOCOLS``): its keep rule once masking is on
            (``keep_method``), and whether it reclassifies from the training trajectories every
            ``refresh_interval`` steps (``online``).
        switch: Online: ``immediate`` masks from the first refresh, ``bottleneck`` once train
            accuracy has risen after its minimum.
        refresh_interval: Online: steps between refreshes.
        accuracy_every: Online with ``switch: bottleneck``: steps between train-accuracy measurements.
    """

    protocol: Protocol = PROTOCOLS["sft"]
    switch: str = "immediate"
    refresh_interval: int = 1
    accuracy_every: int = 1

    @classmethod
    def for_protocol(cls, cfg: RunConfig, protocol: str | None = None) -> SelectionPlan:
        s = cfg.selection
        return cls(PROTOCOLS[protocol or s.protocol], s.switch, s.refresh_interval, cfg.probe.eval_every)

    @property
    def keep_method(self) -> str:
        """Which targets a step keeps once masking is on (``t3s.keep_mask``'s method)."""
        return self.protocol.keep

    @property
    def online(self) -> bool:
        return self.protocol.online

    @property
    def needs_probe(self) -> bool:
        """The static protocols' anchors come from a probe's θb (``t3s_static``, ``inverse``, ``random``)."""
        return self.protocol.needs_probe

    def masking_from_start(self) -> bool:
        return self.protocol.selects and (not self.online or self.switch == "immediate")

    def refreshes_before(self, step: int, masking_on: bool) -> bool:
        return self.online and masking_on and step > 0 and step % self.refresh_interval == 0

    def measures_accuracy_after(self, steps_done: int, masking_on: bool) -> bool:
        return self.online and self.switch == "bottleneck" and not masking_on and steps_done % self.accuracy_every == 0


@dataclass
class TrainJob:
    """One training run: the config plus what the driver decided (protocol phase, paths, store)."""

    cfg: dict[str, Any]
    out_dir: str
    model_ref: str                    # the weights θ0 to start from
    model_kind: str                   # "ar" or "dllm"
    scoring_ref: str                  # the AR model whose confidences fill the store (selector for dLLM)
    plan: SelectionPlan
    anchor_model: str | None          # θb for the static protocol (its Δc picks the anchors once)
    max_steps: int                    # the schedule's horizon (cosine decay, last step)
    store_name: str
    stop_at: int | None = None        # pause after this step (a checkpoint and the model are saved there)
    model_every: int = 0              # also save a Hugging Face model every this many steps (the probe)
    examples_ref: Any = None          # Ray ObjectRef of the tokenised examples (Ray Train workers)
    prompts: list[dict[str, Any]] = field(default_factory=list)  # train prompts (bottleneck accuracy)


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


# --------------------------------------------------------------------------------------------
# Sessions: where checkpoints go and metrics are reported
# --------------------------------------------------------------------------------------------


class LocalSession:
    """Checkpoints in ``root/step-NNNNNN`` folders on a filesystem every rank shares (no Ray)."""

    def __init__(self, root: Path, ranks: Ranks, keep_last: int = 0):
        self.root, self.ranks, self.keep_last = Path(root), ranks, keep_last

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        done = sorted(p for p in self.root.glob("step-*") if (p / ".complete").exists())
        yield done[-1] if done else None

    def save_checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
        folder = self.root / f"step-{step:06d}"
        write_checkpoint_folder(folder, self.ranks.is_main, write)
        if self.ranks.is_main:
            (folder / ".complete").write_text("ok\n")
            done = sorted(p for p in self.root.glob("step-*") if (p / ".complete").exists())
            for old in done[: -self.keep_last] if self.keep_last else []:
                shutil.rmtree(old)


def write_checkpoint_folder(folder: Path, is_main: bool, write: Callable[[Path], None]) -> None:
    """Every rank writes its part of one checkpoint straight into ``folder``, on the storage that all
    ranks share (never staged in node-local ``/tmp`` first: Qwen3-8B's sharded weights and AdamW
    state are 98 GB per checkpoint, Qwen3-32B's 393 GB, more than a node's local disk or a tmpfs
    ``/tmp`` in host RAM can take). Rank 0 empties the folder first (what an interrupted attempt at
    the same step left), and no rank returns before every rank has written."""
    if is_main:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    dist_utils.barrier()
    write(folder)
    dist_utils.barrier()


# --------------------------------------------------------------------------------------------
# The model every rank runs
# --------------------------------------------------------------------------------------------


class LogprobModule(torch.nn.Module):
    """Forward = per-token log-probabilities (AR), the weighted training loss with them, or logits
    (dLLM denoiser), so that DDP/FSDP wrap the whole computation, chunked lm head included, and
    synchronise its gradients."""

    def __init__(self, model, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, target_mask, logits_only: bool = False, loss_weights=None,
                position_ids=None, cu_seq_lens=None, max_seq_len=None):
        """``logits_only``: the logits. ``loss_weights`` (``[B, T]``): ``(Σ w·CE, confidences detached)``
        with the lm head's backward done in the forward pass. Else: differentiable log-probabilities."""
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


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def _peak_memory_gb(device: torch.device) -> dict[str, float]:
    """This process's peak host RSS and (on CUDA) peak allocated device memory, in GB."""
    out = {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # Linux: KiB
    if device.type == "cuda":
        out["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class StudentTrainer:
    """One rank of a training run: ``setup``, ``train``, ``save_checkpoint``."""

    def __init__(self, job: TrainJob, examples: list[dict[str, Any]], ranks: Ranks, store, session):
        self.job, self.examples, self.ranks, self.store, self.session = job, examples, ranks, store, session
        self.cfg = from_dict(job.cfg)
        self.plan = job.plan
        self.rank, self.world, self.device = ranks.rank, ranks.world, ranks.device
        self.out_dir = Path(job.out_dir)
        self.n_examples = len(examples)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from .models import is_masked_lm, load_tokenizer, mask_token_id, saved_dtype

        t, st = self.cfg.train, self.cfg.student
        torch.manual_seed(t.seed)
        dist_utils.use_expandable_segments(self.device)
        self.tokenizer = load_tokenizer(self.job.model_ref, trust_remote_code=st.trust_remote_code)
        self.is_dllm = self.job.model_kind == "dllm"
        self.bf16 = t.dtype == "bfloat16"
        self.sharded = t.strategy == "fsdp" and dist_utils.initialized()
        self.mesh = dist_utils.hybrid_mesh(t.fsdp_shard_size, self.device) if self.sharded else None
        self.packed = padding_free(self.cfg)
        self.export_dtype = (saved_dtype(self.job.model_ref, revision=st.revision, trust_remote_code=st.trust_remote_code)
                             if st.dtype == "auto" else getattr(torch, st.dtype))
        self.module = self._build_module(self.job.model_ref)
        self.model = self.module.model
        if is_masked_lm(self.model) and not self.is_dllm:
            raise ValueError(f"{self.job.model_ref} is a masked LM (a diffusion denoiser): set student.kind: dllm")
        if self.is_dllm:
            self.mask_id = mask_token_id(self.tokenizer, st.mask_token, self.job.model_ref)
        self.state = TrainerState(masking_on=self.plan.masking_from_start(), settings=run_settings(self.cfg))
        self._build_optimizer()
        with self.session.latest_checkpoint() as checkpoint:
            if checkpoint is None:
                self._initial_scoring()
            else:
                self._load_checkpoint(checkpoint)
        self.forward = self.module
        if self.world > 1 and not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.log = MetricsLog(self.out_dir, self.job.max_steps, self.state.step) if self.ranks.is_main else None

    def _build_module(self, ref: str) -> LogprobModule:
        """``ref``'s architecture, sharded (FSDP) and allocated on this rank's device, weights not yet
        loaded: no rank ever holds a full copy it does not need."""
        from .models import empty_model

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
        from .models import full_state

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
        same = self.job.scoring_ref == self.job.model_ref and not self.is_dllm
        scorer = self.module if same else self._build_module(self.job.scoring_ref)
        cb = None
        if self.job.anchor_model:
            self._load_weights(scorer, self.job.anchor_model)
            cb = self._score(scorer)
        self._load_weights(scorer, self.job.scoring_ref)
        c0 = self._score(scorer)
        if not same:
            # An FSDP2 module sits in reference cycles: without a collection its weights would stay on
            # the device for the whole training (the selector's: 16 GB for Ling-mini-2.0 in bf16).
            del scorer
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._load_weights(self.module, self.job.model_ref)
        self.store.set_base(np.asarray(list(c0)), list(c0.values()))
        if cb is not None:
            self.store.wait(self.store.record(0, np.asarray(list(cb)), list(cb.values())))
        dist_utils.barrier()
        if self.job.anchor_model and self.ranks.is_main:
            stats = self.store.refresh(0, **selection_rule(self.cfg, self.is_dllm))
            print(f"[train] static selection from {self.job.anchor_model}: anchor fraction "
                  f"{stats['anchor_frac']:.3f}", file=sys.stderr, flush=True)
        dist_utils.barrier()

    # ---------------------------------------------------------------- the loop
    def train(self) -> None:
        t = self.cfg.train
        pushes: list[Any] = []
        masks = MaskPrefetcher(self.store, lambda k: rank_share(
            global_batch(k, self.n_examples, t.batch_size, t.seed), self.rank, self.world))
        last = min(self.job.stop_at or self.job.max_steps, self.job.max_steps)
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
            lr = learning_rate(t, step, self.job.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            metrics = self._train_step(step, mine, anchors, pushes)
            self.state.step = step + 1
            self.state.epoch = epoch_of(step, self.n_examples, t.batch_size)
            self.state.data_cursor = self.state.step * t.batch_size
            # One all-reduce gives max(v) and max(-v) = -min(v) over ranks, and the memory peaks.
            peaks = dist_utils.all_reduce_numbers({"max": version, "neg_min": -version,
                                                   **_peak_memory_gb(self.device)}, "max")
            metrics.update({"step": step + 1, "epoch": self.state.epoch, "lr": lr, "mask_version": version,
                            "mask_version_min_rank": int(-peaks.pop("neg_min")),
                            "mask_version_max_rank": int(peaks.pop("max")), "masking_on": self.state.masking_on,
                            "batch": batch, "step_time_s": time.perf_counter() - started, **peaks})
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
            if self.plan.measures_accuracy_after(step + 1, self.state.masking_on) and self._bottleneck_check(metrics):
                masks.drop()  # masks were republished
            if t.diagnostics_every and (step + 1) % t.diagnostics_every == 0:
                metrics.update(self._diagnostics(mine, anchors))
            if self.job.model_every and (step + 1) % self.job.model_every == 0:
                self._save_hf(TrainFolder(self.out_dir).saved_model(step + 1))
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
            self.store.refresh(step, **selection_rule(self.cfg, self.is_dllm))
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
        from .t3s import dllm_forced_mask, dllm_loss, keep_mask, token_loss_weights

        t, s = self.cfg.train, self.cfg.selection
        method = self.plan.keep_method if self.state.masking_on else KEEP_ALL
        anchor_of = dict(zip(mine, anchors))
        # Kept targets per example, each drawn from a generator of its own (step, example): the
        # random protocol's draw does not depend on how the batch is split over ranks and micro-batches.
        keeps = {}
        for i in mine:
            generator = torch.Generator().manual_seed(_stable_seed(t.seed, step, i))
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
                    generator = torch.Generator().manual_seed(_stable_seed(t.seed, "dllm", step, *ids))
                    forced = anchor_mask if self.state.masking_on else torch.zeros_like(anchor_mask)
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
                "micro_batches": len(parts)}

    def _diagnostics(self, mine: list[int], anchors: list[np.ndarray]) -> dict[str, float]:
        """The paper's gradient-conflict measurement on this rank's first micro-batch (not under FSDP)."""
        from .t3s import gradient_conflict

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
        correct, total = sample_accuracy(self.model, self.tokenizer, self.job.prompts, self.cfg, self.job.model_ref,
                                         self.rank, self.world, self._autocast)
        counts = dist_utils.all_reduce(torch.tensor([correct, total], dtype=torch.float64))
        acc = float(counts[0] / max(1.0, counts[1]))
        history = self.state.accuracy
        history.append({"step": self.state.step, "accuracy": acc})
        metrics["train_accuracy"] = acc
        accs = [h["accuracy"] for h in history]
        if not bottleneck_passed(accs, self.cfg.probe.patience):
            return False
        low = int(np.argmin(accs))
        self.state.masking_on, self.state.switched_at, metrics["switched"] = True, self.state.step, True
        if self.ranks.is_main:
            print(f"[train] bottleneck passed at step {self.state.step} (min accuracy {accs[low]:.3f} at step "
                  f"{history[low]['step']}): masking on", file=sys.stderr, flush=True)
        self._refresh(self.state.step)
        if self.cfg.selection.rewind:
            self.rewind()
        return True

    def rewind(self) -> None:
        """Weights back to θ0 (read again, strictly), AdamW afresh: the static protocol in one run."""
        self._load_weights(self.module, self.job.model_ref)
        self._build_optimizer()

    # ---------------------------------------------------------------- checkpoints and exports
    def _save_hf(self, folder: Path) -> None:
        """A Hugging Face folder in ``student.dtype``: every rank takes part in the gather, rank 0 writes."""
        export_hf_model(self.module, self.tokenizer, self.export_dtype, folder)

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


def loss_denominator(keeps: list[torch.Tensor], normalization: str) -> float:
    """The loss normaliser of a step: kept tokens (``token_mean``) or rows with a kept token
    (``seq_mean``) over the whole global batch, every micro-batch of every rank, so that the update
    does not depend on how the batch is split over workers and micro-batches; 1 for ``sum``."""
    if normalization == "sum":
        return 1.0
    count = sum(float((k.any(-1) if normalization == "seq_mean" else k).sum()) for k in keeps)
    return max(1.0, dist_utils.all_reduce(torch.tensor([count], dtype=torch.float64)).item())


def padding_free(cfg: RunConfig) -> bool:
    """Whether micro-batches are packed into one row (``train.padding_free``; by default exactly when
    the attention kernel is flash attention, whose variable-length path keeps the rows apart)."""
    if cfg.student.kind == "dllm":
        return False
    if cfg.train.padding_free is not None:
        return cfg.train.padding_free
    return cfg.student.attn_implementation.startswith("flash_attention")


def step_metrics(totals: dict[str, float]) -> dict[str, Any]:
    """A step's metrics from its totals summed over ranks."""
    n_other = totals["targets"] - totals["anchors"]
    return {
        "padding_frac": 1 - totals["tokens"] / max(1, totals["computed_tokens"]),
        "loss": totals["loss"],
        "kept_frac": totals["kept"] / max(1, totals["targets"]),
        "anchor_frac": totals["anchors"] / max(1, totals["targets"]),
        "mean_conf_anchor": totals["conf_anchor"] / totals["anchors"] if totals["anchors"] else None,
        "mean_conf_other": totals["conf_other"] / n_other if n_other else None,
        "tokens": int(totals["tokens"]),
    }


def learning_rate(t, step: int, max_steps: int) -> float:
    """``train.lr`` at ``step``: linear warmup, then constant or cosine decay to ``max_steps``."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps)
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr


def selection_rule(cfg: RunConfig, is_dllm: bool) -> dict[str, Any]:
    """The store's refresh rule: AR anchors ``Δc > tau`` (or top fraction); dLLM forced ``Δc < −tau``."""
    s = cfg.selection
    if is_dllm:
        return {"rule": "forced", "tau": s.tau, "max_anchor_frac": s.max_anchor_frac}
    return {"rule": s.rule, "tau": s.tau, "top_frac": s.top_frac, "max_anchor_frac": s.max_anchor_frac}


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


def bottleneck_passed(accuracies: list[float], patience: int) -> bool:
    """True once train accuracy has risen at each of the last ``patience`` evaluations, all of them
    after its minimum (the first minimum): the imitation bottleneck is behind us."""
    if len(accuracies) < patience + 1:
        return False
    low = int(np.argmin(accuracies))
    recent = accuracies[-patience - 1:]
    return len(accuracies) - 1 - low >= patience and all(b > a for a, b in zip(recent, recent[1:]))


def sample_accuracy(model, tokenizer, prompts: list[dict[str, Any]], cfg: RunConfig, model_ref: str, rank: int,
                    world: int, autocast) -> tuple[int, int]:
    """(correct, sampled) for this rank's share of the train prompts, sampled from its own replica
    of the model in training (``probe.sampling.samples`` each): the online protocol's bottleneck detector."""
    from .engines.hf import HFGenerator
    from .generate import GenerationSpec, prepare_requests
    from .verify import get_verifier

    p = cfg.probe
    mine = (prompts[: p.max_prompts] if p.max_prompts else prompts)[rank::world]
    # This replica, on the hf backend in this process: only the probe's length budget is its engine's.
    spec = GenerationSpec(ModelConfig(ref=model_ref), EngineConfig(max_model_len=cfg.engine("probe").max_model_len),
                          cfg.sampling("probe"), system_prompt=cfg.data.system_prompt)
    requests, _ = prepare_requests(mine, spec, tokenizer)
    gen = HFGenerator.from_model(model, tokenizer, spec.sampling.temperature, 1.0)
    check = get_verifier(cfg.traces.verifier)
    answers = {r["id"]: r.get("answer") for r in mine}
    model.eval()
    correct, chunk = 0, cfg.train.micro_batch_size * 4
    with torch.no_grad(), autocast():
        for i in range(0, len(requests), chunk):
            for out in gen.generate_rows(requests[i:i + chunk]):
                correct += bool(not out.get("error") and check(out["response"], answers[out["id"]]).correct)
    model.train()
    tokenizer.padding_side = "right"
    return correct, len(requests)


class MetricsLog:
    """Rank 0's record of the run: ``metrics.jsonl``, TensorBoard, a progress line every 5 steps."""

    def __init__(self, out_dir: Path, max_steps: int, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.max_steps = TrainFolder(out_dir).metrics, max_steps
        if self.path.exists():  # after a resume, drop the lines of steps that are about to be redone
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resumed_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.tb = SummaryWriter(str(TrainFolder(out_dir).tensorboard))

    def write(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.tb.add_scalar(key, value, metrics["step"])
        if metrics["step"] == 1 or metrics["step"] % 5 == 0 or metrics["step"] == self.max_steps:
            print(f"[train] step {metrics['step']}/{self.max_steps} loss {metrics['loss']:.4f} "
                  f"kept {metrics['kept_frac']:.2f} anchors {metrics['anchor_frac']:.2f} "
                  f"{metrics['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.tb.close()


def train_standalone(job: TrainJob, examples: list[dict[str, Any]], ranks: Ranks) -> StudentTrainer:
    """Run one rank of ``job`` without Ray: an in-process store, checkpoints under
    ``out_dir/checkpoints`` (resumed from the latest). One rank: the ranks of a multi-process run
    share one store, which the Ray actors give (``t3s train``)."""
    from .store import local_store

    if ranks.world != 1:
        raise ValueError(f"train_standalone runs one rank (its store is in-process), got world size {ranks.world}")
    cfg = from_dict(job.cfg)
    s = cfg.selection
    store = local_store(s.store_shards, trajectory_len=s.trajectory_len, summary=s.summary, ema_alpha=s.ema_alpha)
    session = LocalSession(TrainFolder(Path(job.out_dir)).checkpoints, ranks, cfg.train.keep_last)
    trainer = StudentTrainer(job, examples, ranks, store, session)
    trainer.setup()
    trainer.train()
    return trainer
