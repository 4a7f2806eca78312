"""``t3s run CONFIG``: the whole pipeline, traces → (probe) → training → evaluation, per method.

For every method of ``compare``:

* ``base``: the student as it is (``student.ref``);
* ``sft``: plain SFT on the traces;
* ``t3s``: the config's T3S protocol (``selection.protocol`` when it is ``t3s_static`` or
  ``t3s_online``, else ``t3s_static``);
* ``inverse`` / ``random``: the paper's diagnostics (train on anchors only / drop random tokens);
* ``rrt``: the merged model θ0 + (θ_sft − θb) (needs ``sft`` and a static probe: list it after them).

Each trained method is a run of its own under ``run_dir/methods/<method>/`` that shares the run's
traces and its static probe (``run_dir/traces``, ``run_dir/probe``), then every model is evaluated
on ``eval.benchmarks``. The method × benchmark table (avg@k, plus the mean) is printed and written
to ``results.json`` / ``results.md``, and the report (``report/``) is drawn. Every stage resumes, so
rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, from_dict

PROTOCOL_OF_METHOD = {"sft": "sft", "inverse": "inverse", "random": "random"}


def method_config(cfg: RunConfig, method: str) -> RunConfig:
    """The run config of one trained method: the same settings with its protocol, in methods/<method>."""
    data = cfg.to_dict()
    if method == "t3s":
        protocol = cfg.selection.protocol if cfg.selection.protocol in ("t3s_static", "t3s_online") else "t3s_static"
    else:
        protocol = PROTOCOL_OF_METHOD[method]
    data["selection"]["protocol"] = protocol
    data.update({"name": method, "output_dir": str(cfg.run_dir.resolve() / "methods"), "sweep": {}})
    return from_dict(data, f"{cfg.name}: method {method}")


def link_shared_folder(shared: Path, link: Path) -> None:
    """Point a method's (or sweep trial's) folder at the run's shared one (traces, probe)."""
    shared.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared.resolve(), target_is_directory=True)


def _check_methods(cfg: RunConfig) -> None:
    if "rrt" in cfg.compare:
        before = cfg.compare[: cfg.compare.index("rrt")]
        if "sft" not in before or not ({"t3s", "inverse", "random"} & set(before)):
            raise ConfigError("compare: 'rrt' merges θ0 + (θ_sft − θb): list it after 'sft' and a method with a "
                              "static probe ('t3s' with t3s_static, 'inverse' or 'random')")
    if cfg.student.kind == "dllm" and set(cfg.compare) - {"base", "sft", "t3s"}:
        # The static probe of a dLLM student trains its AR selector, so θb (and rrt) are not the
        # student's weights; inverse and random are AR-only diagnostics.
        raise ConfigError(f"compare: a dLLM student supports base, sft and t3s; got {cfg.compare}")


def train_method(cfg: RunConfig, method: str) -> str:
    """Train one method (resuming if it ran before) and return its final model folder."""
    from .train import run_train

    mcfg = method_config(cfg, method)
    link_shared_folder(cfg.run_dir / "traces", mcfg.run_dir / "traces")
    link_shared_folder(cfg.run_dir / "probe", mcfg.run_dir / "probe")
    print(f"[run] method {method}: protocol {mcfg.selection.protocol} -> {mcfg.run_dir}", file=sys.stderr, flush=True)
    summary = run_train(mcfg)
    return str(Path(summary["model"]).resolve())


def rrt_model(cfg: RunConfig, sft_model: str) -> str:
    from .models import local_folder
    from .t3s import rrt_merge

    probe = json.loads((cfg.run_dir / "probe" / "result.json").read_text())
    out = cfg.run_dir.resolve() / "methods" / "rrt" / "model"
    if not (out / "config.json").exists():
        # θ0 may be a hub id: its files come from (or go into) the Hugging Face cache.
        rrt_merge(local_folder(cfg.student.ref, revision=cfg.student.revision), sft_model,
                  probe["bottleneck_model"], out)
    return str(out)


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage for every method of ``compare``; returns the scores by method."""
    from .cluster import ray_session
    from .evaluate import evaluate, format_table, resolve_benchmarks
    from .report import write_report
    from .traces import run_traces

    _check_methods(cfg)
    benches = [b.name for b in resolve_benchmarks(cfg.eval)]
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    started = time.time()
    scores: dict[str, Any] = {}
    models: dict[str, str] = {}
    with ray_session(cfg.ray):
        run_traces(cfg)
        for method in cfg.compare:
            if method == "base":
                models[method] = cfg.student.ref
            elif method == "rrt":
                models[method] = rrt_model(cfg, models["sft"])
            else:
                models[method] = train_method(cfg, method)
            scores[method] = evaluate(cfg, models[method], label=method, quiet=True)
            print(f"[run] {method}: mean avg@k {100 * scores[method]['mean']['avg@k']:.1f}%", file=sys.stderr,
                  flush=True)
    table = format_table(scores, benches)
    seconds = round(time.time() - started, 1)
    (run_dir / "results.json").write_text(json.dumps({"models": models, "scores": scores, "seconds": seconds},
                                                     indent=2) + "\n")
    (run_dir / "results.md").write_text(f"# {cfg.name}\n\n```\n{table}\n```\n")
    page = write_report(run_dir)
    print(table)
    figures = sorted(str(p) for p in page.parent.glob("*.png"))
    print(f"[run] done in {seconds:.0f}s\n[run] report: {page}\n" + "\n".join(f"[run] plot: {p}" for p in figures),
          flush=True)
    return scores
