"""Stage 4: Ray Tune sweeps of any config keys, scored by the benchmark evaluation.

    t3s sweep CONFIG [--set ...]            python jobs/sweep.py --config CONFIG

A sweep config is a run config with a ``sweep`` section (often ``base: demo.yaml`` plus the
section). The teacher traces are generated once, in ``run_dir/traces``, and shared by the trials.
Each trial is one training run (its own ``TorchTrainer`` and ConfidenceStore, launched from inside
the Tune function trainable, the Ray Train V2 way) followed by the benchmark evaluation of its final
model; with ``sweep.eval_every`` the trial pauses every that many steps to evaluate and report, so
ASHA can stop weak trials. A trial's folder is named by a hash of its parameters, so a trial that
restarts (an interrupted sweep resumed) resumes its training from its own checkpoints.

Outputs under ``run_dir/sweep/``: ``results.csv`` (one row per trial: parameters, score, status,
wall time, error; also printed), ``best.yaml`` (the best trial's full config, ready to run),
``score_vs_params.png`` and the Tune experiment (``tune/``). Rerunning the same command resumes
the sweep: finished trials are not run again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, SweepConfig, apply_overrides, from_dict
from .runfolder import RunLayout, flatten

# --------------------------------------------------------------------------------------------
# Trials: parameters -> a run config
# --------------------------------------------------------------------------------------------


def trial_name(params: dict[str, Any]) -> str:
    """A stable folder name for a parameter set (the same parameters resume the same trial)."""
    return "trial-" + hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def trial_config(base: dict[str, Any], params: dict[str, Any], trials_dir: Path | str, name: str) -> RunConfig:
    """The base config with the trial's values set; raises ``ConfigError`` naming the bad value."""
    data = apply_overrides(base, [f"{key}={json.dumps(value)}" for key, value in sorted(params.items())])
    data.update({"name": name, "output_dir": str(trials_dir)})
    data["sweep"] = {}
    shown = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
    return from_dict(data, f"sweep trial ({shown})")


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: make[kind](values) for key, spec in sweep.space.items() for kind, values in spec.items()}


def reported_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """What a trial reports: ``score`` (mean avg@k over benchmarks), mean pass@k, per-benchmark avg@k."""
    out = {"score": scores["mean"]["avg@k"], **{m: v for m, v in scores["mean"].items()}}
    for name, b in scores["benchmarks"].items():
        out[f"{name}/avg@k"] = b["avg@k"]
    return out


def _trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, traces_dir: str) -> None:
    """The Tune function trainable: train (in segments with ``eval_every``), evaluate, report."""
    from ray import tune

    from .evaluate import evaluate
    from .pipeline import link_shared_folder
    from .train import run_train

    name = trial_name(params)
    trials_dir = Path(sweep_dir) / "trials"
    trial_dir = trials_dir / name
    trial_dir.mkdir(parents=True, exist_ok=True)
    reports = trial_dir / "reports.jsonl"
    if (trial_dir / "done").exists():
        # Finished before an interruption that Tune's experiment state did not record yet: report
        # its results again instead of training it again.
        for line in reports.read_text().splitlines():
            tune.report(json.loads(line))
        return
    (trial_dir / "params.json").write_text(json.dumps(params, indent=2, default=str) + "\n")
    started = time.time()
    try:
        cfg = trial_config(base, params, trials_dir, name)
        link_shared_folder(Path(traces_dir), RunLayout(cfg.run_dir).traces.path)
        every = base["sweep"]["eval_every"]  # the trial's own config has no sweep section
        total = cfg.train.max_steps
        stops = sorted({*range(every, total, every), total}) if every else [total]
        # A restarted trial reports its scored stops again from the file instead of evaluating them
        # again: the training may have moved its model past them before the interruption.
        scored = [json.loads(line) for line in reports.read_text().splitlines()] if reports.exists() else []
        scored = [m for m in scored if m["step"] in stops]
        reports.write_text("".join(json.dumps(m) + "\n" for m in scored))
        for metrics in scored:
            tune.report(metrics)
        for stop in sorted(set(stops) - {m["step"] for m in scored}):
            run_train(cfg, stop_at=stop)
            scores = evaluate(cfg, str(RunLayout(cfg.run_dir).train.model.resolve()), label=f"step-{stop:06d}",
                              quiet=True)
            metrics = {**reported_metrics(scores), "step": stop, "wall_s": round(time.time() - started, 1)}
            with open(reports, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            tune.report(metrics)
        (trial_dir / "done").write_text(json.dumps({"wall_s": round(time.time() - started, 1)}) + "\n")
    except Exception as e:
        (trial_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
        raise


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_sweep(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns the results table rows, best first."""
    from ray import tune
    from ray.tune import RunConfig as TuneRunConfig

    from .cluster import ray_session
    from .evaluate import check_local_backend, resolve_benchmarks
    from .traces import run_traces

    check_local_backend(cfg, "sweep")
    sw = cfg.sweep
    if not sw.space:
        raise ConfigError("sweep.space is empty: list at least one key to sweep, e.g. "
                          "sweep.space.selection.tau: {grid: [0.0, 0.1]}")
    benches = resolve_benchmarks(cfg.eval)
    allowed = {"score", "avg@k", *(f"pass@{k}" for k in cfg.eval.pass_k), *(f"{b.name}/avg@k" for b in benches)}
    if sw.metric not in allowed:
        raise ConfigError(f"sweep.metric: '{sw.metric}' is not reported; trials report {', '.join(sorted(allowed))}")
    run = RunLayout(cfg.run_dir)
    sweep_dir = run.sweep.resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.to_dict()
    with ray_session(cfg.ray):
        if cfg.traces.source == "generate" or not run.traces.manifest.exists():
            run_traces(cfg)  # resumable: a finished trace run is only read back
        # A trial is tracked by the sweep's callback (``tracker_callback``); its training and evaluation
        # open no runs of their own (TensorBoard's files stay in the trial's folder).
        trial_base = {**base, "report_to": [t for t in cfg.report_to if t == "tensorboard"]}
        trainable = tune.with_parameters(_trial, base=trial_base, sweep_dir=str(sweep_dir),
                                         traces_dir=str(run.traces.path.resolve()))
        trainable = tune.with_resources(trainable, {"CPU": sw.cpus_per_trial, "GPU": sw.gpus_per_trial})
        experiment = str(sweep_dir / "tune")
        if tune.Tuner.can_restore(experiment):
            print(f"[sweep] resuming {experiment}: finished trials are kept", file=sys.stderr, flush=True)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        else:
            callbacks = [tracker_callback(cfg, sweep_dir)] if set(cfg.report_to) - {"tensorboard"} else None
            tuner = tune.Tuner(trainable, param_space=search_space(sw), tune_config=_tune_config(sw, cfg.seed),
                               run_config=TuneRunConfig(name="tune", storage_path=str(sweep_dir), verbose=1,
                                                        callbacks=callbacks))
        grid = tuner.fit()
    rows = results_table(grid, sw, sweep_dir)
    _write_outputs(rows, cfg, sweep_dir)
    return rows


def reported(result: dict[str, Any]) -> dict[str, Any]:
    """What a trial reported (``reported_metrics``, ``wall_s``) out of a Tune result, which adds its own keys."""
    return {k: v for k, v in result.items() if k in ("score", "wall_s") or k.startswith("pass@") or "avg@k" in k}


def tracker_callback(cfg: RunConfig, sweep_dir: Path):
    """A Tune logger callback that tracks each trial as the run ``NAME/trial-…`` in ``report_to``'s trackers
    (TensorBoard excepted: Tune writes its own event files): the trial's parameters with the sweep's
    config, each report at its training step. It runs on the driver."""
    from ray.tune.logger import LoggerCallback

    from .tracking import open_run, tracking_spec

    base = cfg.to_dict()

    class TrackerCallback(LoggerCallback):
        def __init__(self):
            self.runs: dict[str, Any] = {}

        def __getstate__(self):  # Tune pickles its run config: the open runs stay in this process
            return {"runs": {}}

        def log_trial_start(self, trial) -> None:
            params = {k: trial.config[k] for k in cfg.sweep.space if k in trial.config}
            name = trial_name(params)
            spec = tracking_spec(cfg, name, sweep_dir / "trials" / name,
                                 tags={"trial": name, **{k: str(v) for k, v in params.items()}},
                                 params={**flatten("", base), **params})
            trackers = tuple(t for t in spec.report_to if t != "tensorboard")
            self.runs[trial.trial_id] = open_run(dataclasses.replace(spec, report_to=trackers))

        def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
            run = self.runs.get(trial.trial_id)
            if run is not None:
                run.log_metrics(reported(result), result.get("step", iteration))

        def log_trial_end(self, trial, failed: bool = False) -> None:
            run = self.runs.pop(trial.trial_id, None)
            if run is not None:  # (each tracker shows a metric's last value as the run's)
                run.finish(failed)

    return TrackerCallback()


def _tune_config(sw: SweepConfig, seed: int):
    from ray import tune

    if sw.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Random draws seeded with the run's seed, so a rerun of the sweep tries the same values.
        # The generator limits concurrency itself (Tune ignores max_concurrent_trials beside it).
        search_alg = BasicVariantGenerator(random_state=seed, max_concurrent=sw.max_concurrent_trials)
    elif sw.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError("sweep.search: optuna needs the optuna package "
                              f"(pip install 't3s_ray[optuna]'): {e}") from None
        # TPE seeded with the run's seed, so a sweep proposes the same values when run again.
        search_alg = OptunaSearch(metric=sw.metric, mode=sw.mode, seed=seed)
    scheduler = None
    if sw.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2)
    return tune.TuneConfig(metric=sw.metric, mode=sw.mode, num_samples=sw.num_samples, search_alg=search_alg,
                           scheduler=scheduler,
                           max_concurrent_trials=None if sw.search == "random" else sw.max_concurrent_trials)


def results_table(grid, sw: SweepConfig, sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial, from the trials' own files (Tune's Result.metrics needs a checkpoint)."""
    rows = []
    for result in grid:
        params = {k: result.config[k] for k in sw.space if k in result.config}
        name = trial_name(params)
        trial_dir = sweep_dir / "trials" / name
        reports_path = trial_dir / "reports.jsonl"
        reports = [json.loads(line) for line in reports_path.read_text().splitlines()] if reports_path.exists() else []
        error = (trial_dir / "error.txt").read_text().strip() if (trial_dir / "error.txt").exists() else ""
        if not error and result.error is not None:
            error = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1]}"
        last = reports[-1] if reports else {}
        status = "ERROR" if error else "DONE" if (trial_dir / "done").exists() else "STOPPED" if reports else "PENDING"
        rows.append({"trial": name, **params, "score": last.get(sw.metric), "status": status,
                     "wall_s": last.get("wall_s"), "step": last.get("step"), "error": error})
    sign = -1 if sw.mode == "max" else 1
    rows.sort(key=lambda r: (r["score"] is None, sign * (r["score"] or 0.0)))
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["score"] is not None and r["status"] in ("DONE", "STOPPED")), None)


def _write_outputs(rows: list[dict[str, Any]], cfg: RunConfig, sweep_dir: Path) -> None:
    import yaml

    params = list(cfg.sweep.space)
    columns = ["trial", *params, "score", "status", "wall_s", "step", "error"]
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(format_results(rows, params, cfg.sweep.metric))
    best = best_row(rows)
    if best is not None:
        best_cfg = trial_config(cfg.to_dict(), {k: best[k] for k in params}, cfg.output_dir, f"{cfg.name}-best")
        header = (f"# Best trial of sweep '{cfg.name}': {best['trial']} ({cfg.sweep.metric} = {best['score']:.4f}).\n"
                  f"# Ready to run: t3s train {sweep_dir / 'best.yaml'}\n")
        (sweep_dir / "best.yaml").write_text(header + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    plot_scores(rows, params, cfg.sweep.metric, sweep_dir / "score_vs_params.png")
    print(f"[sweep] results: {sweep_dir / 'results.csv'}\n[sweep] best config: {sweep_dir / 'best.yaml'}\n"
          f"[sweep] plot: {sweep_dir / 'score_vs_params.png'}", file=sys.stderr, flush=True)


def format_results(rows: list[dict[str, Any]], params: list[str], metric: str) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ["trial", *params, metric, "status", "wall_s", "error"]
    table = [[cell(r.get(c if c != metric else "score")) for c in head] for r in rows]
    for line in table:
        line[-1] = line[-1][:60]
    widths = [max(len(h), *(len(line[i]) for line in table)) if table else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table]
    return "\n".join(lines)


def plot_scores(rows: list[dict[str, Any]], params: list[str], metric: str, path: Path) -> None:
    """One panel per swept parameter: each scored trial's score against its value; the best is ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["score"] is not None]
    best = best_row(rows)
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.6), squeeze=False)
    for ax, param in zip(axes[0], params):
        values = [r[param] for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})
        xs = values if numeric else [categories.index(str(v)) for v in values]
        ax.scatter(xs, [r["score"] for r in scored], color="tab:blue", zorder=2)
        if best is not None:
            bx = best[param] if numeric else categories.index(str(best[param]))
            ax.scatter([bx], [best["score"]], s=160, facecolors="none", edgecolors="tab:red", zorder=3,
                       label="best")
            ax.legend(loc="best", fontsize=8)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    failed = len(rows) - len(scored)
    fig.suptitle(f"Sweep: {metric} against each swept parameter ({len(scored)} trials"
                 + (f", {failed} failed" if failed else "") + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
