"""What a run folder's stages were computed with, so that a rerun resumes only what it would compute again.

Each stage folder (``traces/``, ``probe/``, ``train/``, each ``eval/LABEL/``) holds ``settings.json``:
the settings that determine its output, written when the stage first starts. A rerun with the same settings resumes;
with other ones it is refused, naming the changed keys and the two ways out (a new ``name``, or
``--restart STAGE``), instead of mixing old and new output in one folder or returning a model
trained with something else. Operational settings (actors, batch sizes of the engines, how often a
checkpoint is written) may change. An evaluation's settings include a fingerprint of its model's
weights, so that scores of a model since retrained in the same folder are never returned as its
scores; benchmarks added to ``eval.benchmarks`` are simply run, one whose definition changed is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, EngineSettings, RunConfig

SETTINGS_FILE = "settings.json"
# How the teacher is run, not what it writes.
_TRACES_OPERATIONAL = ("backend", "concurrency", "batch_size", "max_model_len", "engine_kwargs", "num_gpus_per_actor")
_ENDPOINT_KEEP = ("model",)  # of traces.endpoint: the rest is how the server is reached
_EVAL_OPERATIONAL = ("benchmarks", "sources", "trajectory_every", *_TRACES_OPERATIONAL)  # benchmarks: per benchmark
RESTARTABLE = ("traces", "probe", "train", "eval")


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def seeding(stage: str, engine: EngineSettings) -> dict[str, Any]:
    """``{stage}.seed_requests: False`` where the stage's vLLM requests go without seeds, else nothing.

    Unseeded requests draw other samples than seeded ones, so a stage may not resume under the other
    choice; recorded only when unseeded because every folder written before the key existed holds
    seeded samples (and the other backends seed whatever the key says), and those resume."""
    return {} if engine.backend != "vllm" or engine.seed_requests else {f"{stage}.seed_requests": False}


def traces_settings(cfg: RunConfig) -> dict[str, Any]:
    """Teacher, prompt data, sampling, verifier and keep policy: what decides which traces are written."""
    d = cfg.to_dict()
    traces = {k: v for k, v in d["traces"].items() if k not in (*_TRACES_OPERATIONAL, "seed_requests")}
    traces["endpoint"] = {k: v for k, v in traces["endpoint"].items() if k in _ENDPOINT_KEEP}
    data = {k: v for k, v in d["data"].items() if k != "max_seq_len"}  # a training setting
    out = {**flatten("data", data), **flatten("traces", traces)}
    if cfg.traces.source == "generate":
        out.update(seeding("traces", cfg.engine("traces")))
    if cfg.traces.source == "generate" and cfg.traces.backend != "openai":
        out.update(flatten("teacher", {k: d["teacher"][k] for k in ("ref", "revision", "trust_remote_code")}))
    return out


def eval_settings(cfg: RunConfig, model_ref: str, model_dtype: str) -> dict[str, Any]:
    """The sampling settings and the model (its weights, or a hub id, and its dtype): what decides an
    evaluation's samples. Each benchmark's own definition is recorded with its scores."""
    from .models import weights_fingerprint

    ev = {k: v for k, v in cfg.to_dict()["eval"].items() if k not in (*_EVAL_OPERATIONAL, "seed_requests")}
    if ev["seed"] is None:
        ev["seed"] = cfg.seed
    # A local model is its weights, wherever its folder is (a run folder moved keeps its scores); a
    # hub id is its name.
    weights = weights_fingerprint(model_ref)
    model = {"model": model_ref} if weights == model_ref else {"model.weights": weights}
    return {**flatten("eval", ev), **seeding("eval", cfg.engine("eval")), **model, "model.dtype": model_dtype}


def traces_fingerprint(manifest: dict[str, Any]) -> str:
    """A short hash of the trace shards a manifest lists: training records it, so that traces redone
    under it are noticed."""
    return hashlib.sha256(json.dumps(manifest.get("shards", {}), sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def has_output(folder: Path) -> bool:
    """Whether a stage folder holds anything computed: trace shards, checkpoints, models, results."""
    return any(folder.glob("*/part-*.parquet")) or any(folder.glob("ray_train/checkpoint_*")) or \
        any(folder.glob("checkpoints/step-*")) or (folder / "model").exists() or (folder / "result.json").exists() or \
        (folder / "scores.json").exists()


def claim(folder: Path, stage: str, settings: dict[str, Any], new_folder: str = "a new `name`") -> None:
    """Record ``settings`` as what ``folder`` is computed with, or check them against the recorded ones
    (a folder whose stage failed before computing anything is simply claimed again). ``new_folder``
    names the other way out than a restart, in the error."""
    path = folder / SETTINGS_FILE
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back
    if path.exists() and has_output(folder):
        saved = json.loads(path.read_text())["settings"]
        changed = changed_keys(saved, settings)
        if changed:
            shown = ", ".join(f"{k} ({saved.get(k)!r} -> {settings.get(k)!r})" for k in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise ConfigError(f"{folder} holds the {stage} stage of other settings: {shown}{more}; run under "
                              f"{new_folder}, or rerun with --restart {stage} to redo that stage")
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage": stage, "settings": settings}, indent=2) + "\n")


def restart(cfg: RunConfig, stages: list[str], whole_run: bool, eval_label: str | None = None) -> None:
    """Remove the output of ``stages`` (and, for ``t3s run``, every stage downstream of the first:
    new traces make the probe, the trainings and the evaluations stale). ``eval_label``: ``t3s eval``
    restarts only the evaluation it runs, not the run's others."""
    run = cfg.run_dir
    unknown = [s for s in stages if s not in RESTARTABLE]
    if unknown:
        raise ConfigError(f"--restart {unknown[0]}: expected one of {', '.join(RESTARTABLE)}")
    if whole_run and stages:
        first = min(RESTARTABLE.index(s) for s in stages)
        stages = list(RESTARTABLE[first:])
    folders = {"traces": [run / "traces"], "probe": [run / "probe"], "eval": [run / "eval" / eval_label if eval_label else run / "eval"],
               "train": [run / "train", *sorted((run / "methods").glob("*/train"))]}
    for stage in stages:
        for folder in folders[stage]:
            if folder.is_symlink():  # a method's link to the run's probe (sft is the probe's run)
                folder.unlink()
            elif folder.exists():
                print(f"[t3s] --restart {stage}: removing {folder}", file=sys.stderr, flush=True)
                shutil.rmtree(folder)
