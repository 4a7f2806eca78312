"""The report: token classes and the anchor statistics against hand counts; the report of a finished run
(a probe trained by the worker without Ray) draws the confidences the probe recorded and loads no model."""

import json

import numpy as np
import pytest

from t3s_ray.data import token_classes
from t3s_ray.report import anchor_classes


def test_generic_token_classes():
    assert token_classes(["Ġ12", "Ġthe", ".", "<|im_end|>", "Ġ", "▁x"], "builtin:arith") == [
        "digit", "word", "punctuation/space", "special", "punctuation/space", "word"]


def test_lab_runs_use_the_lab_classes():
    assert token_classes(["2", "##5", "-", "7", "=", "1", "##8"], "builtin:lab") == [
        "operand", "operand", "operator", "operand", "operator", "borrow-fix", "result"]


def test_anchor_classes_counts_by_hand():
    traj = {"tokens": ["a", "b", "a", "1", "1"], "classes": ["word", "word", "word", "digit", "digit"],
            "is_anchor": [True, False, True, True, False], "delta": [2.0, -1.0, 4.0, 0.5, 0.0]}
    out = anchor_classes(traj, top=2)
    assert out["anchor_frac"] == pytest.approx(3 / 5) and out["tokens"] == 5
    word, digit = out["classes"]["word"], out["classes"]["digit"]
    assert (word["tokens"], word["anchors"], digit["tokens"], digit["anchors"]) == (3, 2, 2, 1)
    assert word["anchor_frac"] == pytest.approx(2 / 3) and word["share_of_anchors"] == pytest.approx(2 / 3)
    assert word["delta_quartiles"] == [0.5, 2.0, 3.0]  # numpy's linear percentiles of -1, 2, 4
    assert out["frequent_tokens"] == [{"token": "a", "count": 2, "anchor_frac": 1.0},
                                      {"token": "1", "count": 2, "anchor_frac": 0.5}]


# --------------------------------------------------------------------------------------------
# The report of a finished run: the probe's recorded confidences, no model loaded
# --------------------------------------------------------------------------------------------


def finished_probe_run(tmp_path, monkeypatch, sample: int):
    """A finished static-probe run folder made without Ray: ``config.yaml``, the probe's training run by
    the worker with the probe's own spec (``train.probe_spec``, its confidence sample cut to ``sample``),
    and ``result.json`` (train accuracies made up: θb is step 1)."""
    from conftest import tiny_run_data
    from test_worker import tiny_examples

    import t3s_ray.train as train
    from t3s_ray import config
    from t3s_ray.distributed import Ranks
    from t3s_ray.runfolder import RunLayout
    from t3s_ray.worker import train_standalone

    cfg = config.from_dict(tiny_run_data(tmp_path, "rep", student={"ref": "builtin:tiny-llama", "dtype": "float32"},
                                         train={"lr": 1e-2}, selection={"protocol": "t3s_static", "tau": 0.0},
                                         probe={"steps": 2, "eval_every": 1}))
    layout = RunLayout(cfg.run_dir)
    layout.root.mkdir(parents=True)
    layout.config.write_text(cfg.to_yaml())
    monkeypatch.setattr(train, "PROBE_CONFIDENCE_SAMPLE", sample)
    spec = train.probe_spec(cfg, cfg.student.ref)
    examples = tiny_examples(8)
    train_standalone(spec, examples, Ranks())
    probe = layout.probe
    accuracies = [{"step": 0, "accuracy": 0.5, "model": cfg.student.ref}] + [
        {"step": s, "accuracy": a, "model": str(probe.saved_model(s))} for s, a in ((1, 0.25), (2, 0.5))]
    probe.result.write_text(json.dumps(train.choose_bottleneck(accuracies)))
    return cfg, spec, examples


def plain_confidences(model_dir, example) -> np.ndarray:
    """log p(y_t | y_<t, x) of an example's target tokens, by a plain fp32 forward and log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(example["input_ids"])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = np.flatnonzero(example["target_mask"])
    return np.array([float(logp[t - 1, example["input_ids"][t]]) for t in positions])


def forbid_model_loading(monkeypatch) -> None:
    """Every way this package or transformers loads a model, or scores with one, raises."""
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    import t3s_ray.models as models
    import t3s_ray.t3s as core
    import t3s_ray.t3s.confidence as confidence

    def forbidden(*args, **kwargs):
        raise AssertionError("the report loaded a model")

    for module, name in ((models, "load_model"), (models, "empty_model"), (models, "full_state"),
                         (core, "token_confidence"), (confidence, "token_confidence")):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(forbidden))
    monkeypatch.setattr(_BaseAutoModelClass, "from_pretrained", classmethod(forbidden))


def test_the_report_of_a_finished_run_draws_the_probes_recorded_confidences_and_loads_no_model(tmp_path, monkeypatch):
    import dataclasses

    from t3s_ray.distributed import Ranks
    from t3s_ray.models import resolve
    from t3s_ray.report import confidence_trajectories, write_report
    from t3s_ray.runfolder import RunLayout, read_confidences
    from t3s_ray.worker import train_standalone

    cfg, spec, examples = finished_probe_run(tmp_path, monkeypatch, sample=3)
    probe = RunLayout(cfg.run_dir).probe
    # The probe recorded its first 3 traces at θ0 and at each saved model, as a plain fp32 forward of
    # that model scores them.
    models = {0: cfg.student.ref, 1: probe.saved_model(1), 2: probe.saved_model(2)}
    expected = {}
    for step, ref in models.items():
        record = read_confidences(probe.confidence_record(step))
        assert record["ids"].tolist() == [0, 1, 2]
        assert record["lengths"].tolist() == [int(examples[i]["target_mask"].sum()) for i in range(3)]
        assert record["tokens"].tolist() == [int(t) for i in range(3)
                                             for t in examples[i]["input_ids"][examples[i]["target_mask"]]]
        expected[step] = np.concatenate([plain_confidences(resolve(str(ref)), examples[i]) for i in range(3)])
        np.testing.assert_allclose(record["confidences"], expected[step], atol=1e-4)
    assert not (expected[1] == expected[0]).all()  # the probe's steps moved the confidences
    # Recording is a scoring pass beside the training: the same training without it logs the same losses.
    plain = dataclasses.replace(spec, confidence_sample=0, out_dir=str(tmp_path / "plain"))
    train_standalone(plain, examples, Ranks())
    assert not (tmp_path / "plain" / "confidences").exists()
    def curve(path):
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, path.read_text().splitlines())]

    assert curve(tmp_path / "plain" / "metrics.jsonl") == curve(probe.metrics)

    forbid_model_loading(monkeypatch)
    page = write_report(cfg.run_dir).read_text()
    report = RunLayout(cfg.run_dir).report
    for name in ("confidence_bifurcation.png", "anchor_classes.png", "train_curves.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG", name
    # The split is the T3S rule on the recorded Δc = c(θb) − c(θ0) (θb is step 1), computed here apart.
    delta = expected[1] - expected[0]
    anchor = delta > cfg.selection.tau
    traj = confidence_trajectories(cfg, probe)
    assert traj["steps"] == [0, 1, 2] and traj["traces"] == 3
    np.testing.assert_allclose(traj["anchor"], np.stack([expected[s][anchor] for s in (0, 1, 2)]), atol=1e-4)
    np.testing.assert_allclose(traj["other"], np.stack([expected[s][~anchor] for s in (0, 1, 2)]), atol=1e-4)
    anchors = json.loads((report / "anchors.json").read_text())
    assert anchors["tokens"] == anchor.size and anchors["anchor_frac"] == pytest.approx(anchor.mean())
    assert f"({int(anchor.sum())} anchors, {int((~anchor).sum())} others, in 3 traces)" in page


def test_a_run_folder_from_before_the_records_skips_the_figure_in_one_line(tmp_path, monkeypatch, capsys):
    import shutil

    from t3s_ray.report import write_report
    from t3s_ray.runfolder import RunLayout

    cfg, _, _ = finished_probe_run(tmp_path, monkeypatch, sample=2)
    layout = RunLayout(cfg.run_dir)
    shutil.rmtree(layout.probe.confidences)
    forbid_model_loading(monkeypatch)
    page = write_report(cfg.run_dir).read_text()
    said = [line for line in page.splitlines() if "recorded no token confidences" in line]
    assert len(said) == 1 and "--restart probe" in said[0]
    assert "recorded no token confidences" in capsys.readouterr().err
    assert not (layout.report / "confidence_bifurcation.png").exists()
    assert not (layout.report / "anchors.json").exists()
    assert (layout.report / "train_curves.png").exists()  # the rest of the report is drawn
