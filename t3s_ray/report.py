"""``t3s report RUN_DIR``: plots and a one-page summary of a pipeline run (also written by ``t3s run``).

Figures, under ``RUN_DIR/report/``:

* ``confidence_bifurcation.png``: the paper's figure. The token confidences ``c_t = log p(y_t | y_<t, x)``
  of the first kept traces (``train.PROBE_CONFIDENCE_SAMPLE``) under θ0 and every saved model of the
  static probe, as the probe's ranks recorded them (``probe/confidences/``: the report loads no model);
  tokens are split by the T3S rule (Δc = c(θb) − c(θ0) > tau: imitation anchors, else yet-to-learn)
  and their confidence is drawn over the probe steps: a sample of single-token trajectories and the
  mean of each group. A probe trained before the records existed: one line on the page instead.
* ``train_curves.png``: loss of every trained method over steps, and the probe's train accuracy with
  the bottleneck θb marked.
* ``anchor_fraction.png``: anchor and kept-token fractions over steps.
* ``anchor_classes.png`` (and ``anchors.json``): which tokens became anchors: the anchor fraction per
  token class (the lab's wrapper / operand / result / borrow-fix digits, else digit / punctuation /
  word) and of the most frequent tokens.
* ``trajectories.png``: the paper's first figure: held-out accuracy of every method over its training
  steps (``eval.trajectory_every``), the probe's train accuracy and every loss, θb marked.
* ``scores.png``: avg@k of every method on every benchmark.
* ``report.md``: the score table and links to the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .data import token_classes
from .probe_diagnostics import diagnostics_lines, read_diagnostics
from .runfolder import RunLayout, TrainFolder, read_confidences, read_probe_result
from .stats import format_paired, format_table


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _method_dirs(run_dir: Path) -> dict[str, TrainFolder]:
    """The methods' trainings that logged metrics, by method."""
    return {m: t for m, t in RunLayout(run_dir).method_trainings().items() if t.metrics.exists()}


# --------------------------------------------------------------------------------------------
# Confidence trajectories
# --------------------------------------------------------------------------------------------


def confidence_trajectories(cfg, probe: TrainFolder) -> dict[str, Any] | None:
    """Per probe step, the confidences of the sampled traces' target tokens and the anchor split, read
    from what the probe's ranks recorded (``TrainFolder.confidence_record``: its first traces at θ0 and
    at every saved model). No model is loaded. None when a step's record is missing (a probe trained
    before t3s_ray recorded them)."""
    from .models import load_tokenizer
    from .t3s.selection import select_delta

    result = read_probe_result(probe.path)
    steps = [a["step"] for a in result["accuracies"]]
    if not all(probe.confidence_record(s).exists() for s in steps):
        return None
    records = {s: read_confidences(probe.confidence_record(s)) for s in steps}
    first = records[steps[0]]
    for s, r in records.items():  # one sample, scored at every step
        if not (np.array_equal(r["ids"], first["ids"]) and np.array_equal(r["tokens"], first["tokens"])):
            raise ValueError(f"{probe.confidence_record(s)} holds other traces than {probe.confidence_record(steps[0])}")
    conf = {s: r["confidences"] for s, r in records.items()}
    delta = conf[result["bottleneck_step"]] - conf[steps[0]]
    anchors = select_delta(delta, np.ones_like(delta, dtype=bool), cfg.selection.tau)
    tokenizer = load_tokenizer(cfg.student.ref, trust_remote_code=cfg.student.trust_remote_code)
    tokens, classes = [], []
    for row_ids in np.split(first["tokens"], np.cumsum(first["lengths"])[:-1]):  # each trace's, in order
        row = tokenizer.convert_ids_to_tokens(row_ids.tolist())
        tokens += row
        classes += token_classes(row, cfg.data.source, cfg.data.lab_phrases)
    return {"steps": steps, "bottleneck_step": result["bottleneck_step"], "tau": cfg.selection.tau,
            "traces": len(first["ids"]),
            "anchor": np.stack([conf[s][anchors] for s in steps]),     # [steps, n_anchor]
            "other": np.stack([conf[s][~anchors] for s in steps]),     # [steps, n_other]
            "tokens": tokens, "classes": classes, "is_anchor": anchors.tolist(), "delta": delta.tolist()}


def anchor_classes(traj: dict[str, Any], top: int = 20) -> dict[str, Any]:
    """Which tokens became anchors: per class, the token count, the anchor count and fraction, the
    class's share of all anchors and its Δc quartiles (where a ``selection.tau`` would cut it); and
    the ``top`` most frequent token strings with their anchor fraction."""
    classes: dict[str, dict[str, Any]] = {}
    words: dict[str, list[int]] = {}
    deltas: dict[str, list[float]] = {}
    total_anchors = max(1, sum(traj["is_anchor"]))
    for tok, cls, a, d in zip(traj["tokens"], traj["classes"], traj["is_anchor"], traj["delta"]):
        c = classes.setdefault(cls, {"tokens": 0, "anchors": 0})
        c["tokens"] += 1
        c["anchors"] += int(a)
        deltas.setdefault(cls, []).append(d)
        w = words.setdefault(tok, [0, 0])
        w[0] += 1
        w[1] += int(a)
    for name, c in classes.items():
        c["anchor_frac"] = c["anchors"] / c["tokens"]
        c["share_of_anchors"] = c["anchors"] / total_anchors
        # Where a threshold tau would cut this class: its Δc quartiles (nats).
        c["delta_quartiles"] = [round(float(q), 3) for q in np.percentile(deltas[name], [25, 50, 75])]
    frequent = sorted(words.items(), key=lambda kv: -kv[1][0])[:top]
    return {"anchor_frac": sum(traj["is_anchor"]) / max(1, len(traj["is_anchor"])), "tokens": len(traj["tokens"]),
            "classes": dict(sorted(classes.items(), key=lambda kv: -kv[1]["tokens"])),
            "frequent_tokens": [{"token": t, "count": n, "anchor_frac": a / n} for t, (n, a) in frequent]}


def plot_anchor_classes(stats: dict[str, Any], tau: float, path: Path) -> None:
    plt = _plt()
    fig, (ax_c, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    names = list(stats["classes"])
    fracs = [stats["classes"][n]["anchor_frac"] for n in names]
    bars = ax_c.bar(names, fracs, color="tab:orange")
    ax_c.bar_label(bars, labels=[f"{stats['classes'][n]['anchors']}/{stats['classes'][n]['tokens']}" for n in names],
                   fontsize=7)
    ax_c.axhline(stats["anchor_frac"], color="gray", linestyle="--", label=f"all tokens: {stats['anchor_frac']:.2f}")
    ax_c.set_ylim(0, 1.08)
    ax_c.set_ylabel("fraction that are anchors")
    ax_c.set_title(f"Anchors (Δc > {tau} at θb) by token class")
    ax_c.tick_params(axis="x", rotation=30, labelsize=8)
    ax_c.legend(fontsize=8)
    toks = stats["frequent_tokens"]
    ax_t.bar(range(len(toks)), [t["anchor_frac"] for t in toks], color="tab:blue")
    ax_t.set_xticks(range(len(toks)), [f"{t['token']}\n({t['count']})" for t in toks], fontsize=7)
    ax_t.set_ylim(0, 1.02)
    ax_t.set_title(f"The {len(toks)} most frequent tokens (count): anchor fraction")
    for ax in (ax_c, ax_t):
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_bifurcation(traj: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, color, label in (("anchor", "tab:orange", "imitation anchors"), ("other", "tab:blue", "yet-to-learn")):
        values = traj[key]
        if values.shape[1] == 0:
            continue
        for j in rng.choice(values.shape[1], size=min(40, values.shape[1]), replace=False):
            ax.plot(traj["steps"], values[:, j], color=color, alpha=0.12, linewidth=0.8)
        ax.plot(traj["steps"], values.mean(axis=1), color=color, linewidth=2.5,
                label=f"{label}: mean of {values.shape[1]} tokens")
    ax.axvline(traj["bottleneck_step"], color="gray", linestyle="--", label=f"bottleneck θb (step {traj['bottleneck_step']})")
    # A few very unlikely tokens would squash the picture: show the range of 98% of the values.
    values = np.concatenate([traj["anchor"].ravel(), traj["other"].ravel()])
    if values.size:
        low, high = np.percentile(values, [1, 99.5])
        means = np.concatenate([traj[k].mean(axis=1) for k in ("anchor", "other") if traj[k].shape[1]])
        low, high = min(low, means.min()), max(high, means.max())
        pad = 0.05 * max(high - low, 1e-3)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("probe SFT step")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("token confidence log p(y_t | y_<t, x) (1st-99.5th pct.)")
    ax.set_title(f"Confidence trajectories: anchors (Δc > {traj['tau']}) vs yet-to-learn tokens")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Training curves, anchor fractions, scores
# --------------------------------------------------------------------------------------------


def plot_train_curves(run_dir: Path, path: Path) -> bool:
    methods = _method_dirs(run_dir)
    probe = RunLayout(run_dir).probe.result
    if not methods and not probe.exists():
        return False
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in methods.items():
        m = _read_jsonl(d.metrics)
        ax_loss.plot([r["step"] for r in m], [r["loss"] for r in m], marker=".", label=name)
    ax_loss.set_xlabel("step")
    ax_loss.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Loss over steps")
    ax_loss.grid(alpha=0.3)
    if methods:
        ax_loss.legend(fontsize=8)
    if probe.exists():
        result = json.loads(probe.read_text())
        acc = result["accuracies"]
        ax_acc.plot([a["step"] for a in acc], [a["accuracy"] for a in acc], marker="o", label="probe SFT")
        ax_acc.axvline(result["bottleneck_step"], color="gray", linestyle="--",
                       label=f"bottleneck θb (step {result['bottleneck_step']})")
    for name, d in methods.items():  # online runs measure train accuracy too (switch: bottleneck)
        acc = [r for r in _read_jsonl(d.metrics) if r.get("train_accuracy") is not None]
        if acc:
            ax_acc.plot([r["step"] for r in acc], [r["train_accuracy"] for r in acc], marker="o", label=name)
    ax_acc.set_xlabel("step")
    ax_acc.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
    ax_acc.set_ylabel("train accuracy (avg@k on train prompts)")
    ax_acc.set_title("Train accuracy, bottleneck marked")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_trajectories(run_dir: Path, path: Path) -> bool:
    """The paper's first figure, per method: held-out accuracy over training steps (``t3s run`` with
    ``eval.trajectory_every``), the probe's train accuracy, and the training loss, θb marked."""
    results = RunLayout(run_dir).results
    traj = json.loads(results.read_text()).get("trajectories") if results.exists() else None
    if not traj:
        return False
    plt = _plt()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.3))
    colors = {}
    for method, points in traj.items():
        line = ax_acc.plot([p["step"] for p in points], [100 * p["heldout"] for p in points], marker="o",
                           label=f"{method}: held-out")
        colors[method] = line[0].get_color()
        train = [p for p in points if p.get("train_accuracy") is not None]
        if train:
            ax_acc.plot([p["step"] for p in train], [100 * p["train_accuracy"] for p in train], linestyle="--",
                        marker="x", color=colors[method], label=f"{method}: train prompts")
    loss_dirs = {"probe": RunLayout(run_dir).probe, **_method_dirs(run_dir)}
    for method, d in loss_dirs.items():
        m = _read_jsonl(d.metrics)
        if m:
            ax_loss.plot([r["step"] for r in m], [r["loss"] for r in m], color=colors.get(method),
                         label=method, linewidth=1.2)
    probe = RunLayout(run_dir).probe.result
    if probe.exists():
        step = json.loads(probe.read_text())["bottleneck_step"]
        for ax in (ax_acc, ax_loss):
            ax.axvline(step, color="gray", linestyle=":", label=f"bottleneck θb (step {step})")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Accuracy over training: the dip is the bottleneck")
    ax_loss.set_ylabel("training loss (on the method's kept tokens)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("Loss over training")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_anchor_fraction(run_dir: Path, path: Path) -> bool:
    methods = _method_dirs(run_dir)
    if not methods:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, d in methods.items():
        m = _read_jsonl(d.metrics)
        steps = [r["step"] for r in m]
        line = ax.plot(steps, [r["anchor_frac"] for r in m], marker=".", label=f"{name}: anchor fraction")
        ax.plot(steps, [r["kept_frac"] for r in m], linestyle=":", color=line[0].get_color(),
                label=f"{name}: kept-target fraction")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("fraction of response tokens")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Anchor and kept-token fractions over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_scores(scores: dict[str, dict[str, Any]], path: Path) -> bool:
    if not scores:
        return False
    plt = _plt()
    methods = list(scores)
    benches = list(next(iter(scores.values()))["benchmarks"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(methods) * max(1, len(benches)) / 2), 4))
    width = 0.8 / max(1, len(benches))
    for j, bench in enumerate(benches):
        values = [100 * scores[m]["benchmarks"].get(bench, {}).get("avg@k", 0.0) for m in methods]
        bars = ax.bar(np.arange(len(methods)) + j * width, values, width, label=bench)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(np.arange(len(methods)) + width * (len(benches) - 1) / 2, methods)
    ax.set_ylabel("avg@k (%)")
    ax.set_title("Benchmark scores by method")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return True


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def load_scores(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = RunLayout(run_dir).results
    return json.loads(path.read_text())["scores"] if path.exists() else {}


def write_report(run_dir: str | Path) -> Path:
    """Write every figure the run has data for and ``report.md``; returns the page's path."""
    from . import config as config_mod

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    cfg_path = layout.config
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a t3s run folder (no config.yaml; `t3s run` writes one)")
    cfg = config_mod.load(cfg_path)
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    traj, unrecorded = None, None
    if layout.probe.result.exists():
        traj = confidence_trajectories(cfg, layout.probe)
        if traj is None:
            unrecorded = (f"Confidence trajectories: not drawn, the probe under {layout.probe.path} recorded no token "
                          "confidences (it was trained before t3s_ray recorded them; `--restart probe` records them).")
            print(f"[report] {unrecorded}", file=sys.stderr, flush=True)
    if traj is not None:
        plot_bifurcation(traj, out / "confidence_bifurcation.png")
        figures.append(("Confidence trajectories of anchors vs yet-to-learn tokens", "confidence_bifurcation.png"))
    anchors = None
    if traj is not None:
        anchors = anchor_classes(traj)
        (out / "anchors.json").write_text(json.dumps(anchors, indent=2) + "\n")
        plot_anchor_classes(anchors, traj["tau"], out / "anchor_classes.png")
        figures.append(("Which tokens became anchors", "anchor_classes.png"))
    if plot_trajectories(run_dir, out / "trajectories.png"):
        figures.append(("Held-out and train accuracy and loss over training (bottleneck marked)", "trajectories.png"))
    if plot_train_curves(run_dir, out / "train_curves.png"):
        figures.append(("Loss and train accuracy over steps (bottleneck marked)", "train_curves.png"))
    if plot_anchor_fraction(run_dir, out / "anchor_fraction.png"):
        figures.append(("Anchor fraction over time", "anchor_fraction.png"))
    scores = load_scores(run_dir)
    if plot_scores(scores, out / "scores.png"):
        figures.append(("Benchmark scores", "scores.png"))
    lines = [f"# Run `{cfg.name}`", "",
             f"Student `{cfg.student.ref}`, teacher `{cfg.teacher.ref}`, protocol `{cfg.selection.protocol}` "
             f"(tau {cfg.selection.tau}), methods {', '.join(cfg.compare)}.", ""]
    if scores:
        benches = list(next(iter(scores.values()))["benchmarks"])
        paired = json.loads(layout.results.read_text()).get("paired")
        lines += ["## Scores", "", "```", format_table(scores, benches)] + (
            ["", format_paired(paired)] if paired else []) + ["```", ""]
    if traj is not None:
        lines += [f"Bifurcation: over the probe, anchors' mean confidence went {traj['anchor'].mean(1)[0]:.3f} → "
                  f"{traj['anchor'].mean(1)[-1]:.3f}, yet-to-learn tokens' {traj['other'].mean(1)[0]:.3f} → "
                  f"{traj['other'].mean(1)[-1]:.3f} ({traj['anchor'].shape[1]} anchors, {traj['other'].shape[1]} "
                  f"others, in {traj['traces']} traces).", ""]
    if unrecorded:
        lines += [unrecorded, ""]
    diagnostics = read_diagnostics(layout.probe.path, cfg)
    if diagnostics:
        lines += diagnostics_lines(diagnostics)
    if anchors is not None:
        lines += [f"Anchors: {100 * anchors['anchor_frac']:.1f}% of {anchors['tokens']} response tokens; by class: "
                  + ", ".join(f"{name} {100 * c['anchor_frac']:.0f}% ({c['anchors']}/{c['tokens']}, median Δc "
                              f"{c['delta_quartiles'][1]:+.2f})" for name, c in anchors["classes"].items()) + ".", ""]
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    page = out / "report.md"
    page.write_text("\n".join(lines))
    return page
