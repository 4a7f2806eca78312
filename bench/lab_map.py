"""The imitation-shock lab's map (README, "The imitation-shock lab"): one row per config × seed,
read from finished run folders (``runs/<name>-seed<S>``): the methods' avg@4 with 95 % CIs, the
paired T3S − SFT and T3S − base, the probe's dip, anchor fraction, the correction tokens' anchor
fraction and median Δc, and the probe's verdict (the current rule of ``t3s_ray/probe_diagnostics.py``
applied to the record's facts) against what happened.

    python bench/lab_map.py                       # the configs of `make lab` and `make lab-controls`
    python bench/lab_map.py --runs runs lab lab-tau2 --seeds 0,1,2,3 --bench greedy

A verdict is *right* when it says "helps" and T3S beat base (paired 95 % CI above 0), or says "will
not help" and T3S did not; "unclear" is counted apart. Methods a config does not compare show "·".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t3s_ray.config import load  # noqa: E402
from t3s_ray.probe_diagnostics import read_diagnostics, verdict  # noqa: E402

CONFIGS = ["lab", "lab-tau2", "lab-minority", "lab-minority-tau1", "lab-no-style", "lab-unknown-content", "lab-uniform"]
METHODS = ["base", "sft", "t3s", "inverse", "random", "t3s_online"]


def score(results: dict, method: str, bench: str) -> str:
    s = results["scores"].get(method)
    if s is None:
        return "·"
    b = next(v for k, v in s["benchmarks"].items() if k.endswith(bench))
    lo, hi = b["avg@k_ci95"]
    return f"{100 * b['avg@k']:.1f} ± {100 * (hi - lo) / 2:.1f}"


def paired(results: dict, against: str, bench: str) -> tuple[str, float | None, float | None]:
    p = results.get("paired", {}).get("t3s", {}).get(f"vs_{against}")
    if not p:
        return "·", None, None
    d = next(v for k, v in p.items() if k.endswith(bench))
    lo, hi = d["ci95"]
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", lo, hi


def row(run: Path, bench: str) -> tuple[list[str], str, bool | None]:
    results = json.loads((run / "results.json").read_text())
    cfg = load(run / "config.yaml")
    diag = read_diagnostics(run / "probe", cfg) or {}
    probe = json.loads((run / "probe" / "result.json").read_text())
    acc = {a["step"]: a["accuracy"] for a in probe["accuracies"]}
    dip = f"{100 * acc[0]:.1f} → {100 * acc[probe['bottleneck_step']]:.1f} ({probe['bottleneck_step']})"
    corr = diag.get("correction_anchor_frac")
    fix = diag.get("classes", {}).get("borrow-fix", {}).get("delta_quantiles")
    vs_sft, _, _ = paired(results, "sft", bench)
    vs_base, lo, hi = paired(results, "base", bench)
    # The current rule applied to the record's facts (a record keeps the label of the code that wrote it).
    label = verdict(diag["dip"], diag.get("correction_median_delta"), diag.get("anchor_median_delta"),
                    corr)["label"] if diag else "·"
    helped = None if lo is None else lo > 0
    right = None if label not in ("helps", "will not help") or helped is None else (label == "helps") == helped
    cells = [dip, f"{100 * diag['anchor_frac']:.0f} %" if diag else "·",
             f"{100 * corr:.0f} %" if corr is not None else "·", f"{fix[2]:+.2f}" if fix else "·"]
    cells += [score(results, m, bench) for m in METHODS] + [vs_sft, vs_base]
    mark = {True: "right", False: "**wrong**", None: "·"}[right]
    return cells + [f"{label} ({mark})"], label, right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", default=CONFIGS)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bench", default="avg4", help="the benchmark preset's suffix: avg4 or greedy")
    args = ap.parse_args()
    head = ["config", "seed", "train acc θ0 → θb (step)", "anchors", "corrections anchors", "Δc borrow-fix median",
            *METHODS, "t3s − sft", "t3s − base", "verdict"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    record: dict[str, list[bool | None]] = {}
    for name in args.configs:
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = Path(args.runs) / f"{name}-seed{seed}"
            if not (run / "results.json").exists():
                print(f"| {name} | {seed} | (not run) |" + " |" * (len(head) - 3))
                continue
            cells, label, right = row(run, args.bench)
            record.setdefault(label, []).append(right)
            print(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    print()
    for label, outcomes in sorted(record.items()):
        print(f"verdict {label!r}: {len(outcomes)} runs, right {sum(o is True for o in outcomes)}, "
              f"wrong {sum(o is False for o in outcomes)}")


if __name__ == "__main__":
    main()
