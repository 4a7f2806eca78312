"""What the static probe can tell before any T3S step: is T3S likely to help on these traces?

After the probe has chosen θb, ``probe_diagnostics`` scores a seeded sample of the traces under θ0
and θb (on the driver: ``probe.diagnostics`` traces, meant for small students such as the lab's)
and records in the probe's ``result.json`` (key ``diagnostics``) and the report. The anchors depend on
the selection settings, the probe's output does not (one probe serves every tau of a sweep), so the
record carries ``selection`` and a run whose selection differs computes its own record into
``probe/diagnostics-<rule>-<value>-cap<max_anchor_frac>.json`` (:func:`diagnostics_path`):

* ``dip``: train accuracy at θ0 minus at θb (the bottleneck's depth);
* ``anchor_frac``: the anchors (the config's selection rule on Δc = c(θb) − c(θ0)) among the
  sampled response tokens;
* ``gradient``: at θ0 and at θb, :func:`t3s_ray.t3s.gradient_conflict` of the anchor tokens'
  mean CE against the other tokens' (``ratio`` = the norm ratio of the two per-token-mean
  gradients, the paper's ~17; ``cosine``, the paper's about −0.45), and ``share_ratio`` = the
  anchors' part of the plain SFT gradient against the others' part, ``n_a·|g_a| / (n_o·|g_o|)``
  (the SFT loss is the mean over all targets, so each group enters with its token count);
* ``classes``: per token class (the lab's ``style`` / ``wrapper`` / ``operand`` / ``result`` /
  ``borrow-fix`` ..., else digit / word / punctuation), tokens, anchor fraction and the Δc
  quantiles 10/25/50/75/90 %; ``correction_anchor_frac``: the anchor fraction of the
  ``borrow-fix`` class (the tokens where the teacher corrects a student that does not borrow),
  where the data has it;
* ``correction_median_delta`` / ``anchor_median_delta``: the median Δc of the correction tokens
  and of all anchors;
* ``verdict``: ``helps`` / ``unclear`` / ``will not help`` by :data:`VERDICT_RULE`, with the reasons.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .runfolder import TrainFolder

# Rule v1 (set from the issue-25 prototype before any run of this lab: correction tokens 0.54-0.76
# anchors in its wins, 0.90-0.97 in its non-wins; share ratio 1.5-7.5 in its wins) missed on
# configs/lab.yaml seed 0: 94 % of the corrections were anchors at tau 0 and the anchors' share of the
# gradient at θ0 was 117x the others', yet T3S beat base by +5.2 [+2.6, +8.1]. Rule v2, written after
# seed 0, looked at the *size* of the corrections' Δc instead (+0.5 nats against the style's +18, where
# a student that has never produced a correction raises it as fast as the style) and said "helps" on
# seeds 1 and 2, where T3S lost to base (-6.9, -15.1) with 97-100 % of the corrections masked. Rule v3
# (this one, written after seeds 0-2 of lab.yaml and before the controls and lab-tau2 ran) keeps v2
# and puts back v1's masking clause: whatever the sizes, a tau that makes nearly every correction an
# anchor masks what the teacher has to teach.
MIN_DIP = 0.10
HELPS_BELOW = 0.25        # the corrections' median Δc below this fraction of the anchors' median Δc
HARMS_FROM = 0.5          # ... at least this fraction: the corrections rise with the anchors
MASKS_FROM = 0.9          # at least this fraction of the correction tokens are anchors: T3S masks them
VERDICT_RULE = (f"will not help if the probe shows no dip (train accuracy at θb less than {MIN_DIP:.2f} below θ0's: "
                f"nothing to remove, SFT is the method), or if the correction tokens' median Δc is at least "
                f"{HARMS_FROM:g}× the anchors' median Δc (the corrections rise with the anchors), or if at least "
                f"{MASKS_FROM:g} of the correction tokens are anchors (either way T3S would mask what the teacher "
                f"has to teach: a higher tau may help); helps if there is a dip and the corrections' median Δc is "
                f"below {HELPS_BELOW:g}× the anchors' (the student already half-knows them; what rises is the "
                f"style); unclear otherwise, and where the data has no correction class (the gradient ratios did "
                f"not separate wins from losses)")
QUANTILES = (10, 25, 50, 75, 90)


def verdict(dip: float | None, correction_median: float | None, anchor_median: float | None,
            correction_anchor_frac: float | None = None) -> dict[str, Any]:
    """The one-line verdict of :data:`VERDICT_RULE` and the facts it rests on (medians of Δc, nats;
    the fraction of the correction tokens that are anchors)."""
    facts = [f"dip {dip:+.2f}" if dip is not None else "dip unknown"]
    if dip is not None and dip < MIN_DIP:
        return {"label": "will not help", "reasons": facts + [f"no dip (< {MIN_DIP:.2f})"]}
    if correction_anchor_frac is not None and correction_anchor_frac >= MASKS_FROM:
        return {"label": "will not help", "reasons": facts + [f"{correction_anchor_frac:.2f} of the correction tokens "
                                                              f"are anchors (>= {MASKS_FROM:g})"]}
    if correction_median is None or anchor_median is None or anchor_median <= 0:
        return {"label": "unclear", "reasons": facts + ["no correction class" if correction_median is None
                                                        else "no anchor rose"]}
    rel = correction_median / anchor_median
    facts.append(f"corrections' median Δc {correction_median:+.2f} = {rel:.2f}× the anchors' {anchor_median:+.2f}")
    if rel >= HARMS_FROM:
        return {"label": "will not help", "reasons": facts}
    return {"label": "helps" if rel < HELPS_BELOW else "unclear", "reasons": facts}


def _anchors(delta, target, cfg):
    from .t3s import cap_anchor_frac, select_delta, select_top_frac

    s = cfg.selection
    anchors = select_top_frac(delta, target, s.top_frac) if s.rule == "top_frac" else select_delta(delta, target, s.tau)
    if s.max_anchor_frac < 1:
        anchors = cap_anchor_frac(anchors, delta, target, s.max_anchor_frac)
    return anchors


def gradient_groups(model, batch: dict[str, Any], anchors, chunk: int) -> dict[str, float]:
    """``gradient_conflict`` of the anchors against the other targets under ``model``, plus
    ``share_ratio`` = n_a·|g_a| / (n_o·|g_o|): the two groups' parts of the SFT gradient."""
    from .t3s import gradient_conflict, token_confidence

    model.zero_grad(set_to_none=True)
    logprobs = token_confidence(model, batch["input_ids"], batch["attention_mask"], batch["target"], chunk)
    d = gradient_conflict(model, logprobs, anchors, batch["target"])
    n_a = int((anchors & batch["target"]).sum())
    n_o = int(batch["target"].sum()) - n_a
    share = (n_a * d["anchor_grad_norm"]) / (n_o * d["other_grad_norm"]) if n_o and d["other_grad_norm"] > 0 \
        else math.nan
    return {**d, "share_ratio": share, "anchor_tokens": n_a, "other_tokens": n_o}


def padded_batch(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    import torch

    from .batching import collate

    input_ids, attention, target = collate(examples, list(range(len(examples))), pad_id, torch.device("cpu"))
    return {"input_ids": input_ids, "attention_mask": attention, "target": target}


def class_stats(classes: list[str], is_anchor: list[bool], delta: list[float]) -> dict[str, dict[str, Any]]:
    """Per class: tokens, anchors, anchor fraction and the Δc quantiles (10/25/50/75/90 %)."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(classes):
        idx = [i for i, c in enumerate(classes) if c == name]
        a = sum(bool(is_anchor[i]) for i in idx)
        out[name] = {"tokens": len(idx), "anchors": a, "anchor_frac": a / len(idx),
                     "delta_quantiles": [round(float(q), 3) for q in np.percentile([delta[i] for i in idx], QUANTILES)]}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["tokens"]))


def selection_of(cfg) -> dict[str, Any]:
    """The selection settings the anchors of a diagnostics record depend on."""
    s = cfg.selection
    return {"rule": s.rule, "tau": s.tau, "top_frac": s.top_frac, "max_anchor_frac": s.max_anchor_frac}


def diagnostics_path(probe_dir: Path, cfg) -> Path:
    """Where the record for ``cfg``'s selection lives when it is not the probe's first one."""
    sel = selection_of(cfg)
    value = f"tau{sel['tau']:g}" if sel["rule"] != "top_frac" else f"top{sel['top_frac']:g}"
    return Path(probe_dir) / f"diagnostics-{sel['rule']}-{value}-cap{sel['max_anchor_frac']:g}.json"


def read_diagnostics(probe_dir: Path, cfg) -> dict[str, Any] | None:
    """The diagnostics record for ``cfg``'s selection: its own file, else the probe result's record
    if that was computed for the same selection (a record without ``selection`` predates this
    check and is not trusted), else None."""
    own = diagnostics_path(probe_dir, cfg)
    if own.exists():
        return json.loads(own.read_text())
    result = TrainFolder(Path(probe_dir)).result
    record = json.loads(result.read_text()).get("diagnostics") if result.exists() else None
    return record if record and record.get("selection") == selection_of(cfg) else None


def probe_diagnostics(cfg, examples: list[dict[str, Any]], result: dict[str, Any], theta0_ref: str) -> dict[str, Any]:
    """Score ``cfg.probe.diagnostics`` sampled traces under θ0 and θb (``result['bottleneck_model']``)
    and return the record described in the module docstring."""
    import torch

    from .data import token_classes
    from .models import load_model, load_tokenizer

    n = min(cfg.probe.diagnostics, len(examples))
    picked = sorted(random.Random(f"probe-diagnostics/{cfg.seed}").sample(range(len(examples)), n))
    sample = [examples[i] for i in picked]
    tokenizer = load_tokenizer(cfg.student.ref, trust_remote_code=cfg.student.trust_remote_code)
    batch = padded_batch(sample, tokenizer.pad_token_id or 0)
    chunk = cfg.train.confidence_chunk
    models = {"theta0": theta0_ref, "thetab": result["bottleneck_model"]}
    conf, grads = {}, {}
    loaded = {k: load_model(ref, dtype="float32", trust_remote_code=cfg.student.trust_remote_code).eval()
              for k, ref in models.items()}
    with torch.no_grad():
        for k, model in loaded.items():
            conf[k] = torch.cat([token_conf(model, batch, i, chunk) for i in range(0, n, 16)])
    delta = conf["thetab"] - conf["theta0"]
    anchors = _anchors(delta, batch["target"], cfg)
    for k, model in loaded.items():
        grads[k] = gradient_groups(model, batch, anchors, chunk)
    tokens, is_anchor, deltas = [], [], []
    classes: list[str] = []
    for b in range(n):
        row = tokenizer.convert_ids_to_tokens(batch["input_ids"][b][batch["target"][b]].tolist())
        tokens += row
        classes += token_classes(row, cfg.data.source, cfg.data.lab_phrases)
        is_anchor += anchors[b][batch["target"][b]].tolist()
        deltas += delta[b][batch["target"][b]].tolist()
    stats = class_stats(classes, is_anchor, deltas)
    acc = {a["step"]: a["accuracy"] for a in result["accuracies"]}
    dip = acc[0] - acc[result["bottleneck_step"]] if 0 in acc else None
    correction = stats["borrow-fix"]["anchor_frac"] if "borrow-fix" in stats else None
    correction_median = stats["borrow-fix"]["delta_quantiles"][2] if "borrow-fix" in stats else None
    anchor_deltas = [x for x, a in zip(deltas, is_anchor) if a]
    anchor_median = float(np.median(anchor_deltas)) if anchor_deltas else None
    record = {"traces": n, "tokens": len(tokens), "bottleneck_step": result["bottleneck_step"],
              "dip": dip, "anchor_frac": sum(is_anchor) / max(1, len(is_anchor)),
              "correction_anchor_frac": correction, "correction_median_delta": correction_median,
              "anchor_median_delta": anchor_median, "gradient": grads, "classes": stats,
              "selection": selection_of(cfg),
              "verdict": {**verdict(dip, correction_median, anchor_median, correction), "rule": VERDICT_RULE}}
    print(f"[probe] diagnostics on {n} traces: {one_line(record)}", file=sys.stderr, flush=True)
    return record


def token_conf(model, batch: dict[str, Any], i: int, chunk: int):
    from .t3s import token_confidence

    return token_confidence(model, batch["input_ids"][i:i + 16], batch["attention_mask"][i:i + 16],
                            batch["target"][i:i + 16], chunk)


def one_line(d: dict[str, Any]) -> str:
    """The verdict and the numbers it rests on, as the report prints it."""
    g0, gb = d["gradient"]["theta0"], d["gradient"]["thetab"]
    corr = d.get("correction_anchor_frac")
    return (f"T3S {d['verdict']['label']} ({'; '.join(d['verdict']['reasons'])}). "
            + (f"Dip {d['dip']:+.2f}, " if d.get("dip") is not None else "") + f"anchors {100 * d['anchor_frac']:.0f}% of tokens"
            + (f", correction tokens {100 * corr:.0f}% anchors" if corr is not None else "")
            + f"; anchor/other gradient at θ0: norm ratio {g0['ratio']:.1f}, share ratio {g0['share_ratio']:.1f}, "
              f"cosine {g0['cosine']:+.2f}; at θb: {gb['ratio']:.1f}, {gb['share_ratio']:.1f}, {gb['cosine']:+.2f}")


def diagnostics_lines(d: dict[str, Any]) -> list[str]:
    """The report's section: the verdict, its rule, the gradient groups and Δc per token class."""
    lines = ["## Probe diagnostics: will T3S help?", "", f"**Verdict: {one_line(d)}.**", "",
             f"Rule: {d['verdict']['rule']}.", "",
             f"On {d['traces']} sampled traces ({d['tokens']} response tokens), θb = step {d['bottleneck_step']}.",
             "", "| at | anchor grad norm | other grad norm | norm ratio | share ratio | cosine |", "|---|---|---|---|---|---|"]
    for k, label in (("theta0", "θ0"), ("thetab", "θb")):
        g = d["gradient"][k]
        lines.append(f"| {label} | {g['anchor_grad_norm']:.3g} | {g['other_grad_norm']:.3g} | {g['ratio']:.2f} | "
                     f"{g['share_ratio']:.2f} | {g['cosine']:+.3f} |")
    lines += ["", "| token class | tokens | anchors | Δc quantiles 10 / 25 / 50 / 75 / 90 % (nats) |", "|---|---|---|---|"]
    for name, c in d["classes"].items():
        lines.append(f"| {name} | {c['tokens']} | {100 * c['anchor_frac']:.0f}% | "
                     + " / ".join(f"{q:+.2f}" for q in c["delta_quantiles"]) + " |")
    return lines + [""]
