"""``report_to``: each tracker adapter against the real library, offline and on this machine only (MLflow
in a sqlite file, W&B in offline mode, trackio in a temporary folder, TensorBoard's event files), read
back with the library's own reader; a training through the real entry point (one rank, no Ray) whose
every step reaches every tracker as ``metrics.jsonl`` holds it; the driver's tables (``t3s run``'s
scores and paired differences, the probe's accuracies, the seed summary, a sweep's trials); the
config (one-line errors, the settings fingerprints untouched)."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from t3s_ray import config
from t3s_ray.errors import ConfigError
from t3s_ray.runfolder import run_settings
from t3s_ray.tracking import TRACKER_RUN_FILE, TrackingSpec, mlflow_key, open_run, tracking_spec

# trackio reads TRACKIO_DIR once, when it is imported: a folder of this test session's own.
if "trackio" not in sys.modules:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="t3s-trackio-")
ALL = ["tensorboard", "mlflow", "wandb", "trackio"]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Nothing leaves the machine: W&B offline, MLflow's usage telemetry off; nothing is written to the
    current folder (it is the test's own)."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


def run_config(tmp_path: Path, mlflow_uri: str, report_to=tuple(ALL), **data) -> config.RunConfig:
    """A config whose trackers write under ``tmp_path`` (a project of its own: the stores are shared)."""
    project = f"p{uuid.uuid4().hex[:8]}"
    tracking = {"project": project, "tags": {"team": "nlp"}, "mlflow": {"tracking_uri": mlflow_uri},
                "wandb": {"mode": "offline"}, **data.pop("tracking", {})}
    return config.from_dict({"name": "demo", "output_dir": str(tmp_path / "runs"), "seed": 3,
                             "report_to": list(report_to), "tracking": tracking, **data})


# --------------------------------------------------------------------------------------------
# Reading each tracker back, with its own reader
# --------------------------------------------------------------------------------------------


def mlflow_run(spec: TrackingSpec):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=spec.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(spec.project)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{spec.name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def mlflow_history(spec: TrackingSpec, key: str) -> dict[int, float]:
    client, run = mlflow_run(spec)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, mlflow_key(key))}


def mlflow_table(spec: TrackingSpec, name: str) -> list[dict]:
    client, run = mlflow_run(spec)
    with tempfile.TemporaryDirectory() as d:
        table = json.loads(Path(client.download_artifacts(run.info.run_id, f"{name}.json", d)).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def wandb_folders(spec: TrackingSpec) -> list[str]:
    """The offline run's folders, one per start or resume: named by the second it started in, with "-1",
    "-2" added when a resume starts in the same second."""
    folders = glob.glob(f"{spec.wandb_dir}/wandb/offline-run-*-{spec.run_id}")
    return sorted(folders + glob.glob(f"{spec.wandb_dir}/wandb/offline-run-*-{spec.run_id}-*"))


def wandb_records(spec: TrackingSpec, wait_s: float = 60.0) -> list:
    """Every record of the offline run's ``.wandb`` files, all of its resumes, once each file holds its
    run's ``exit`` record: ``run.finish()`` can return before W&B's service process has written the last
    records (seen with two runs open at once on a loaded machine), so the reader waits for them."""
    deadline = time.monotonic() + wait_s
    while True:
        out = _wandb_file_records(spec)
        files = [p for folder in wandb_folders(spec) for p in glob.glob(f"{folder}/*.wandb")]
        exits = sum(r.WhichOneof("record_type") == "exit" for r in out)
        if (files and exits >= len(files)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert out, f"no offline W&B run {spec.run_id} under {spec.wandb_dir}"
    return out


def _wandb_file_records(spec: TrackingSpec) -> list:
    """The records of the ``.wandb`` files as they are now (W&B's LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header, records as ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(p for folder in wandb_folders(spec) for p in glob.glob(f"{folder}/*.wandb")):
        data = Path(path).read_bytes()
        assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
        pos, chunk = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:  # the rest of the block is padding
                pos += left
                continue
            chunk += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(chunk)
                out.append(record)
                chunk = b""
    return out


def wandb_history(spec: TrackingSpec, key: str) -> dict[int, float]:
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(spec) if r.WhichOneof("record_type") == "history"]
    return {int(row["step"]): row[key] for row in rows if key in row}


def wandb_summary(spec: TrackingSpec) -> dict:
    out = {}
    for r in wandb_records(spec):
        if r.WhichOneof("record_type") == "summary":
            out.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return out


def wandb_run_record(spec: TrackingSpec):
    return next(r.run for r in wandb_records(spec) if r.WhichOneof("record_type") == "run")


def wandb_table(spec: TrackingSpec, name: str) -> list[dict]:
    files = [f for folder in wandb_folders(spec) for f in glob.glob(f"{folder}/files/media/table/{name}_*.table.json")]
    assert len(files) == 1, files
    table = json.loads(Path(files[0]).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def trackio_logs(spec: TrackingSpec) -> list[dict]:
    from trackio import SQLiteStorage

    return SQLiteStorage.get_logs(spec.project, spec.name)


def trackio_history(spec: TrackingSpec, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in trackio_logs(spec) if key in row}


def trackio_table(spec: TrackingSpec, name: str) -> list[dict]:
    return next(row[name]["_value"] for row in trackio_logs(spec) if name in row)


def tensorboard_scalars(spec: TrackingSpec, key: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(spec.folder) / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in events.Scalars(key)}


def history(spec: TrackingSpec, tracker: str, key: str) -> dict[int, float]:
    return {"mlflow": mlflow_history, "wandb": wandb_history, "trackio": trackio_history,
            "tensorboard": tensorboard_scalars}[tracker](spec, key)


def table(spec: TrackingSpec, tracker: str, name: str) -> list[dict]:
    return {"mlflow": mlflow_table, "wandb": wandb_table, "trackio": trackio_table}[tracker](spec, name)


# --------------------------------------------------------------------------------------------
# The adapters
# --------------------------------------------------------------------------------------------


def test_every_tracker_holds_the_metrics_params_tables_and_summary(tmp_path, mlflow_uri):
    cfg = run_config(tmp_path, mlflow_uri, train={"lr": 3e-4})
    spec = tracking_spec(cfg, "sft", tmp_path / "train", tags={"method": "sft"})
    assert (spec.name, spec.group, spec.project) == ("demo/sft", "demo", cfg.tracking.project)
    assert spec.tags == {"name": "demo", "seed": "3", "protocol": cfg.selection.protocol, "team": "nlp", "method": "sft"}
    assert spec.params["train.lr"] == 3e-4 and spec.params["report_to"] == ALL
    with open_run(spec) as run:
        for step in (1, 2, 3):
            run.log_metrics({"step": step, "loss": 1.0 / step, "kept_frac": 0.25 * step, "masking_on": True,
                             "mean_conf_anchor": None, "batch": [1, 2]}, step)
        run.log_table("scores", [{"model": "sft", "benchmark": "b", "avg@k": 0.5, "ci95_low": 0.25},
                                 {"model": "t3s", "benchmark": "b", "avg@k": 0.75, "ci95_low": 0.5}])
        run.log_summary({"sft/mean/avg@k": 0.5, "note": "text", "missing": None})
    want_loss = {1: 1.0, 2: 0.5, 3: 1 / 3}
    rows = [{"model": "sft", "benchmark": "b", "avg@k": 0.5, "ci95_low": 0.25},
            {"model": "t3s", "benchmark": "b", "avg@k": 0.75, "ci95_low": 0.5}]
    for tracker in ALL:
        assert history(spec, tracker, "loss") == pytest.approx(want_loss), tracker
        assert history(spec, tracker, "kept_frac") == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75}), tracker
        if tracker != "tensorboard":
            assert table(spec, tracker, "scores") == rows, tracker
    for tracker in ("mlflow", "wandb", "trackio"):  # booleans, None and lists are not plotted
        assert history(spec, tracker, "masking_on") == history(spec, tracker, "batch") == {}, tracker

    client, run = mlflow_run(spec)
    assert run.data.params["train.lr"] == "0.0003" and run.data.params["report_to"] == str(ALL)
    assert {k: run.data.tags[k] for k in ("name", "seed", "method", "team", "group")} == {
        "name": "demo", "seed": "3", "method": "sft", "team": "nlp", "group": "demo"}
    assert run.data.metrics["sft/mean/avg_at_k"] == 0.5 and run.data.tags["note"] == "text"
    assert run.info.status == "FINISHED"
    # The tables are kept beside the sqlite store, not in the folder of the process that made the experiment.
    store = Path(mlflow_uri[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith((store / "mlruns").as_uri())
    assert list((store / "mlruns").rglob("artifacts/scores.json")) and not (tmp_path / "mlruns").exists()

    record = wandb_run_record(spec)
    assert (record.run_id, record.display_name, record.run_group, record.project) == (
        spec.run_id, "demo/sft", "demo", spec.project)
    assert set(record.tags) >= {"name:demo", "seed:3", "method:sft", "team:nlp"}
    config_items = {i.key: json.loads(i.value_json) for i in record.config.update}
    assert config_items["train.lr"] == 3e-4 and config_items["name"] == "demo"
    assert wandb_summary(spec)["sft/mean/avg@k"] == 0.5

    from trackio import SQLiteStorage

    trackio_config = SQLiteStorage.get_run_config(spec.project, "demo/sft")
    assert trackio_config["train.lr"] == 3e-4 and trackio_config["tags.method"] == "sft"
    assert trackio_config["_Group"] == "demo"
    assert trackio_logs(spec)[-1]["sft/mean/avg@k"] == 0.5


def test_a_folder_reopened_continues_its_run_and_a_new_folder_starts_one(tmp_path, mlflow_uri):
    cfg = run_config(tmp_path, mlflow_uri, report_to=("mlflow", "wandb", "trackio"))
    spec = tracking_spec(cfg, "train", tmp_path / "train")
    assert json.loads((tmp_path / "train" / TRACKER_RUN_FILE).read_text())["run_id"] == spec.run_id
    with open_run(spec) as run:
        run.log_metrics({"loss": 2.0}, 1)
    again = tracking_spec(cfg, "train", tmp_path / "train")  # a resume: the same folder, the same run
    assert again.run_id == spec.run_id
    with open_run(again) as run:
        run.log_metrics({"loss": 1.0}, 2)
        run.log_metrics({"probe/train_accuracy": 0.5}, 1)  # a step W&B has passed already
    for tracker in ("mlflow", "wandb", "trackio"):
        assert history(spec, tracker, "loss") == {1: 2.0, 2: 1.0}, tracker
        assert history(spec, tracker, "probe/train_accuracy") == {1: 0.5}, tracker
    (tmp_path / "train" / TRACKER_RUN_FILE).unlink()  # the folder removed by --restart
    assert tracking_spec(cfg, "train", tmp_path / "train").run_id != spec.run_id


def test_runs_open_at_once_keep_their_own_records_and_stdout_stays_clean(tmp_path, mlflow_uri, capfd):
    """A sweep's driver holds a run per running trial; trackio's init would finish the one before."""
    cfg = run_config(tmp_path, mlflow_uri, report_to=("trackio", "wandb"))
    a, b = (tracking_spec(cfg, name, tmp_path / name) for name in ("a", "b"))
    run_a, run_b = open_run(a), open_run(b)
    trackio_a = next(r.run for r in run_a.runs if hasattr(r, "trackio"))
    assert not trackio_a._stop_flag.is_set()  # opening b did not finish a (trackio's private flag)
    for step in (1, 2):
        run_a.log_metrics({"score": 0.1 * step}, step)
        run_b.log_metrics({"score": 0.2 * step}, step)
    run_a.finish()
    run_b.finish()
    for tracker in ("trackio", "wandb"):
        assert history(a, tracker, "score") == pytest.approx({1: 0.1, 2: 0.2}), tracker
        assert history(b, tracker, "score") == pytest.approx({1: 0.2, 2: 0.4}), tracker
    assert capfd.readouterr().out == ""  # `t3s run` prints its tables there


def test_a_failure_marks_the_run_failed(tmp_path, mlflow_uri):
    spec = tracking_spec(run_config(tmp_path, mlflow_uri, report_to=("mlflow",)), None, tmp_path)
    with pytest.raises(RuntimeError), open_run(spec) as run:
        run.log_metrics({"loss": 1.0}, 1)
        raise RuntimeError("a worker died")
    assert mlflow_run(spec)[1].info.status == "FAILED"


def test_tensorboard_only_tracks_nothing_else_and_writes_no_run_id(tmp_path, mlflow_uri):
    cfg = run_config(tmp_path, mlflow_uri, report_to=("tensorboard",))
    spec = tracking_spec(cfg, "train", tmp_path / "t")
    assert spec.run_id is None and not (tmp_path / "t").exists()
    with open_run(spec) as run:
        run.log_metrics({"loss": 1.5, "step": 4}, 4)
        run.log_table("scores", [{"a": 1}])
    assert tensorboard_scalars(spec, "loss") == {4: 1.5}
    assert os.listdir(tmp_path / "t") == ["tensorboard"]
    with open_run(tracking_spec(run_config(tmp_path, mlflow_uri, report_to=()), "x", tmp_path / "none")) as run:
        run.log_metrics({"loss": 1.0}, 1)
    assert not (tmp_path / "none").exists()


def test_relative_mlflow_stores_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    from t3s_ray.tracking import mlflow_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert mlflow_tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path / 'm.db'}"
    assert mlflow_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert mlflow_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert mlflow_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert mlflow_tracking_uri(None) == f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's own default, here


# --------------------------------------------------------------------------------------------
# The training loop, through the real entry point
# --------------------------------------------------------------------------------------------


def test_every_step_of_a_training_reaches_every_tracker_as_metrics_jsonl_holds_it(tmp_path, mlflow_uri):
    from test_worker import make_job, tiny_examples

    from t3s_ray.distributed import Ranks
    from t3s_ray.worker import train_standalone

    cfg = run_config(tmp_path, mlflow_uri, tracking={"tags": {"method": "sft"}})
    job = make_job(tmp_path, train={"max_steps": 3, "checkpoint_every": 3})
    job.cfg.update(name="demo", seed=3, report_to=cfg.report_to, tracking=cfg.to_dict()["tracking"])
    spec = job.spec()
    assert spec.tracking.name == "demo/sft" and spec.tracking.folder == str((tmp_path / "train").resolve())
    train_standalone(job, tiny_examples(), Ranks())
    lines = [json.loads(ln) for ln in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in ("loss", "kept_frac", "anchor_frac", "mask_version", "tokens_per_s", "lr"):
        want = {m["step"]: m[key] for m in lines}
        for tracker in ALL:
            assert history(spec.tracking, tracker, key) == pytest.approx(want, rel=1e-6), (tracker, key)
    _, run = mlflow_run(spec.tracking)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "3"


# --------------------------------------------------------------------------------------------
# What the driver logs: the probe, t3s run, t3s eval, the seeds, the sweep
# --------------------------------------------------------------------------------------------


def scores_of(label: str, per_problem: dict[str, float]) -> dict:
    from t3s_ray.stats import mean_ci

    spread = mean_ci(list(per_problem.values()))
    bench = {"avg@k": spread["mean"], "avg@k_stderr": spread["stderr"], "avg@k_ci95": spread["ci95"],
             "pass@2": min(1.0, 2 * spread["mean"]), "n": len(per_problem), "samples": 2 * len(per_problem),
             "errors": 0, "per_problem": per_problem}
    return {"model": f"/m/{label}", "label": label, "benchmarks": {"arith": bench},
            "mean": {"avg@k": bench["avg@k"], "pass@2": bench["pass@2"]}}


def test_t3s_run_logs_its_score_table_with_cis_and_the_paired_differences(tmp_path, mlflow_uri):
    from t3s_ray.evaluate import paired_table
    from t3s_ray.pipeline import track_results

    cfg = run_config(tmp_path, mlflow_uri)
    scores = {"sft": scores_of("sft", {"a": 0.0, "b": 0.5, "c": 1.0, "d": 0.5}),
              "t3s": scores_of("t3s", {"a": 0.5, "b": 1.0, "c": 1.0, "d": 1.0})}
    paired, _ = paired_table(scores, ["arith"], seed=0)
    trajectories = {"t3s": [{"step": 0, "heldout": 0.1, "train_accuracy": None}, {"step": 2, "heldout": 0.4,
                                                                                  "train_accuracy": None}]}
    track_results(cfg, scores, paired, trajectories)
    spec = tracking_spec(cfg, None, cfg.run_dir)
    assert spec.name == "demo"
    t3s = scores["t3s"]["benchmarks"]["arith"]
    d = paired["t3s"]["vs_sft"]["arith"]
    assert d["diff"] == pytest.approx(0.375)
    for tracker in ("mlflow", "wandb", "trackio"):
        rows = table(spec, tracker, "scores")
        row = next(r for r in rows if r["model"] == "t3s")
        assert (row["avg@k"], row["ci95_low"], row["ci95_high"], row["pass@2"], row["n"]) == pytest.approx(
            (t3s["avg@k"], *t3s["avg@k_ci95"], t3s["pass@2"], 4)), tracker
        (diff,) = table(spec, tracker, "paired")
        assert (diff["model"], diff["reference"], diff["benchmark"]) == ("t3s", "sft", "arith"), tracker
        assert (diff["diff"], diff["ci95_low"], diff["ci95_high"], diff["p"]) == pytest.approx(
            (d["diff"], *d["ci95"], d["p"])), tracker
        assert [r["heldout"] for r in table(spec, tracker, "trajectories")] == [0.1, 0.4], tracker
    _, run = mlflow_run(spec)
    assert run.data.metrics["t3s/arith/avg_at_k"] == pytest.approx(0.875)
    assert wandb_summary(spec)["sft/mean/avg@k"] == pytest.approx(0.5)


def test_t3s_eval_logs_its_scores_as_the_run_name_eval_label(tmp_path, mlflow_uri, monkeypatch):
    import contextlib

    import t3s_ray.cluster
    import t3s_ray.evaluate as evaluate

    cfg = run_config(tmp_path, mlflow_uri, report_to=("mlflow", "wandb"))
    scores = scores_of("ckpt", {"a": 1.0, "b": 0.5})
    monkeypatch.setattr(t3s_ray.cluster, "ray_session", lambda ray: contextlib.nullcontext())
    monkeypatch.setattr(evaluate, "evaluate", lambda cfg, model_ref, label: scores)
    assert evaluate.run_eval(cfg, "builtin:tiny-llama", "ckpt") is scores  # (checked before Ray: a real model)
    spec = tracking_spec(cfg, "eval/ckpt", cfg.run_dir / "eval" / "ckpt")
    assert spec.name == "demo/eval/ckpt"
    for tracker in ("mlflow", "wandb"):
        (row,) = table(spec, tracker, "scores")
        assert row["model"] == "ckpt"
        assert (row["avg@k"], row["ci95_high"]) == pytest.approx((0.75, scores["benchmarks"]["arith"]["avg@k_ci95"][1]))
    _, run = mlflow_run(spec)
    assert run.data.metrics["ckpt/mean/avg_at_k"] == 0.75 and run.data.tags["model"] == "/m/ckpt"


def test_the_probe_logs_its_train_accuracy_per_checkpoint_and_theta_b(tmp_path, mlflow_uri):
    from t3s_ray.train import track_probe

    cfg = run_config(tmp_path, mlflow_uri)
    spec = tracking_spec(cfg, "probe", tmp_path / "probe", tags={"method": "probe"})
    result = {"accuracies": [{"step": 0, "accuracy": 0.5, "model": "θ0"}, {"step": 2, "accuracy": 0.25, "model": "m2"},
                             {"step": 4, "accuracy": 0.75, "model": "m4"}], "bottleneck_step": 2}
    track_probe(spec, result)
    for tracker in ("mlflow", "wandb", "trackio"):
        assert history(spec, tracker, "probe/train_accuracy") == {0: 0.5, 2: 0.25, 4: 0.75}, tracker
        assert [r["bottleneck"] for r in table(spec, tracker, "probe_accuracies")] == [False, True, False], tracker
    assert mlflow_run(spec)[1].data.metrics["probe/bottleneck_step"] == 2
    assert wandb_summary(spec)["probe/bottleneck_accuracy"] == 0.25


def test_method_and_seed_configs_name_their_runs_in_the_runs_group(tmp_path, mlflow_uri):
    from t3s_ray.pipeline import method_config, seed_config, track_seeds

    cfg = run_config(tmp_path, mlflow_uri)
    seeded = seed_config(cfg, 1)
    method = method_config(seeded, "t3s")
    spec = tracking_spec(method, "t3s", method.run_dir / "train")
    assert (method.name, spec.name, spec.group, spec.tags["method"], spec.tags["seed"]) == (
        "t3s", "demo-seed1/t3s", "demo", "t3s", "1")
    assert tracking_spec(seeded, None, seeded.run_dir).name == "demo-seed1"
    named = seed_config(run_config(tmp_path, mlflow_uri, tracking={"run_name": "exp", "group": "g"}), 2)
    assert (named.tracking.run_name, named.tracking.group) == ("exp-seed2", "g")
    # The seeds' summary: mean and sd over seeds, each seed's value, each seed's paired differences.
    pair = {"diff": 0.1, "ci95": [0.0, 0.2], "p": 0.04, "n": 4, "wins": 2, "losses": 0}
    summary = {"seeds": [0, 1], "methods": {"t3s": {"benchmarks": {"arith": {"mean": 0.5, "sd": 0.1,
                                                                            "per_seed": [0.4, 0.6]}},
                                                    "mean_per_seed": [0.4, 0.6],
                                                    "paired": {0: {"vs_sft": {"arith": pair}}, 1: {}}}}}
    track_seeds(cfg, summary, tmp_path / "demo-seeds")
    spec = tracking_spec(cfg, None, tmp_path / "demo-seeds")
    spec = TrackingSpec(**{**spec.__dict__, "name": "demo-seeds"})
    for tracker in ("mlflow", "wandb", "trackio"):
        assert table(spec, tracker, "seed_summary") == [{"method": "t3s", "benchmark": "arith", "mean": 0.5,
                                                         "sd": 0.1, "seed 0": 0.4, "seed 1": 0.6}], tracker
        assert [(r["seed"], r["diff"]) for r in table(spec, tracker, "seed_paired")] == [(0, 0.1)], tracker
    assert mlflow_run(spec)[1].data.metrics["t3s/arith/avg_at_k_mean"] == 0.5


def test_a_sweep_tracks_each_trial_through_a_tune_logger_callback(tmp_path, mlflow_uri):
    from types import SimpleNamespace

    from ray import cloudpickle
    from ray.tune.logger import LoggerCallback

    from t3s_ray.sweep import tracker_callback, trial_name

    cfg = run_config(tmp_path, mlflow_uri, report_to=("tensorboard", "mlflow", "wandb"),
                     sweep={"space": {"selection.tau": {"grid": [0.0, 0.5]}}})
    callback = tracker_callback(cfg, tmp_path / "sweep")
    assert isinstance(callback, LoggerCallback)
    cloudpickle.loads(cloudpickle.dumps(callback))  # Tune pickles its run config, callbacks included
    trial = SimpleNamespace(trial_id="t1", config={"selection.tau": 0.5})
    callback.log_trial_start(trial)
    tune_keys = {"training_iteration": 1, "time_total_s": 3.0, "done": False, "trial_id": "t1"}
    callback.log_trial_result(1, trial, {"score": 0.25, "avg@k": 0.25, "arith/avg@k": 0.25, "step": 2, "wall_s": 9.0,
                                         **tune_keys})
    callback.log_trial_result(2, trial, {"score": 0.5, "avg@k": 0.5, "arith/avg@k": 0.5, "step": 4, "wall_s": 19.0,
                                         **tune_keys})
    callback.log_trial_end(trial)
    name = trial_name({"selection.tau": 0.5})
    spec = tracking_spec(cfg, name, tmp_path / "sweep" / "trials" / name)
    assert spec.name == f"demo/{name}"
    for tracker in ("mlflow", "wandb"):
        assert history(spec, tracker, "score") == {2: 0.25, 4: 0.5}, tracker
        assert history(spec, tracker, "arith/avg@k") == {2: 0.25, 4: 0.5}, tracker
        assert history(spec, tracker, "time_total_s") == {}, tracker  # Tune's own keys stay in Tune
    _, run = mlflow_run(spec)
    assert run.data.params["selection.tau"] == "0.5" and run.data.tags["trial"] == name
    assert run.info.status == "FINISHED"
    assert not (tmp_path / "sweep" / "trials" / name / "tensorboard").exists()  # Tune writes its own


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


def test_report_to_is_checked_when_the_config_loads(monkeypatch):
    import importlib.util

    assert config.from_dict({}).report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"report_to lists a tracker twice"):
        config.from_dict({"report_to": ["mlflow", "mlflow"]})
    with pytest.raises(ConfigError, match=r"report_to\[0\]: expected one of 'tensorboard', 'mlflow'"):
        config.from_dict({"report_to": ["neptune"]})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        config.from_dict({"report_to": ["tensorboard", "wandb"]}, "run.yaml")
    assert str(e.value) == "report_to names wandb, which is not installed: pip install 't3s_ray[trackers]' in run.yaml"


def test_a_tracker_not_installed_is_one_error_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    import importlib.util

    from t3s_ray import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    path = tmp_path / "run.yaml"
    path.write_text(f"name: x\noutput_dir: {tmp_path}\nreport_to: [mlflow]\n")
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == ("t3s: error: report_to names mlflow, which is not installed: pip install 't3s_ray[trackers]' "
                   "in run.yaml\n")
    assert not (tmp_path / "x").exists()


def test_online_wandb_without_an_api_key_is_one_error_line_and_each_way_of_logging_in_passes(
        tmp_path, monkeypatch, capsys):
    from t3s_ray import cli

    monkeypatch.delenv("WANDB_MODE")  # online, W&B's default
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    path = tmp_path / "run.yaml"
    path.write_text(f"name: x\noutput_dir: {tmp_path}\nreport_to: [tensorboard, wandb]\n")
    assert cli.main(["train", str(path)]) == 2
    assert capsys.readouterr().err == (
        "t3s: error: tracking.wandb.mode is online (this key, else WANDB_MODE, else W&B's default) but no W&B API "
        "key for api.wandb.ai is set here: run `wandb login` or set WANDB_API_KEY (and give rank 0's node the "
        "same), or set tracking.wandb.mode: offline in run.yaml\n")
    assert not (tmp_path / "x").exists()
    online = {"report_to": ["wandb"]}
    # Offline or disabled, by the config or by W&B's own variable: no key needed.
    config.from_dict({**online, "tracking": {"wandb": {"mode": "offline"}}})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config.from_dict(online)
    monkeypatch.delenv("WANDB_MODE")
    # A netrc entry for another host is not W&B's; one for its host (what `wandb login` writes) is.
    (tmp_path / ".netrc").write_text("machine example.org login user password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    with pytest.raises(ConfigError, match="no W&B API key for api.wandb.ai"):
        config.from_dict(online)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password k" + "0" * 39 + "\n")
    config.from_dict(online)
    # A self-hosted server: its host, from WANDB_BASE_URL.
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    with pytest.raises(ConfigError, match="no W&B API key for wandb.example.org"):
        config.from_dict(online)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    config.from_dict(online)


def test_the_trackers_change_no_stage_settings(tmp_path, mlflow_uri):
    plain = config.from_dict({"name": "demo"})
    tracked = run_config(tmp_path, mlflow_uri, tracking={"run_name": "r", "group": "g", "tags": {"a": "b"}})
    assert run_settings(plain) == run_settings(tracked)
    assert plain.hash("teacher", "data", "traces") == tracked.hash("teacher", "data", "traces")


def test_a_rehearsal_tracks_its_runs_apart_from_the_real_ones(tmp_path, mlflow_uri):
    from t3s_ray.rehearse import rehearsal_config

    cfg = run_config(tmp_path, mlflow_uri, report_to=("tensorboard", "mlflow"))
    rehearsal = rehearsal_config(cfg, backend="hf", out_dir=str(tmp_path / "rehearse"), vllm_available=False)
    assert rehearsal.config.tracking.project == f"{cfg.tracking.project}-rehearsal"
    assert rehearsal.config.report_to == ["tensorboard", "mlflow"]
    assert f"tracking.project {cfg.tracking.project} -> {cfg.tracking.project}-rehearsal" in rehearsal.changes
    plain = rehearsal_config(config.from_dict({"name": "demo"}), backend="hf", out_dir=str(tmp_path / "r2"),
                             vllm_available=False)
    assert plain.config.tracking.project == "t3s_ray"
