"""Stage 2, the driver: what runs where for a student training on Ray Train.

Read top to bottom:

* ``run_train``: tokenises the kept traces with the student's chat template, runs the probe when
  the protocol needs one (``run_probe``: SFT from θ0, train accuracy at each saved model,
  θb = argmin), then one ``fit``.
* ``worker_spec`` (``training/spec.py``), called once per training: the typed ``WorkerSpec`` that is
  all a rank reads (no ``RunConfig`` crosses to a rank).
* ``fit``: creates the ConfidenceStore actors and a ``TorchTrainer`` whose workers run
  ``train_loop_per_worker``: the Ray side of one rank (its context, store client and
  ``training.sessions.RaySession``), handed to ``training.trainer.StudentTrainer``, which is what one
  rank does.
* ``distributed.py`` holds the collectives and the sharded model state; ``t3s/`` the maths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .data import DataError, chat_options, tokenize_traces  # tokenize_traces lives in data.py (no pyarrow); re-exported
from .data import trace_prompt as _trace_prompt
from .protocols import PROTOCOLS
from .runfolder import RunLayout, TrainFolder, claim, load_traces, read_probe_result, stage_settings
from .tracking import TrackingSpec, open_run, tracking_spec
from .training.sessions import RaySession  # its home is training/sessions.py; importable from here as before
from .training.spec import SelectionPlan, WorkerSpec, worker_spec

# The probe records the token confidences of this many examples (the first) at θ0 and at each saved
# model, on its ranks: the report's bifurcation figure draws them (a few MB per saved model at 8k tokens
# a trace) instead of reloading every probe model on the driver.
PROBE_CONFIDENCE_SAMPLE = 48

# --------------------------------------------------------------------------------------------
# The Ray side of one rank
# --------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its rank and device from Ray Train's context, the store's client, Ray
    Train's session, and the spec and examples the driver handed over (``fit``)."""
    import ray
    import ray.train
    import torch

    from .distributed import Ranks
    from .training.trainer import StudentTrainer

    _quiet_report_log()
    spec: WorkerSpec = config["spec"]
    ctx = ray.train.get_context()
    device = torch.device("cpu")
    if spec.train.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    ranks = Ranks(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), device)
    trainer = StudentTrainer(spec, ray.get(config["examples"]), ranks, spec.store.connect(), RaySession())
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


def fit(cfg: RunConfig, spec: WorkerSpec, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Run one ``TorchTrainer`` whose workers train ``spec`` and return a summary; resumes from its own
    latest checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .cluster import prefetch_on_other_nodes

    prefetch_on_other_nodes(model_refs(cfg))
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:  # a store left by an earlier fit in this Ray session: start clean (a resume restores its snapshot)
        spec.store.connect().kill()
    except ValueError:
        pass
    store = spec.store.create()
    t = cfg.train
    # Ray Train's print patch sends each worker print to its logger *and* (Ray having redirected
    # stderr) to stderr, so every progress line reached the console twice. Ray Train hands this
    # variable from the driver to its controller and workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "examples": ray.put(examples)},
        # NCCL on GPUs, gloo on CPUs; the timeout bounds how long a collective waits for a slow rank.
        torch_config=TorchConfig(timeout_s=t.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": 1} if not t.use_gpu else None),
        run_config=RayRunConfig(name=TrainFolder(out).ray_train.name, storage_path=str(out.resolve()),
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
    folder = TrainFolder(out)
    folder.store_stats.write_text(json.dumps({"final": stats, "refreshes": history}, indent=2) + "\n")
    store.save(folder.store)
    store.kill()
    summary = {"out_dir": str(out), "model": str(folder.model), "seconds": round(time.time() - started, 1),
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


def probe_spec(cfg: RunConfig, scoring_ref: str) -> WorkerSpec:
    """The probe's training: SFT from θ0 (``scoring_ref``) for ``probe.steps``, a model every
    ``probe.eval_every`` steps, and the confidences of ``PROBE_CONFIDENCE_SAMPLE`` examples recorded at
    θ0 and at each of them (the report's figure)."""
    p = cfg.probe
    return worker_spec(cfg, SelectionPlan.for_protocol(cfg, "sft"),
                       out_dir=str(RunLayout(cfg.run_dir).probe.path.resolve()), model_ref=scoring_ref,
                       model_kind="ar", scoring_ref=scoring_ref, anchor_model=None, max_steps=p.steps,
                       store_name=f"t3s-store-{cfg.name}-probe", model_every=p.eval_every,
                       confidence_sample=PROBE_CONFIDENCE_SAMPLE,
                       tracking=tracking_spec(cfg, "probe", RunLayout(cfg.run_dir).probe.path,
                                              tags={"method": "probe", "protocol": "sft"}))


def run_probe(cfg: RunConfig, examples, prompts, scoring_ref: str, tokenizer_ref: str) -> dict[str, Any]:
    """The static protocol's probe: SFT from θ0, saving a model every ``probe.eval_every`` steps,
    train accuracy of each, θb = argmin (earliest on ties). Resumable; returns the probe result."""
    from .cluster import ray_session
    from .generate import GenerationSpec, generate_and_verify
    from .verify import score_counts

    probe = TrainFolder(RunLayout(cfg.run_dir).probe.path.resolve())  # its model paths are read by workers elsewhere
    probe_dir, result_path = probe.path, probe.result
    claim(probe_dir, "probe", stage_settings("probe", cfg))
    if result_path.exists():
        result = read_probe_result(probe_dir)
        if cfg.probe.diagnostics:  # the anchors, and so the record, depend on this run's selection
            from .probe_diagnostics import diagnostics_path, probe_diagnostics, read_diagnostics

            if read_diagnostics(probe_dir, cfg) is None:
                record = probe_diagnostics(cfg, examples, result, scoring_ref)
                diagnostics_path(probe_dir, cfg).write_text(json.dumps(record, indent=2) + "\n")
        return result
    p = cfg.probe
    spec = probe_spec(cfg, scoring_ref)
    tracked = spec.tracking  # the probe's training and its train accuracies (below) are one tracked run
    print(f"[probe] SFT from θ0 for {p.steps} steps, a model every {p.eval_every}", file=sys.stderr, flush=True)
    with ray_session(cfg.ray):
        fit(cfg, spec, examples)
        rows = prompts[: p.max_prompts] if p.max_prompts else prompts
        candidates = [(0, scoring_ref)] + [(probe.step_of(d), str(d)) for d in probe.saved_models()]
        accuracies = []
        engine = cfg.engine("probe")  # eval's engine unless a probe key overrides it
        engine = dataclasses.replace(engine, concurrency=max(1, min(engine.concurrency, len(rows))))
        for step, ref in candidates:
            spec = GenerationSpec(cfg.student.with_weights(ref), engine, cfg.sampling("probe"),
                                  system_prompt=cfg.data.system_prompt, **chat_options(cfg.traces))
            # Train accuracy is avg@k over the train prompts, scored as the evaluation stage scores.
            counts = [(len(samples), sum(s["correct"] for s in samples)) if samples else (p.sampling.samples, 0)
                      for _, samples, _err in generate_and_verify(rows, spec, cfg.traces.verifier,
                                                                  label=f"probe step {step}")]
            accuracy = score_counts(counts)["avg@k"]
            accuracies.append({"step": step, "accuracy": accuracy, "model": ref})
            print(f"[probe] step {step}: train accuracy {sum(c for _, c in counts)}/{sum(n for n, _ in counts)} "
                  f"= {accuracy:.3f}", file=sys.stderr, flush=True)
    result = {**choose_bottleneck(accuracies), "backend": engine.backend,
              "engine": {"concurrency": engine.concurrency, "gpus_per_engine": engine.gpus_per_engine,
                         "engine_kwargs": engine.engine_kwargs}}
    if p.diagnostics:  # what the probe tells before any T3S step (t3s_ray/probe_diagnostics.py)
        from .probe_diagnostics import probe_diagnostics

        result["diagnostics"] = probe_diagnostics(cfg, examples, result, scoring_ref)
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    track_probe(tracked, result)
    return result


def track_probe(tracked: TrackingSpec, result: dict[str, Any]) -> None:
    """The probe's train accuracy at each saved model (``probe/train_accuracy`` at its step) and θb,
    added to the tracked run of the probe's training."""
    with open_run(tracked) as run:
        for a in result["accuracies"]:
            run.log_metrics({"probe/train_accuracy": a["accuracy"]}, a["step"])
        best = next(a for a in result["accuracies"] if a["step"] == result["bottleneck_step"])
        run.log_table("probe_accuracies", [{"step": a["step"], "train_accuracy": a["accuracy"],
                                            "bottleneck": a["step"] == result["bottleneck_step"]}
                                           for a in result["accuracies"]])
        run.log_summary({"probe/bottleneck_step": result["bottleneck_step"],
                         "probe/bottleneck_accuracy": best["accuracy"], "probe/bottleneck_model": best["model"]})


def choose_bottleneck(accuracies: list[dict[str, Any]]) -> dict[str, Any]:
    """θb = the saved probe model with the lowest train accuracy, earliest on ties (θ0 excluded)."""
    candidates = [a for a in accuracies if a["step"] > 0]
    if not candidates:
        raise ValueError("the probe saved no model: probe.steps must be >= probe.eval_every")
    best = min(candidates, key=lambda a: (a["accuracy"], a["step"]))
    return {"accuracies": accuracies, "bottleneck_step": best["step"], "bottleneck_model": best["model"]}


def training_inputs(cfg: RunConfig) -> tuple[list[dict[str, Any]], dict[str, list], list[dict[str, Any]], str]:
    """``(examples, skipped, prompts, scoring_ref)``: the run's traces tokenised with the student's
    chat template, the rows skipped by reason, the train prompts, and the model whose confidences
    select tokens (the student, or a dLLM's AR selector)."""
    from .models import declares_masked_lm, fetch_weights, load_tokenizer

    traces = load_traces(cfg.run_dir)
    if cfg.student.kind == "ar" and declares_masked_lm(cfg.student.ref):
        raise ConfigError(f"student.ref {cfg.student.ref} is a masked LM (a diffusion denoiser): set student.kind: dllm "
                          "and student.selector_ref")
    scoring_ref = cfg.student.selector_ref if cfg.student.kind == "dllm" else cfg.student.ref
    for ref, revision in model_refs(cfg).items():  # downloaded and checked here, before any worker starts
        fetch_weights(ref, revision=revision)
    tokenizer = load_tokenizer(cfg.student.ref, trust_remote_code=cfg.student.trust_remote_code)
    examples, skipped = tokenize_traces(traces, tokenizer, system_prompt=cfg.data.system_prompt,
                                        max_seq_len=cfg.data.max_seq_len, **chat_options(cfg.traces))
    if len(examples) < cfg.train.batch_size:
        raise DataError(f"only {len(examples)} usable traces under {RunLayout(cfg.run_dir).traces.path} but "
                        f"train.batch_size is {cfg.train.batch_size}: lower the batch size or generate more traces")
    return examples, skipped, train_prompts(traces), scoring_ref


def model_refs(cfg: RunConfig) -> dict[str, str | None]:
    """The models a training loads (ref -> hub revision): the student, and a dLLM's AR selector."""
    refs = {cfg.student.ref: cfg.student.revision}
    if cfg.student.kind == "dllm" and cfg.student.selector_ref:
        refs.setdefault(cfg.student.selector_ref, None)
    return refs


def run_static_probe(cfg: RunConfig) -> dict[str, Any]:
    """The static probe of ``cfg``'s run on its own (resumable): what ``t3s run`` trains as its
    ``sft`` method when the two are the same training (``pipeline.sft_is_the_probe``)."""
    examples, _, prompts, scoring_ref = training_inputs(cfg)
    return run_probe(cfg, examples, prompts, scoring_ref, cfg.student.ref)


def run_train(cfg: RunConfig, stop_at: int | None = None) -> dict[str, Any]:
    """Stage 2 entry: tokenise the traces, probe if needed, train, write ``train/summary.json``.

    ``stop_at`` pauses after that step (the schedule still spans ``train.max_steps``); calling again
    with a later ``stop_at`` (or none) resumes from that checkpoint: how a sweep scores a trial
    part-way through its training.
    """
    from .cluster import ray_session

    s = cfg.selection
    folder = RunLayout(cfg.run_dir).train
    out, summary_path = folder.path, folder.summary
    # A finished or half-done training of other settings (or of traces redone since) is refused, never
    # returned as this config's model.
    claim(out, "train", stage_settings("train", cfg))
    target = min(stop_at or cfg.train.max_steps, cfg.train.max_steps)
    if summary_path.exists() and (folder.model / "config.json").exists():
        previous = json.loads(summary_path.read_text())
        # Where the model is now (the run folder may have been moved since it was written).
        previous.update({"out_dir": str(out), "model": str(folder.model)})
        if previous.get("step", cfg.train.max_steps) >= target:
            print(f"[train] already at step {previous.get('step')}: {folder.model}", file=sys.stderr, flush=True)
            return previous
    kind = cfg.student.kind
    examples, skipped, prompts, scoring_ref = training_inputs(cfg)
    needs_probe = PROTOCOLS[s.protocol].needs_probe
    probe = run_probe(cfg, examples, prompts, scoring_ref, cfg.student.ref) if needs_probe else None
    spec = worker_spec(cfg, SelectionPlan.for_protocol(cfg), out_dir=str(out.resolve()), model_ref=cfg.student.ref,
                       model_kind=kind, scoring_ref=scoring_ref,
                       anchor_model=probe["bottleneck_model"] if probe else None, max_steps=cfg.train.max_steps,
                       store_name=f"t3s-store-{cfg.name}", prompts=prompts, stop_at=target,
                       model_every=cfg.eval.trajectory_every)
    with ray_session(cfg.ray):
        summary = fit(cfg, spec, examples)
    summary.update({"step": target, "protocol": s.protocol, "skipped": {k: len(v) for k, v in skipped.items()},
                    "skipped_ids": skipped, "probe": probe})
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"[train] done in {summary['seconds']}s: final model {summary['model']}", file=sys.stderr, flush=True)
    return summary

