"""What the driver hands every rank: a frozen, typed ``WorkerSpec``, built once by ``worker_spec``.

A rank reads its settings from the spec and from nothing else: no ``RunConfig`` crosses to a rank, and
no rank parses one. What a rank would otherwise derive from the whole config (the store's refresh rule
for its model kind, the fingerprint a checkpoint must match, the online switch's generation spec and
verifier, the train prompts it samples) is decided here, on the driver, from the config it loaded.

``TrainJob`` is the older hand-over (the config as a dict plus the driver's decisions), still built by
tests and bench scripts: ``TrainJob.spec()`` turns it into a ``WorkerSpec`` through the same builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import (
    DiffusionTraining,
    EngineConfig,
    ModelConfig,
    RunConfig,
    SelectionConfig,
    StudentConfig,
    TrainConfig,
    diffusion_training,
    from_dict,
)
from ..protocols import PROTOCOLS, Protocol
from ..runfolder import run_settings
from ..tracking import TrackingSpec, tracking_spec, training_part

if TYPE_CHECKING:
    from ..generate import GenerationSpec
    from ..store import StoreClient


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
        """Whether the anchors come from a probe's θb (the protocol's row: selecting and not online)."""
        return self.protocol.needs_probe

    def masking_from_start(self) -> bool:
        return self.protocol.selects and (not self.online or self.switch == "immediate")

    def refreshes_before(self, step: int, masking_on: bool) -> bool:
        return self.online and masking_on and step > 0 and step % self.refresh_interval == 0

    def measures_accuracy_after(self, steps_done: int, masking_on: bool) -> bool:
        return self.online and self.switch == "bottleneck" and not masking_on and steps_done % self.accuracy_every == 0


@dataclass(frozen=True)
class SelectionSpec:
    """How a rank selects, beyond the plan's phases.

    Attributes:
        rule: The keyword arguments of ``store.refresh`` (``selection_rule``): AR anchors ``Δc > tau``
            or a top fraction; a dLLM's forced tokens ``Δc < −tau``.
        refresh_source: ``visits`` (the last confidences pushed) or ``scoring_pass`` (an exact pass
            of the current weights over every example before each refresh).
        mask_lo: dLLM forced-mask loss: the lowest mask ratio drawn.
        mask_hi: dLLM forced-mask loss: the highest mask ratio drawn.
        dllm_weighting: dLLM forced-mask loss: ``none`` or ``inv_t``.
    """

    rule: dict[str, Any]
    refresh_source: str
    mask_lo: float
    mask_hi: float
    dllm_weighting: str


@dataclass(frozen=True)
class OnlineSwitch:
    """The online protocol's bottleneck switch (``switch: bottleneck``): what each rank samples, how it
    scores the samples, and what it does once the bottleneck has passed.

    Attributes:
        generation: How a rank samples its own replica (the probe's sampling and length budget, the
            data's system prompt, the model being trained), on the hf backend in its own process.
        verifier: ``traces.verifier``'s name (``verify.VERIFIERS``; the config's validation checked it).
        prompts: The train prompts measured (``probe.max_prompts`` applied); rank r takes every
            ``world``-th from r.
        patience: Evaluations of rising accuracy after the minimum before masking is switched on.
        rewind: Restart from θ0 (weights and AdamW) at the switch.
    """

    generation: GenerationSpec
    verifier: str
    prompts: tuple[dict[str, Any], ...]
    patience: int
    rewind: bool


@dataclass(frozen=True)
class StoreSpec:
    """The run's ConfidenceStore: the named actors a Ray rank connects to, or the in-process store of a
    one-rank run without Ray (``train_standalone``), made with the same settings.

    Attributes:
        name: The actors' name prefix (``{name}-shard{i}``).
        shards: ``selection.store_shards``.
        namespace: ``ray.namespace``.
        trajectory_len: ``selection.trajectory_len``.
        summary: ``selection.summary``.
        ema_alpha: ``selection.ema_alpha``.
    """

    name: str
    shards: int
    namespace: str
    trajectory_len: int
    summary: str
    ema_alpha: float

    @property
    def kwargs(self) -> dict[str, Any]:
        """What a new store is made with."""
        return {"trajectory_len": self.trajectory_len, "summary": self.summary, "ema_alpha": self.ema_alpha}

    def create(self) -> StoreClient:
        """The driver starts the actors (``train.fit``)."""
        from ..store import create_store

        return create_store(self.name, self.shards, namespace=self.namespace, **self.kwargs)

    def connect(self) -> StoreClient:
        """A Ray rank's client of the driver's actors; ValueError when they are gone."""
        from ..store import connect_store

        return connect_store(self.name, self.shards, namespace=self.namespace)

    def local(self) -> StoreClient:
        """A store in this process, for one rank without Ray."""
        from ..store import local_store

        return local_store(self.shards, **self.kwargs)


@dataclass(frozen=True)
class WorkerSpec:
    """Exactly what a training rank reads: built once on the driver (``worker_spec``), pickled to every
    rank. Its sections are named as the ``RunConfig``'s where they are one (``student``, ``train``).

    Attributes:
        student: The student's settings (revision, output dtype, remote code, attention kernel, kind,
            mask token).
        train: The optimisation and batching settings.
        plan: The protocol's phases: when masking is on, when a rank refreshes or measures accuracy.
        selection: The store's refresh rule and source, the dLLM forced-mask loss.
        store: Where the ConfidenceStore is.
        out_dir: The training's folder (``runfolder.TrainFolder``).
        model_ref: The weights θ0 to start from.
        model_kind: ``ar`` or ``dllm``.
        scoring_ref: The AR model whose confidences fill the store (a dLLM's selector).
        anchor_model: θb, for the static protocols (its Δc picks the anchors once); None otherwise.
        max_steps: The schedule's horizon (cosine decay, last step).
        stop_at: Pause after this step (a checkpoint and the model are saved there).
        model_every: Also save a Hugging Face model every this many steps (0: never).
        settings: What the run computes with (``runfolder.run_settings``), recorded in each checkpoint
            and checked on resume.
        online: The bottleneck switch; None unless the protocol is online with ``switch: bottleneck``.
        confidence_sample: Record the token confidences of the first this many examples (at least one
            per rank) at θ0 and at each saved model (``model_every``) into
            ``TrainFolder.confidence_record`` (the probe's, for the report's bifurcation figure; 0: none).
        tracking: The tracked run rank 0 logs every step to (``report_to``'s trackers); None: TensorBoard
            only, in ``out_dir/tensorboard``.
        diffusion: A block-diffusion student's (LLaDA2) training layout, resolved on the driver from the
            student's config (``config.diffusion_training``): the keyword arguments of
            ``t3s.diffusion.diffusion_batch``. None for an AR training (the probe of a dLLM included)
            and for a LLaDA-style denoiser, which trains by LLaDA's objective.
    """

    student: StudentConfig
    train: TrainConfig
    plan: SelectionPlan
    selection: SelectionSpec
    store: StoreSpec
    out_dir: str
    model_ref: str
    model_kind: str
    scoring_ref: str
    anchor_model: str | None
    max_steps: int
    stop_at: int | None
    model_every: int
    settings: dict[str, Any]
    online: OnlineSwitch | None
    confidence_sample: int = 0
    tracking: TrackingSpec | None = None
    diffusion: DiffusionTraining | None = None


def selection_rule(selection: SelectionConfig, is_dllm: bool) -> dict[str, Any]:
    """The store's refresh rule: AR anchors ``Δc > tau`` (or top fraction); dLLM forced ``Δc < −tau``."""
    s = selection
    if is_dllm:
        return {"rule": "forced", "tau": s.tau, "max_anchor_frac": s.max_anchor_frac}
    return {"rule": s.rule, "tau": s.tau, "top_frac": s.top_frac, "max_anchor_frac": s.max_anchor_frac}


def online_switch(cfg: RunConfig, model_ref: str, prompts: list[dict[str, Any]]) -> OnlineSwitch:
    """The bottleneck switch of ``cfg``'s online protocol: a rank samples the model in training (``model_ref``)
    on the hf backend in its own process, so only the probe's length budget is taken from its engine."""
    from ..data import chat_options
    from ..generate import GenerationSpec

    p = cfg.probe
    generation = GenerationSpec(ModelConfig(ref=model_ref), EngineConfig(max_model_len=cfg.engine("probe").max_model_len),
                                cfg.sampling("probe"), system_prompt=cfg.data.system_prompt, **chat_options(cfg.traces))
    return OnlineSwitch(generation, cfg.traces.verifier, tuple(prompts[: p.max_prompts] if p.max_prompts else prompts),
                        p.patience, cfg.selection.rewind)


def worker_spec(cfg: RunConfig, plan: SelectionPlan, *, out_dir: str, model_ref: str, model_kind: str,
                scoring_ref: str, anchor_model: str | None, max_steps: int, store_name: str,
                stop_at: int | None = None, model_every: int = 0,
                prompts: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
                confidence_sample: int = 0, tracking: TrackingSpec | None = None) -> WorkerSpec:
    """The one place a ``WorkerSpec`` is made: ``cfg`` and what the driver decided for this training
    (``plan``: its protocol's phases; the refs, the horizon, the store's name, the train prompts, the
    sample whose confidences are recorded; the tracked run, by default the training's own:
    ``NAME/METHOD`` kept in ``out_dir``)."""
    s = cfg.selection
    bottleneck = plan.online and plan.switch == "bottleneck"
    diffusion = None
    if model_kind == "dllm" and cfg.student.kind == "dllm":
        from ..models import declares_block_diffusion

        # The student's own config says whether it trains by blocks (LLaDA2): read here, once, so that
        # every rank runs the same objective and a missing config is an error before any rank starts.
        revision = cfg.student.revision if model_ref == cfg.student.ref else None
        diffusion = diffusion_training(cfg, block_model=declares_block_diffusion(model_ref, revision=revision))
    return WorkerSpec(
        student=cfg.student, train=cfg.train, plan=plan,
        selection=SelectionSpec(selection_rule(s, model_kind == "dllm"), s.refresh_source, s.mask_lo, s.mask_hi,
                                s.dllm_weighting),
        store=StoreSpec(store_name, s.store_shards, cfg.ray.namespace, s.trajectory_len, s.summary, s.ema_alpha),
        out_dir=out_dir, model_ref=model_ref, model_kind=model_kind, scoring_ref=scoring_ref,
        anchor_model=anchor_model, max_steps=max_steps, stop_at=stop_at, model_every=model_every,
        settings=run_settings(cfg), online=online_switch(cfg, model_ref, list(prompts)) if bottleneck else None,
        confidence_sample=confidence_sample, tracking=tracking or tracking_spec(cfg, training_part(cfg), out_dir),
        diffusion=diffusion)


@dataclass
class TrainJob:
    """A training described as the config's dict plus the driver's decisions: the hand-over of before,
    which tests and bench scripts still build. ``spec()`` parses the config once and calls ``worker_spec``."""

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
    prompts: list[dict[str, Any]] = field(default_factory=list)  # train prompts (bottleneck accuracy)

    def spec(self) -> WorkerSpec:
        return worker_spec(from_dict(self.cfg), self.plan, out_dir=self.out_dir, model_ref=self.model_ref,
                           model_kind=self.model_kind, scoring_ref=self.scoring_ref, anchor_model=self.anchor_model,
                           max_steps=self.max_steps, store_name=self.store_name, stop_at=self.stop_at,
                           model_every=self.model_every, prompts=self.prompts)
