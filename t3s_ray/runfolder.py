"""The run folder: where each stage writes (``RunLayout``), what each stage's output was computed with
(``stage_settings``), and reading the traces back (``load_traces``, ``checked_manifest``).

A run folder (``output_dir/name``)::

    config.yaml              the run's config (``t3s run``)
    traces/                  traces/ and samples/ shard pairs, errors.jsonl, manifest.json (TracesFolder)
    probe/                   the static probe: a training (TrainFolder) plus result.json (θb) and
                             confidences/ (a sample's token confidences at each saved model)
    train/                   the training (model/, models/step-N/, metrics.jsonl, summary.json, ...)
    methods/METHOD/          each method of ``t3s run``: a run folder of its own (traces/, probe/ link back)
    eval/LABEL/              an evaluation: scores.json, samples.jsonl
    results.json, results.md ``t3s run``'s table; report/ its figures and page; sweep/ a sweep's trials

So that a rerun resumes only what it would compute again, each stage folder (``traces/``, ``probe/``,
``train/``, each ``eval/LABEL/``) holds ``settings.json``: the settings that determine its output
(``stage_settings``), written when the stage first starts. A rerun with the same settings resumes;
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, EngineConfig, RunConfig, diffusion_training, flat_section, is_template_text
from .errors import DataError
from .protocols import PROTOCOLS

SETTINGS_FILE = "settings.json"
# Keys of a sampling stage's section that do not change its samples: everything under ``engine`` (how
# they are computed; its seed_requests is recorded apart, by ``seeding``) and, for an evaluation, which
# benchmarks (each is recorded with its scores) and how often a training saves a model to evaluate.
_TRACES_OPERATIONAL = ("engine",)
_ENDPOINT_KEEP = ("model",)  # of traces.endpoint: the rest is how the server is reached
# The endpoint too: how a served model is reached (its name is the evaluated model's ref).
_EVAL_OPERATIONAL = ("engine", "endpoint", "benchmarks", "sources", "trajectory_every")
RESTARTABLE = ("traces", "probe", "train", "eval")
# Train settings that do not change what a run computes: a resumed run may change them.
_OPERATIONAL_TRAIN_KEYS = ("num_workers", "checkpoint_every", "keep_last", "max_failures", "collective_timeout_s",
                           "diagnostics_every")
# Student keys that only a block-diffusion (LLaDA2) student's training reads: recorded resolved for such a
# student (``student_settings``), never for another one, whose folders written before the keys existed resume.
_DIFFUSION_STUDENT_KEYS = ("dllm_attention", "block_size", "eos_fill")


# --------------------------------------------------------------------------------------------
# The layout: where each stage writes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TracesFolder:
    """A traces folder (a run's ``traces/``, or one a sweep shares): numbered shard pairs, errors, manifest."""

    path: Path

    @classmethod
    def of(cls, run_or_traces_dir: str | Path) -> TracesFolder:
        """The traces folder a run folder holds, or the folder itself when it is one."""
        folder = Path(run_or_traces_dir)
        inner = RunLayout(folder).traces
        return inner if inner.kept.is_dir() else cls(folder)

    @property
    def kept(self) -> Path:
        """The kept traces' shards: what training reads."""
        return self.path / "traces"

    @property
    def samples(self) -> Path:
        """Every sample's shards (with ``correct`` and ``kept``): a prompt is finished once its shard is here."""
        return self.path / "samples"

    @property
    def errors(self) -> Path:
        return self.path / "errors.jsonl"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"


@dataclass(frozen=True)
class TrainFolder:
    """What a training writes (``train/``, ``probe/``, ``methods/METHOD/train/``)."""

    path: Path

    @property
    def model(self) -> Path:
        """The final model, a Hugging Face folder."""
        return self.path / "model"

    @property
    def models(self) -> Path:
        """The models saved along the way (``probe.eval_every``, ``eval.trajectory_every``)."""
        return self.path / "models"

    def saved_model(self, step: int) -> Path:
        return self.models / f"step-{step:06d}"

    def saved_models(self) -> list[Path]:
        return sorted(self.models.glob("step-*"))

    @staticmethod
    def step_of(saved_model: Path) -> int:
        return int(saved_model.name.split("-")[1])

    @property
    def metrics(self) -> Path:
        """One line per step (rank 0's; ``tensorboard`` the same as TensorBoard events)."""
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        """Checkpoints without Ray (``training.sessions.LocalSession``); Ray Train's go under ``ray_train``."""
        return self.path / "checkpoints"

    @property
    def ray_train(self) -> Path:
        return self.path / "ray_train"

    @property
    def store(self) -> Path:
        """The confidence store's final snapshot (``store_stats`` its statistics)."""
        return self.path / "store.npz"

    @property
    def store_stats(self) -> Path:
        return self.path / "store_stats.json"

    @property
    def result(self) -> Path:
        """The probe's: the train accuracy of each saved model and θb."""
        return self.path / "result.json"

    @property
    def confidences(self) -> Path:
        """The probe's: the per-token confidences of a bounded sample of its examples at θ0 and at each
        saved model, one ``confidence_record`` per step, written by rank 0 of the training (the
        report's bifurcation figure reads them instead of loading the models again)."""
        return self.path / "confidences"

    def confidence_record(self, step: int) -> Path:
        return self.confidences / f"step-{step:06d}.npz"


@dataclass(frozen=True)
class EvalFolder:
    """An evaluation (``eval/LABEL/``, or the folder ``out_dir`` names)."""

    path: Path

    @property
    def scores(self) -> Path:
        """Per benchmark: its scores and its definition."""
        return self.path / "scores.json"

    @property
    def samples(self) -> Path:
        """One line per sample."""
        return self.path / "samples.jsonl"


class RunLayout:
    """Every place of a run folder (``output_dir/name``, ``RunConfig.run_dir``): the module docstring's map."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def traces(self) -> TracesFolder:
        return TracesFolder(self.root / "traces")

    @property
    def probe(self) -> TrainFolder:
        return TrainFolder(self.root / "probe")

    @property
    def train(self) -> TrainFolder:
        return TrainFolder(self.root / "train")

    @property
    def methods(self) -> Path:
        return self.root / "methods"

    def method(self, name: str) -> RunLayout:
        """A method's run folder (``t3s run``): its traces and probe link to this run's."""
        return RunLayout(self.methods / name)

    def method_trainings(self) -> dict[str, TrainFolder]:
        """The trainings under ``methods/`` that exist, by method (sft's may be a link to the probe)."""
        return {p.parent.name: TrainFolder(p) for p in sorted(self.methods.glob("*/train"))}

    @property
    def merged_model(self) -> Path:
        """The model of a method that is merged, not trained (rrt's, in its method folder)."""
        return self.root / "model"

    @property
    def evals(self) -> Path:
        return self.root / "eval"

    def eval(self, label: str) -> EvalFolder:
        return EvalFolder(self.evals / label)

    @property
    def results(self) -> Path:
        """``t3s run``'s scores, paired differences and trajectories (``results_md``: its table)."""
        return self.root / "results.json"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def sweep(self) -> Path:
        return self.root / "sweep"


def read_probe_result(probe_dir: Path) -> dict[str, Any]:
    """A finished probe's ``result.json``, its model paths under ``probe_dir`` as it is now: the run
    folder may have been moved or copied since it was written (step 0 is θ0, the student's own ref)."""
    probe = TrainFolder(Path(probe_dir).resolve())
    result = json.loads(probe.result.read_text())

    def here(a: dict[str, Any]) -> dict[str, Any]:
        return {**a, "model": str(probe.saved_model(a["step"]))} if a["step"] > 0 else a

    accuracies = [here(a) for a in result["accuracies"]]
    best = next(a for a in accuracies if a["step"] == result["bottleneck_step"])
    return {**result, "accuracies": accuracies, "bottleneck_model": best["model"]}


def write_confidences(path: Path, example_ids: list[int], tokens: list, confidences: list) -> None:
    """A ``TrainFolder.confidence_record``: per example its id, and over its target tokens their ids and
    confidences ``log p(y_t | y_<t, x)``, flat (``lengths`` cuts them): 8 bytes a token (int32 ids,
    float32 confidences), 6 MB for 48 traces of 16k tokens. Written whole or not at all."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=np.asarray(example_ids, dtype=np.int64),
                 lengths=np.asarray([len(t) for t in tokens], dtype=np.int64),
                 tokens=np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens]),
                 confidences=np.concatenate([np.asarray(c, dtype=np.float32) for c in confidences]))
    tmp.replace(path)


def read_confidences(path: Path) -> dict[str, Any]:
    """A record of :func:`write_confidences`: ``ids``, ``lengths``, ``tokens``, ``confidences`` (numpy)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as record:
        return {k: record[k] for k in ("ids", "lengths", "tokens", "confidences")}


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def seeding(stage: str, engine: EngineConfig) -> dict[str, Any]:
    """``{stage}.seed_requests: False`` where the stage's vLLM requests go without seeds, else nothing.

    Unseeded requests draw other samples than seeded ones, so a stage may not resume under the other
    choice; recorded only when unseeded because every folder written before the key existed holds
    seeded samples (and the other backends seed whatever the key says), and those resume."""
    return {} if engine.backend != "vllm" or engine.seed_requests else {f"{stage}.seed_requests": False}


def chat_settings(traces: dict[str, Any]) -> dict[str, Any]:
    """``traces.chat_template`` and the mappings of the traces section as a fingerprint records them:
    a template file as its path and content hash (an edit in place is another template), a mapping
    as one JSON value (flattened into keys of its own, one dropped later would read as unchanged:
    ``changed_keys`` ignores keys only the saved settings have), an empty one as None (as a folder
    written before the key existed reads)."""
    out = dict(traces)
    template = out.get("chat_template")
    if isinstance(template, str) and not is_template_text(template):
        path = Path(template).expanduser()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
        out["chat_template"] = f"{template} (sha256 {digest})"
    for key in ("chat_template_kwargs", "message_roles"):
        if key in out:
            out[key] = json.dumps(out[key], sort_keys=True) if out[key] else None
    return out


def traces_settings(cfg: RunConfig) -> dict[str, Any]:
    """Teacher, prompt data, sampling, verifier and keep policy: what decides which traces are written."""
    d = cfg.to_dict()
    traces = flat_section("traces", {k: v for k, v in d["traces"].items() if k not in _TRACES_OPERATIONAL})
    traces["endpoint"] = {k: v for k, v in traces["endpoint"].items() if k in _ENDPOINT_KEEP}
    traces = chat_settings(traces)
    # max_seq_len is a training setting; streaming reads the same rows as a download does.
    data = {k: v for k, v in d["data"].items() if k not in ("max_seq_len", "streaming")}
    out = {**flatten("data", data), **flatten("traces", traces)}
    if cfg.traces.source == "generate":
        out.update(seeding("traces", cfg.engine("traces")))
    if cfg.traces.source == "generate" and cfg.traces.engine.backend != "openai":
        out.update(flatten("teacher", {k: d["teacher"][k] for k in ("ref", "revision", "trust_remote_code")}))
    return out


def eval_settings(cfg: RunConfig, model_ref: str, model_dtype: str) -> dict[str, Any]:
    """The sampling settings and the model (its weights, or a hub id, and its dtype): what decides an
    evaluation's samples. Each benchmark's own definition is recorded with its scores."""
    from .models import endpoint_ref, weights_fingerprint

    ev = flat_section("eval", {k: v for k, v in cfg.to_dict()["eval"].items() if k not in _EVAL_OPERATIONAL})
    if ev["seed"] is None:
        ev["seed"] = cfg.seed
    # A local model is its weights, wherever its folder is (a run folder moved keeps its scores); a
    # hub id, or a model behind an endpoint (``openai:NAME``), is its name.
    weights = model_ref if endpoint_ref(model_ref) else weights_fingerprint(model_ref)
    model = {"model": model_ref} if weights == model_ref else {"model.weights": weights}
    # The prompts as rendered (data.chat_options): the template and variables traces.* names, if any.
    chat = chat_settings({k: cfg.to_dict()["traces"][k] for k in ("chat_template", "chat_template_kwargs")})
    chat["chat_template"] = chat["chat_template"] if isinstance(chat["chat_template"], str) else None
    return {**flatten("eval", ev), **seeding("eval", cfg.engine("eval")), **model, "model.dtype": model_dtype,
            **{f"traces.{k}": v for k, v in chat.items()}}


def run_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that determine what a training computes, flattened to dotted keys: a checkpoint
    may only be resumed with the same ones (the operational train keys may change). The worker
    records them in its checkpoints; the train and probe stages add the traces they read."""
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in _OPERATIONAL_TRAIN_KEYS}
    if cfg.train.schedule != "cosine":
        train.pop("max_steps")  # a constant schedule may be extended
    out: dict[str, Any] = {}
    # The probe's engine is operational as every engine is (actors, batch sizes, backend options);
    # whether its samples are seeded is not, and probe_settings records it on its own.
    probe = flat_section("probe", {**{k: v for k, v in d["probe"].items() if k != "engine"},
                                   "engine": {"seed_requests": d["probe"]["engine"]["seed_requests"]}})
    sections = [("student", student_settings(cfg)), ("train", train), ("selection", d["selection"]), ("probe", probe)]
    if not PROTOCOLS[cfg.selection.protocol].selects:  # plain SFT reads neither tau & co. nor the probe's knobs
        sections = sections[:2] + [("selection", {"protocol": cfg.selection.protocol})]
    for section, values in sections:
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    # How examples are indexed (the data order picks them by position): a checkpoint written when
    # they were in the order Ray Data wrote the shards is refused, not resumed with other examples.
    out["examples.order"] = "trace id, sample index"
    return out


def student_settings(cfg: RunConfig) -> dict[str, Any]:
    """The student section as a training's settings record it: the block-diffusion keys only for a LLaDA2
    student, and resolved (``dllm_attention: auto`` recorded as what it means for that model), so that
    writing out the default changes nothing. Resolving reads the student's config
    (``models.declares_block_diffusion``), on the driver before any worker starts: a setting that cannot
    apply to the model (``block_diffusion`` for another diffusion LM) is refused there, in one line."""
    from .models import declares_block_diffusion

    student = {k: v for k, v in asdict(cfg.student).items() if k not in _DIFFUSION_STUDENT_KEYS}
    if cfg.student.kind != "dllm":
        return student
    spec = diffusion_training(cfg, block_model=declares_block_diffusion(cfg.student.ref,
                                                                         revision=cfg.student.revision))
    if spec is not None:
        student.update(dllm_attention="block_diffusion" if spec.layout == "block" else "full",
                       block_size=spec.block_size, eos_fill=spec.fill)
    return student


def probe_settings(cfg: RunConfig) -> dict[str, Any]:
    """What the static probe's run and θb depend on: the training's settings but the selection (the
    probe is SFT, shared by every static method), and the traces."""
    settings = {k: v for k, v in run_settings(cfg).items() if not k.startswith("selection.")}
    # Whether the accuracy samples were seeded as they are drawn (eval's choice unless the probe's own):
    # False where unseeded, None (as before the key existed) where seeded.
    settings["probe.seed_requests"] = seeding("probe", cfg.engine("probe")).get("probe.seed_requests")
    return {**settings, **traces_read(cfg)}


def traces_read(cfg: RunConfig) -> dict[str, str]:
    """``{"traces": fingerprint}`` of the run's traces (checked against their manifest): what a training
    records, so that a training of traces redone since is refused, never returned as this config's model."""
    return {"traces": traces_fingerprint(checked_manifest(cfg.run_dir))}


def traces_fingerprint(manifest: dict[str, Any]) -> str:
    """A short hash of the trace shards a manifest lists: training records it, so that traces redone
    under it are noticed."""
    return hashlib.sha256(json.dumps(manifest.get("shards", {}), sort_keys=True).encode()).hexdigest()[:16]


def stage_settings(stage: str, cfg: RunConfig, model_ref: str | None = None,
                   model_dtype: str | None = None) -> dict[str, Any]:
    """What the output of ``stage`` (one of ``RESTARTABLE``) depends on, recorded in its folder's
    ``settings.json`` by ``claim``: the traces stage's teacher, data and sampling; the probe's and the
    training's settings with the traces they read; an evaluation's sampling and its model
    (``model_ref`` and ``model_dtype``: evaluations only)."""
    if stage == "traces":
        return traces_settings(cfg)
    if stage == "probe":
        return probe_settings(cfg)
    if stage == "train":
        return {**run_settings(cfg), **traces_read(cfg)}
    if stage == "eval":
        if model_ref is None or model_dtype is None:
            raise ValueError("the eval stage's settings name its model: pass model_ref and model_dtype")
        return eval_settings(cfg, model_ref, model_dtype)
    raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(RESTARTABLE)}")


# --------------------------------------------------------------------------------------------
# Reading the traces back, checked against their manifest
# --------------------------------------------------------------------------------------------


def traces_folder(run_or_traces_dir: str | Path) -> Path:
    return TracesFolder.of(run_or_traces_dir).path


def _shard(path: Path, read):
    """``read(path)`` of one trace shard; a shard that is no readable parquet file (truncated by a full
    disk, overwritten, unreadable) is a ``DataError`` naming it and the way out, not pyarrow's traceback."""
    import pyarrow as pa

    try:
        return read(path)
    except (OSError, pa.lib.ArrowException) as e:
        problem = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable parquet shard ({problem}); delete it and rerun `t3s traces` with "
                        "the same config to generate its prompts again (or --restart traces)") from None


def read_shard(path: Path, columns: list[str] | None = None):
    """One trace shard as a pyarrow table (``_shard``'s error when it cannot be read)."""
    import pyarrow.parquet as pq

    return _shard(path, lambda p: pq.read_table(p, columns=columns))


def read_shards(folder: Path, columns: list[str] | None = None):
    """The ``part-*.parquet`` shards of ``folder`` as one pyarrow table, in shard order (None without any)."""
    import pyarrow as pa

    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        return None
    return pa.concat_tables([read_shard(p, columns) for p in parts])


def shard_counts(folder: Path) -> dict[str, dict[str, int]]:
    """Rows per shard pair: ``{part-NNNNN.parquet: {"samples": n, "traces": k}}`` (-1 where missing)."""
    import pyarrow.parquet as pq

    folder = TracesFolder(Path(folder))
    out: dict[str, dict[str, int]] = {}
    for kind, shards in (("samples", folder.samples), ("traces", folder.kept)):
        for p in sorted(shards.glob("part-*.parquet")):
            rows = _shard(p, lambda f: pq.ParquetFile(f).metadata.num_rows)
            out.setdefault(p.name, {"samples": -1, "traces": -1})[kind] = rows
    return out


def read_json(path: Path, what: str) -> Any:
    """A JSON file the run folder keeps (``what`` it is, for the error): one a crash or an edit left
    unreadable is a ``DataError`` naming it, not a traceback."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = e.strerror if isinstance(e, OSError) else str(e)
        raise DataError(f"{path}: the {what} cannot be read ({problem}); restore it, or redo the stage "
                        "with --restart") from None


def read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` of each line of a JSON-lines file the run folder appends to (``errors.jsonl``,
    ``samples.jsonl``). A last line cut short by a crash mid-write is dropped (what it held is redone);
    a bad line anywhere else is a ``DataError`` naming it."""
    lines = path.read_text().splitlines(keepends=True)
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not line.endswith("\n"):
                break
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); restore the file, or redo the stage "
                            "with --restart") from None
    return out


def drop_torn_tail(path: Path) -> None:
    """Cut a JSON-lines file back to its last whole line before appending to it again: a line a crash
    cut short would otherwise run into the next one written."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def check_output_dir(cfg: RunConfig) -> None:
    """``output_dir`` (and the run folder in it) must be, or be creatable as, a writable folder: checked
    by the ``t3s`` command before a stage starts, instead of an ``OSError`` from its first ``mkdir``."""
    import os

    run_dir = Path(cfg.run_dir).expanduser()
    for path in (run_dir, *run_dir.parents):
        if not path.exists():
            if path.is_symlink():
                raise ConfigError(f"output_dir {cfg.output_dir}: {path} is a broken link")
            continue
        if not path.is_dir():
            raise ConfigError(f"output_dir {cfg.output_dir}: {path} is a file, not a folder (runs go to "
                              "output_dir/name): point output_dir at a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir {cfg.output_dir}: {path} is not writable by this user")
        return


def checked_manifest(run_or_traces_dir: str | Path) -> dict[str, Any]:
    """The traces folder's manifest, after checking that its shards are exactly the ones it counted:
    a shard deleted, truncated or added since (an unfinished rerun) would silently change what
    training sees."""
    traces = TracesFolder.of(run_or_traces_dir)
    folder, path = traces.path, traces.manifest
    if not path.exists():
        if traces.kept.is_dir():
            raise DataError(f"{folder} has trace shards but no manifest.json: the traces stage did not finish; "
                            "rerun `t3s traces` with the same config")
        raise FileNotFoundError(f"no traces under {folder} (run `t3s traces` first)")
    manifest = read_json(path, "traces manifest")
    listed, present = manifest.get("shards"), shard_counts(folder)
    if listed is None:  # written before shards were recorded
        return manifest
    for name in sorted(set(listed) | set(present)):
        want, got = listed.get(name), present.get(name)
        if want == got:
            continue
        if want is None:
            problem = "is not in its manifest (an unfinished `t3s traces` run?)"
        else:
            missing = [k for k in ("samples", "traces") if got is None or got[k] < 0]
            problem = (f"is missing from {'/'.join(missing)}/" if missing else
                       f"has {got['traces']} traces and {got['samples']} samples, its manifest says "
                       f"{want['traces']} and {want['samples']}")
        raise DataError(f"{folder}: shard {name} {problem}; rerun `t3s traces` with the same config to "
                        "regenerate what is missing, or --restart traces")
    return manifest


def load_traces(run_or_traces_dir: str | Path) -> list[dict[str, Any]]:
    """The kept traces of a traces folder (or of a run folder holding ``traces/``), checked against
    the folder's manifest (``checked_manifest``), by prompt id and sample index."""
    traces = TracesFolder.of(run_or_traces_dir)
    checked_manifest(traces.path)
    table = read_shards(traces.kept)
    if table is None:
        raise FileNotFoundError(f"no trace shards under {traces.kept} (run `t3s traces` first)")
    # In a fixed order: Ray Data writes shards as its actors finish, so two runs that keep the same
    # traces store them in different orders, and training picks its examples by position (the same
    # seed trained on other batches: the lab's SFT went 14.6 % one run, 7.4 % the next).
    return sorted(table.to_pylist(), key=lambda t: (str(t["id"]), t.get("sample_index") or 0))


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys of ``now`` whose value differs from ``saved``'s (a key ``saved`` lacks reads as None, the
    value a key has until it exists). Keys only ``saved`` has are no longer part of what the stage
    depends on (an SFT training written when it still recorded the selection) and do not count."""
    return sorted(k for k in now if saved.get(k) != now.get(k))


def has_output(folder: Path) -> bool:
    """Whether a stage folder holds anything computed: trace shards, checkpoints, models, results."""
    trained = TrainFolder(folder)
    return any(folder.glob("*/part-*.parquet")) or any(trained.ray_train.glob("checkpoint_*")) or \
        any(trained.checkpoints.glob("step-*")) or trained.model.exists() or trained.result.exists() or \
        EvalFolder(folder).scores.exists()


def claim(folder: Path, stage: str, settings: dict[str, Any], new_folder: str = "a new `name`") -> None:
    """Record ``settings`` as what ``folder`` is computed with, or check them against the recorded ones
    (a folder whose stage failed before computing anything is simply claimed again). ``new_folder``
    names the other way out than a restart, in the error."""
    path = folder / SETTINGS_FILE
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back
    if path.exists() and has_output(folder):
        saved = read_json(path, f"{stage} stage's settings")["settings"]
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
    run = RunLayout(cfg.run_dir)
    unknown = [s for s in stages if s not in RESTARTABLE]
    if unknown:
        raise ConfigError(f"--restart {unknown[0]}: expected one of {', '.join(RESTARTABLE)}")
    if whole_run and stages:
        first = min(RESTARTABLE.index(s) for s in stages)
        stages = list(RESTARTABLE[first:])
    folders = {"traces": [run.traces.path], "probe": [run.probe.path],
               "eval": [run.eval(eval_label).path if eval_label else run.evals],
               "train": [run.train.path, *(t.path for t in run.method_trainings().values())]}
    for stage in stages:
        for folder in folders[stage]:
            if folder.is_symlink():  # a method's link to the run's probe (sft is the probe's run)
                folder.unlink()
            elif folder.exists():
                print(f"[t3s] --restart {stage}: removing {folder}", file=sys.stderr, flush=True)
                shutil.rmtree(folder)
