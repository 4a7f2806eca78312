"""Experiment trackers: ``report_to``'s TensorBoard, MLflow, Weights & Biases and trackio behind one
small interface.

A tracked run is described by a ``TrackingSpec`` (frozen and picklable: it crosses to rank 0 inside the
``WorkerSpec``), built on the driver by ``tracking_spec`` from the config: which trackers, the project,
the run's name, group, tags and parameters (the resolved config), the folder it belongs to and the
run's id. ``open_run(spec)`` starts (or resumes) it in every tracker named; the ``TrackedRun`` it returns
logs metrics at a step, tables and summaries, and finishes.

A run's id is kept in its folder (``tracker_run.json``), so that whatever reopens the folder continues
the same tracked run: a training resumed after an interruption or a failed worker, the driver adding
the probe's train accuracies to the probe's training, a sweep trial restarted. A folder removed by
``--restart`` starts a new one.

These files stay the record that t3s itself reads (``metrics.jsonl``, ``results.json``, ``scores.json``):
a tracker is a copy for the user's dashboards, never an input.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .runfolder import TrainFolder, flatten

# The tracker's own bookkeeping in a tracked folder: the run's id (see the module's docstring).
TRACKER_RUN_FILE = "tracker_run.json"


@dataclass(frozen=True)
class TrackingSpec:
    """One tracked run, as every process that logs to it sees it.

    Attributes:
        report_to: The trackers (``RunConfig.report_to``).
        project: The MLflow experiment, the W&B and trackio project.
        name: The run's name (``NAME/sft``, ``NAME/probe``, ``NAME``, ...).
        group: Its group (W&B's and trackio's ``group``; an MLflow tag).
        tags: Its tags (``name``, ``seed``, ``protocol``, ``method``, and the config's ``tracking.tags``).
        params: The resolved config, flattened to dotted keys.
        folder: The folder the run belongs to: TensorBoard's events go to its ``tensorboard/``, W&B's
            files under it (unless ``WANDB_DIR`` says otherwise), its id in ``tracker_run.json``.
        run_id: The run's stable id (None where only TensorBoard tracks it: nothing to resume).
        mlflow_tracking_uri: Resolved on the driver (absolute), so that every process writes one store.
        wandb_entity: The W&B entity (None: W&B's default).
        wandb_mode: ``online``, ``offline`` or ``disabled`` (None: W&B's default).
        wandb_dir: The folder of W&B's local files.
    """

    report_to: tuple[str, ...]
    project: str
    name: str
    group: str
    folder: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    wandb_entity: str | None = None
    wandb_mode: str | None = None
    wandb_dir: str | None = None

    @classmethod
    def tensorboard_only(cls, folder: str | Path) -> TrackingSpec:
        """TensorBoard's events in ``folder/tensorboard``: what a training without a spec of its own logs."""
        return cls(("tensorboard",), "t3s_ray", Path(folder).name, Path(folder).name, str(folder))


def base_name(cfg: RunConfig) -> str:
    """The name the tracked runs of ``cfg`` start with: ``tracking.run_name``, else ``name``."""
    return cfg.tracking.run_name or cfg.name


def training_part(cfg: RunConfig) -> str:
    """What a training of ``cfg`` appends to the run name: its method under ``t3s run``, else ``train``."""
    return cfg.tracking.tags.get("method", "train")


def tracking_spec(cfg: RunConfig, part: str | None, folder: str | Path, *, tags: dict[str, str] | None = None,
                  params: dict[str, Any] | None = None) -> TrackingSpec:
    """The tracked run of ``cfg`` named ``base_name/part`` (``part`` None: the base name itself), kept in
    ``folder``; built on the driver. ``tags`` are added to the usual ones, ``params`` replace the config's."""
    t = cfg.tracking
    base = base_name(cfg)
    folder = Path(folder).resolve()
    remote = [r for r in cfg.report_to if r != "tensorboard"]
    return TrackingSpec(
        report_to=tuple(cfg.report_to), project=t.project, name=f"{base}/{part}" if part else base,
        group=t.group or base, folder=str(folder),
        tags={"name": base, "seed": str(cfg.seed), "protocol": cfg.selection.protocol, **t.tags, **(tags or {})},
        params=flatten("", cfg.to_dict()) if params is None else params,
        run_id=run_id(folder) if remote else None,
        mlflow_tracking_uri=mlflow_tracking_uri(t.mlflow.tracking_uri) if "mlflow" in remote else None,
        wandb_entity=t.wandb.entity or os.environ.get("WANDB_ENTITY"),
        wandb_mode=t.wandb.mode or os.environ.get("WANDB_MODE"),
        wandb_dir=os.path.abspath(os.environ.get("WANDB_DIR") or folder))


def run_id(folder: Path) -> str:
    """The id of the run tracked in ``folder``, made (and written) the first time."""
    path = folder / TRACKER_RUN_FILE
    if path.exists():
        return json.loads(path.read_text())["run_id"]
    folder.mkdir(parents=True, exist_ok=True)
    # W&B ids may hold letters and digits only; a uuid's hex is unique across folders and machines.
    rid = uuid.uuid4().hex
    path.write_text(json.dumps({"run_id": rid}) + "\n")
    return rid


def mlflow_tracking_uri(configured: str | None) -> str:
    """The MLflow store every process of the run writes to: the configured URI, ``MLFLOW_TRACKING_URI``,
    else MLflow's default; a local path or ``sqlite:///`` file made absolute here, on the driver (a Ray
    worker runs in another folder)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri and not uri.startswith("databricks"):  # a plain folder: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` (not booleans, not None): what a tracker plots."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a markdown table (TensorBoard's text tab renders it)."""
    columns = table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of ``rows``, in the order first seen."""
    return list(dict.fromkeys(k for row in rows for k in row))


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# One adapter per tracker: start (or resume, with the spec's parameters), metrics at a step, a table,
# a summary, finish.
# --------------------------------------------------------------------------------------------


class TensorBoardRun:
    """Event files in the folder's ``tensorboard/``: scalars, and tables and parameters as text."""

    def __init__(self, spec: TrackingSpec):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(TrainFolder(Path(spec.folder)).tensorboard))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.writer.add_text(name, markdown_table(rows))

    def log_summary(self, values: dict[str, Any]) -> None:
        for key, value in numbers(values).items():
            self.writer.add_scalar(key, value, 0)

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


def mlflow_key(key: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, ``_ - . / :`` and spaces):
    ``avg@k`` becomes ``avg_at_k``."""
    return re.sub(r"[^\w\-./ :]", "_", key.replace("@", "_at_"))


def mlflow_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts (the tables): beside a local sqlite store, in its
    ``mlruns/``. MLflow's default is ``mlruns/`` in the current folder of whichever process creates the
    experiment, which may be a Ray worker's temporary one. None: the store's own default (a server's)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return None


class MlflowRun:
    """A run of the experiment ``project`` through ``MlflowClient`` (no global active run, so the driver
    may hold several); found again by its tag ``t3s.run_id``."""

    def __init__(self, spec: TrackingSpec):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = client = MlflowClient(tracking_uri=spec.mlflow_tracking_uri)
        experiment = client.get_experiment_by_name(spec.project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            spec.project, artifact_location=mlflow_artifact_location(spec.mlflow_tracking_uri))
        found = client.search_runs([experiment_id], filter_string=f"tags.`t3s.run_id` = '{spec.run_id}'",
                                   max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            logged = found[0].data.params
        else:
            tags = {**spec.tags, "group": spec.group, "t3s.run_id": spec.run_id}
            self.run_id = client.create_run(experiment_id, run_name=spec.name, tags=tags).info.run_id
            logged = {}
        # A parameter is set once in MLflow: a resumed run adds the keys it lacks (an operational key
        # changed on resume keeps its first value there; the run folder's settings say what counts).
        params = [Param(mlflow_key(k), str(v)[:6000]) for k, v in spec.params.items() if mlflow_key(k) not in logged]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        columns = table_columns(rows)
        self.client.log_table(self.run_id, data={c: [r.get(c) for r in rows] for c in columns},
                              artifact_file=f"{name}.json")

    def log_summary(self, values: dict[str, Any]) -> None:
        self.log_metrics(numbers(values), 0)
        for key, value in values.items():
            if key not in numbers(values):
                self.client.set_tag(self.run_id, mlflow_key(key), str(value))

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbRun:
    """A W&B run (``id`` the spec's, resumed if it exists), plotted against its own ``step`` metric: W&B
    drops a step lower than the last it saw, which the probe's accuracies (logged after its training's
    steps) and a resumed training's redone steps would be."""

    def __init__(self, spec: TrackingSpec):
        import wandb

        Path(spec.wandb_dir).mkdir(parents=True, exist_ok=True)
        # W&B's tags are short strings; "key:value" keeps the pairs apart.
        tags = [f"{k}:{v}"[:64] for k, v in spec.tags.items()]
        self.wandb = wandb
        self.run = wandb.init(project=spec.project, entity=spec.wandb_entity, name=spec.name, group=spec.group,
                              tags=tags, id=spec.run_id, resume="allow", dir=spec.wandb_dir, mode=spec.wandb_mode,
                              config=spec.params, allow_val_change=True, reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        columns = table_columns(rows)
        self.run.log({name: self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def log_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioRun:
    """A trackio run (local, under ``TRACKIO_DIR``), resumed by its name; the tags go into its config."""

    def __init__(self, spec: TrackingSpec):
        import trackio
        from trackio import context_vars

        self.trackio = trackio
        config = {**spec.params, **{f"tags.{k}": v for k, v in spec.tags.items()}}
        # trackio.init finishes the process's current run, and an exit hook finishes it again: the
        # driver holds several runs at once (a sweep's trials), each logged and finished through its
        # own object, so none is left as the current one.
        context_vars.current_run.set(None)
        with _quiet():
            self.run = trackio.init(project=spec.project, name=spec.name, group=spec.group, config=config,
                                    resume="allow", embed=False)
        context_vars.current_run.set(None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        columns = table_columns(rows)
        self.run.log({name: self.trackio.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def log_summary(self, values: dict[str, Any]) -> None:
        self.run.log(numbers(values))  # trackio has no summary: the numbers as one more logged row

    def finish(self, failed: bool = False) -> None:
        with _quiet():
            self.run.finish()


@contextlib.contextmanager
def _quiet():
    """trackio prints its banners to stdout, which is where ``t3s run`` prints its tables: to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


ADAPTERS = {"tensorboard": TensorBoardRun, "mlflow": MlflowRun, "wandb": WandbRun, "trackio": TrackioRun}


class TrackedRun:
    """The run in every tracker of its spec; a context manager that finishes it (as failed on an error)."""

    def __init__(self, spec: TrackingSpec):
        self.spec = spec
        self.runs: list[Any] = []
        try:
            for tracker in spec.report_to:
                self.runs.append(ADAPTERS[tracker](spec))
        except BaseException:
            self.finish(failed=True)
            raise

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """The numeric ``metrics`` at ``step`` (the others are left out)."""
        values = {k: v for k, v in numbers(metrics).items() if k != "step"}
        for run in self.runs:
            run.log_metrics(values, step)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """A table, one dict a row (MLflow: the artifact ``NAME.json``; W&B, trackio: a logged table;
        TensorBoard: a markdown text)."""
        if rows:
            for run in self.runs:
                run.log_table(name, rows)

    def log_summary(self, values: dict[str, Any]) -> None:
        """Final values of the run (W&B's summary; MLflow metrics at step 0, or tags for text)."""
        values = {k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        for run in self.runs:
            run.log_summary(values)

    def finish(self, failed: bool = False) -> None:
        for run in self.runs:
            run.finish(failed)
        self.runs = []

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


def open_run(spec: TrackingSpec) -> TrackedRun:
    """Start (or resume) the run ``spec`` describes in each of its trackers."""
    return TrackedRun(spec)
