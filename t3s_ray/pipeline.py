"""``t3s run CONFIG``: the whole pipeline, traces → (probe) → training → evaluation, per method.

For every method of ``compare``:

* ``base``: the student as it is (``student.ref``);
* ``teacher``: the teacher model itself (``teacher.ref``), as the paper lists R1's score; a teacher
  behind an endpoint (``traces.engine.backend: openai``) is evaluated there (``teacher_model``);
* ``sft``: plain SFT on the traces;
* ``t3s``: the config's T3S protocol (``selection.protocol`` when it is ``t3s_static`` or
  ``t3s_online``, else ``t3s_static``);
* ``t3s_online``: the online protocol with the config's ``selection`` keys (``switch``,
  ``rewind``, ...), next to a static ``t3s``;
* ``inverse`` / ``random``: the paper's diagnostics (train on anchors only / drop random tokens);
* ``rrt``: the merged model θ0 + (θ_sft − θb) (needs ``sft`` and a static probe: list it after them).

Each trained method is a run of its own under ``run_dir/methods/<method>/`` that shares the run's
traces and its static probe (``run_dir/traces``, ``run_dir/probe``), then every model is evaluated
on ``eval.benchmarks``. The method × benchmark table (avg@k, plus the mean) is printed and written
to ``results.json`` / ``results.md`` with each method's paired difference from ``sft`` and ``base``
(same problems: bootstrap CI and sign-flip p), and the report (``report/``) is drawn. With
``eval.trajectory_every`` every trained method (and the probe) is also evaluated at its saved steps:
the accuracy trajectories. ``t3s run --seeds 0,1,2`` repeats the run per seed (``run_seeds``) and
writes mean ± sd over seeds. Every stage resumes, so rerunning after an interruption continues
where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, from_dict
from .protocols import METHODS, compare_problems, protocol_for, runs_static_probe
from .runfolder import RunLayout, TrainFolder, read_probe_result
from .tracking import base_name, open_run, tracking_spec


def method_config(cfg: RunConfig, method: str) -> RunConfig:
    """The run config of one trained method: the same settings with its protocol, in methods/<method>."""
    data = cfg.to_dict()
    data["selection"]["protocol"] = protocol_for(method, cfg.selection.protocol)
    data.update({"name": method, "output_dir": str(RunLayout(cfg.run_dir.resolve()).methods), "sweep": {}})
    # Tracked as NAME/METHOD in the run's group (tracking.training_part), not as a run called METHOD.
    tracking = data["tracking"]
    tracking.update({"run_name": base_name(cfg), "group": cfg.tracking.group or base_name(cfg),
                     "tags": {**tracking["tags"], "method": method}})
    return from_dict(data, f"{cfg.name}: method {method}")


def link_shared_folder(shared: Path, link: Path) -> None:
    """Point a method's (or sweep trial's) folder at the run's shared one (traces, probe), by a
    relative link: a run folder copied elsewhere (another machine, another mount point) keeps
    working. A dangling link (a folder moved with absolute links) is pointed again."""
    shared.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and not link.exists():
        link.unlink()
    if not link.exists():
        link.symlink_to(os.path.relpath(shared.resolve(), link.parent.resolve()), target_is_directory=True)


def _check_methods(cfg: RunConfig) -> None:
    from .evaluate import check_local_backend, evaluated

    # (The static probe of a dLLM student trains its AR selector, so θb (and rrt) are not the
    # student's weights; inverse and random are AR-only diagnostics.)
    problems = compare_problems(list(cfg.compare), cfg.student.kind == "dllm")
    if problems:
        raise ConfigError(f"compare: {problems[0]}")
    check_local_backend(cfg, "run")
    if "teacher" in cfg.compare:
        evaluated(cfg, *teacher_model(cfg))  # an API teacher's key, before any stage runs


def teacher_model(cfg: RunConfig) -> tuple[str, str]:
    """The ``teacher`` row's model and the section of the endpoint that serves it: ``openai:NAME`` on
    ``traces.endpoint`` when the traces are sampled from a server (the teacher is that server's
    model), else ``teacher.ref``."""
    if cfg.traces.source == "generate" and cfg.traces.engine.backend == "openai":
        from .models import ENDPOINT_PREFIX

        return ENDPOINT_PREFIX + cfg.traces.endpoint.model, "traces"
    return cfg.teacher.ref, "eval"


def _static_method(cfg: RunConfig) -> str | None:
    """The first method of ``compare`` whose anchors come from the static probe, if any."""
    return next((m for m in cfg.compare if runs_static_probe(m, cfg.selection.protocol)), None)


def sft_is_the_probe(cfg: RunConfig) -> bool:
    """The static probe is SFT from θ0 on the run's traces, in the data order and with the train
    settings of the ``sft`` method; when it runs anyway (a static method is compared) for exactly
    ``train.max_steps`` steps, its training *is* the sft method's, and is not repeated. (A dLLM's
    probe trains its AR selector, not the student.)"""
    return (cfg.student.kind == "ar" and cfg.probe.steps == cfg.train.max_steps and "sft" in cfg.compare
            and _static_method(cfg) is not None)


def _prepare_method(cfg: RunConfig, method: str) -> RunConfig:
    mcfg = method_config(cfg, method)
    run, own = RunLayout(cfg.run_dir), RunLayout(mcfg.run_dir)
    link_shared_folder(run.traces.path, own.traces.path)
    link_shared_folder(run.probe.path, own.probe.path)
    return mcfg


def train_method(cfg: RunConfig, method: str) -> str:
    """Train one method (resuming if it ran before) and return its final model folder."""
    from .train import run_static_probe, run_train

    if method == "sft" and sft_is_the_probe(cfg):
        # The probe runs under the static method's config, as it will be resumed or reused by it.
        run_static_probe(_prepare_method(cfg, _static_method(cfg)))
        run = RunLayout(cfg.run_dir)
        link_shared_folder(run.probe.path, run.method("sft").train.path)
        print(f"[run] method sft: the static probe's run ({cfg.probe.steps} steps of SFT from θ0, the same data "
              f"order and settings) -> {run.probe.path}", file=sys.stderr, flush=True)
        return str(run.probe.model.resolve())
    mcfg = _prepare_method(cfg, method)
    print(f"[run] method {method}: protocol {mcfg.selection.protocol} -> {mcfg.run_dir}", file=sys.stderr, flush=True)
    summary = run_train(mcfg)
    return str(Path(summary["model"]).resolve())


def rrt_model(cfg: RunConfig, sft_model: str) -> str:
    from .models import local_folder
    from .t3s import rrt_merge

    probe = read_probe_result(RunLayout(cfg.run_dir).probe.path)
    out = RunLayout(cfg.run_dir.resolve()).method("rrt").merged_model
    if not (out / "config.json").exists():
        # θ0 may be a hub id: its files come from (or go into) the Hugging Face cache.
        rrt_merge(local_folder(cfg.student.ref, revision=cfg.student.revision), sft_model,
                  probe["bottleneck_model"], out)
    return str(out)


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage for every method of ``compare``; returns the scores by method."""
    from .cluster import ray_session
    from .evaluate import evaluate, format_table, paired_table, resolve_benchmarks
    from .report import write_report
    from .traces import run_traces

    _check_methods(cfg)
    benches = [b.name for b in resolve_benchmarks(cfg.eval)]
    run_dir, layout = cfg.run_dir, RunLayout(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(cfg.to_yaml())
    started = time.time()
    scores: dict[str, Any] = {}
    models: dict[str, str] = {}
    trajectories: dict[str, list[dict[str, Any]]] = {}
    with ray_session(cfg.ray):
        run_traces(cfg)
        for method in cfg.compare:
            if method == "base":
                models[method] = cfg.student.ref
            elif method == "teacher":
                models[method], section = teacher_model(cfg)
            elif method == "rrt":
                models[method] = rrt_model(cfg, models["sft"])
            else:
                models[method] = train_method(cfg, method)
            scores[method] = evaluate(cfg, models[method], label=method, quiet=True,
                                      endpoint_section=section if method == "teacher" else "eval")
            print(f"[run] {method}: mean avg@k {100 * scores[method]['mean']['avg@k']:.1f}%", file=sys.stderr,
                  flush=True)
        if cfg.eval.trajectory_every:
            trajectories = evaluate_trajectories(cfg, scores)
    table = format_table(scores, benches)
    paired, paired_text = paired_table(scores, benches, seed=cfg.seed)
    seconds = round(time.time() - started, 1)
    layout.results.write_text(json.dumps(
        {"models": models, "scores": _without_per_problem(scores), "paired": paired, "trajectories": trajectories,
         "seconds": seconds}, indent=2) + "\n")
    layout.results_md.write_text(f"# {cfg.name}\n\n```\n{table}\n\n{paired_text}\n```\n")
    track_results(cfg, scores, paired, trajectories)
    page = write_report(run_dir)
    print(table)
    print(paired_text)
    figures = sorted(str(p) for p in page.parent.glob("*.png"))
    print(f"[run] done in {seconds:.0f}s\n[run] report: {page}\n" + "\n".join(f"[run] plot: {p}" for p in figures),
          flush=True)
    return scores


def track_results(cfg: RunConfig, scores: dict[str, Any], paired: dict[str, Any],
                  trajectories: dict[str, list[dict[str, Any]]]) -> None:
    """``results.json`` to the trackers, as the run ``NAME``: the score table with its CIs, the paired
    differences, the accuracy trajectories, and each method's scores as final values."""
    from .evaluate import paired_rows, score_rows, score_summary

    with open_run(tracking_spec(cfg, None, cfg.run_dir)) as run:
        run.log_table("scores", score_rows(scores))
        run.log_table("paired", paired_rows(paired))
        run.log_table("trajectories", [{"method": m, **p} for m, points in trajectories.items() for p in points])
        run.log_summary(score_summary(scores))


def _without_per_problem(scores: dict[str, Any]) -> dict[str, Any]:
    """The scores with their per-problem lists left in each evaluation's own scores.json."""
    return {m: {**s, "benchmarks": {b: {k: v for k, v in r.items() if k != "per_problem"}
                                    for b, r in s["benchmarks"].items()}} for m, s in scores.items()}


def evaluate_trajectories(cfg: RunConfig, scores: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Held-out accuracy over training: every saved model of each trained method (every
    ``eval.trajectory_every`` steps) and of the static probe (plain SFT from θ0, with its train
    accuracy), evaluated like the final models. Step 0 is the base student."""
    from .evaluate import evaluate

    base = scores.get("base") or evaluate(cfg, cfg.student.ref, label="base", quiet=True)
    out: dict[str, list[dict[str, Any]]] = {}
    run = RunLayout(cfg.run_dir)
    folders: dict[str, TrainFolder] = {"probe": run.probe}
    folders.update({m: run.method(m).train for m in cfg.compare if METHODS[m].trained})
    probe_acc = {}
    result = run.probe.result
    if result.exists():
        probe_acc = {a["step"]: a["accuracy"] for a in json.loads(result.read_text())["accuracies"]}
    done: dict[Path, list[dict[str, Any]]] = {}
    for method, trained in folders.items():
        saved, folder = trained.saved_models(), trained.path
        if not saved:
            continue
        if folder.resolve() in done:  # sft that is the probe's run: the same models, evaluated once
            out[method] = [{**p, "train_accuracy": None} for p in done[folder.resolve()]]
            continue
        points = [{"step": 0, "heldout": base["mean"]["avg@k"],
                   "train_accuracy": probe_acc.get(0) if method == "probe" else None}]
        for model in saved:
            step = TrainFolder.step_of(model)
            final = method if method in scores else "sft" if method == "probe" and sft_is_the_probe(cfg) else None
            if final and step == cfg.train.max_steps:
                s = scores[final]  # the final model, evaluated already
            else:
                s = evaluate(cfg, str(model.resolve()), label=f"{method}@{step}", quiet=True)
            points.append({"step": step, "heldout": s["mean"]["avg@k"],
                           "train_accuracy": probe_acc.get(step) if method == "probe" else None})
        out[method] = done[folder.resolve()] = points
        print(f"[run] trajectory {method}: " + ", ".join(f"{p['step']}: {100 * p['heldout']:.1f}" for p in points),
              file=sys.stderr, flush=True)
    return out


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run of one seed: ``NAME-seedS``, with the run, training and sampling seeds set to S (the
    prompts and benchmarks stay the same, so seeds differ in training order, masks and sampling)."""
    data = cfg.to_dict()
    data.update({"name": f"{cfg.name}-seed{seed}", "seed": seed})
    # Every seed's runs are tracked in the group of the run's name.
    data["tracking"].update({"run_name": f"{cfg.tracking.run_name}-seed{seed}" if cfg.tracking.run_name else None,
                             "group": cfg.tracking.group or base_name(cfg)})
    data["train"]["seed"] = seed
    data["traces"]["sampling"]["seed"] = seed
    return from_dict(data, f"{cfg.name}: seed {seed}")


def run_seeds(cfg: RunConfig, seeds: list[int]) -> dict[str, Any]:
    """``t3s run --seeds``: the pipeline once per seed, then ``NAME-seeds/summary.json`` and
    ``summary.md``: per method and benchmark the mean ± sd over seeds of avg@k, the per-seed table,
    and each seed's paired differences with sft and base."""
    from .evaluate import resolve_benchmarks
    from .stats import mean_sd

    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct seeds, got {seeds}")
    per_seed = {}
    for seed in seeds:
        print(f"[run] seed {seed}", file=sys.stderr, flush=True)
        scfg = seed_config(cfg, seed)
        run_pipeline(scfg)
        per_seed[seed] = json.loads(RunLayout(scfg.run_dir).results.read_text())
    benches = [b.name for b in resolve_benchmarks(cfg.eval)]
    methods = list(cfg.compare)
    summary: dict[str, Any] = {"seeds": seeds, "methods": {}}
    lines = [f"# {cfg.name}: {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             "avg@k (%), mean ± sd over seeds", "",
             "| method | " + " | ".join(benches) + " | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * (len(benches) + len(seeds))]
    for method in methods:
        by_bench = {}
        for b in benches:
            values = [per_seed[s]["scores"][method]["benchmarks"][b]["avg@k"] for s in seeds]
            mean, sd = mean_sd(values)
            by_bench[b] = {"mean": mean, "sd": sd, "per_seed": values}
        means = [per_seed[s]["scores"][method]["mean"]["avg@k"] for s in seeds]
        summary["methods"][method] = {"benchmarks": by_bench, "mean_per_seed": means,
                                      "paired": {s: per_seed[s].get("paired", {}).get(method, {}) for s in seeds}}
        lines.append(f"| {method} | " + " | ".join(f"{100 * by_bench[b]['mean']:.1f} ± {100 * by_bench[b]['sd']:.1f}"
                                                  for b in benches) + " | "
                     + " | ".join(f"{100 * m:.1f}" for m in means) + " |")
    lines += ["", "paired difference with sft, per seed (points, [95% CI]):", ""]
    for method in methods:
        cells = []
        for s in seeds:
            d = per_seed[s].get("paired", {}).get(method, {}).get("vs_sft", {})
            cells.append("; ".join(f"{100 * v['diff']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]"
                                   for v in d.values()) or "-")
        lines.append(f"* {method}: " + " | ".join(f"seed {s}: {c}" for s, c in zip(seeds, cells)))
    out = cfg.run_dir.with_name(f"{cfg.name}-seeds")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    track_seeds(cfg, summary, out)
    print("\n".join(lines))
    return summary


def track_seeds(cfg: RunConfig, summary: dict[str, Any], folder: Path) -> None:
    """``summary.json`` to the trackers, as the run ``NAME-seeds``: per method and benchmark the mean and
    sd over seeds and each seed's avg@k, each seed's paired differences, the means as final values."""
    rows, paired, values = [], [], {}
    for method, m in summary["methods"].items():
        for bench, b in m["benchmarks"].items():
            rows.append({"method": method, "benchmark": bench, "mean": b["mean"], "sd": b["sd"],
                         **{f"seed {s}": v for s, v in zip(summary["seeds"], b["per_seed"])}})
            values[f"{method}/{bench}/avg@k_mean"] = b["mean"]
            values[f"{method}/{bench}/avg@k_sd"] = b["sd"]
        for seed, refs in m["paired"].items():
            for ref, benches in refs.items():
                paired += [{"method": method, "seed": seed, "reference": ref[3:], "benchmark": bench, "diff": d["diff"],
                            "ci95_low": d["ci95"][0], "ci95_high": d["ci95"][1], "p": d.get("p")}
                           for bench, d in benches.items()]
    spec = tracking_spec(cfg, None, folder, tags={"seeds": ",".join(map(str, summary["seeds"]))})
    with open_run(dataclasses.replace(spec, name=f"{base_name(cfg)}-seeds")) as run:
        run.log_table("seed_summary", rows)
        run.log_table("seed_paired", paired)
        run.log_summary(values)
