"""What the driver hands a rank (``training.spec.WorkerSpec``): typed, frozen, picklable, built by one
function, holding no ``RunConfig`` (nor its dict); the online switch's generation spec equal to the one
built by hand from the config; and no module of ``training/`` but the spec's own reads a ``RunConfig``."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pickle
from pathlib import Path

import pytest
from conftest import tiny_run_data

from t3s_ray import config
from t3s_ray.config import EngineConfig, ModelConfig, RunConfig
from t3s_ray.generate import GenerationSpec
from t3s_ray.runfolder import run_settings
from t3s_ray.training.sessions import LocalSession, RaySession, Session
from t3s_ray.training.spec import SelectionPlan, TrainJob, WorkerSpec, worker_spec

TRAINING = Path(__file__).resolve().parents[1] / "t3s_ray" / "training"
PROMPTS = [{"id": str(i), "prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]


def run_config(tmp_path, **over) -> RunConfig:
    return config.from_dict(tiny_run_data(tmp_path, "spec", **over))


def build(cfg: RunConfig, model_kind: str = "ar", **over) -> WorkerSpec:
    decided = {"out_dir": "/runs/x/train", "model_ref": cfg.student.ref, "model_kind": model_kind,
               "scoring_ref": cfg.student.ref, "anchor_model": None, "max_steps": cfg.train.max_steps,
               "store_name": "t3s-store-x", "prompts": PROMPTS, **over}
    return worker_spec(cfg, SelectionPlan.for_protocol(cfg), **decided)


def values(obj):
    """Every value inside ``obj``, through dataclasses, mappings and sequences."""
    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from values(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from values(v)


def test_the_spec_is_frozen_picklable_and_holds_no_run_config(tmp_path):
    cfg = run_config(tmp_path, selection={"protocol": "t3s_online", "switch": "bottleneck"})
    spec = build(cfg)
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_steps = 3
    inside = list(values(spec))
    assert not [v for v in inside if isinstance(v, RunConfig)]
    # nor the config as a dict: no mapping with the run's top-level sections
    sections = {"traces", "train", "eval", "probe", "selection"}
    assert not [v for v in inside if isinstance(v, dict) and len(sections & set(v)) > 1]
    # the typed sections a rank owns are the config's own objects, not copies to keep in sync
    assert spec.train is cfg.train and spec.student is cfg.student
    assert spec.settings == run_settings(cfg)


def test_one_builder_the_old_train_job_included(tmp_path):
    cfg = run_config(tmp_path, selection={"protocol": "t3s_online", "switch": "bottleneck"})
    job = TrainJob(cfg=cfg.to_dict(), out_dir="/runs/x/train", model_ref=cfg.student.ref, model_kind="ar",
                   scoring_ref=cfg.student.ref, plan=SelectionPlan.for_protocol(cfg), anchor_model=None,
                   max_steps=cfg.train.max_steps, store_name="t3s-store-x", prompts=PROMPTS)
    assert job.spec() == build(cfg)


def test_the_online_switch_is_prepared_on_the_driver(tmp_path):
    cfg = run_config(tmp_path, selection={"protocol": "t3s_online", "switch": "bottleneck", "rewind": True},
                     probe={"max_prompts": 4, "patience": 2, "sampling": {"samples": 3, "max_tokens": 7}},
                     data={"system_prompt": "Be brief."})
    online = build(cfg).online
    # what sample_accuracy built on every rank before
    assert online.generation == GenerationSpec(ModelConfig(ref=cfg.student.ref),
                                               EngineConfig(max_model_len=cfg.engine("probe").max_model_len),
                                               cfg.sampling("probe"), system_prompt="Be brief.")
    assert online.generation.sampling.samples == 3 and online.generation.sampling.max_tokens == 7
    assert online.verifier == "math" and online.prompts == tuple(PROMPTS[:4])
    assert (online.patience, online.rewind) == (2, True)
    # no switch to prepare: masking from the first refresh, or a protocol that is not online
    assert build(run_config(tmp_path, selection={"protocol": "t3s_online"})).online is None
    assert build(run_config(tmp_path, selection={"protocol": "t3s_static", "switch": "bottleneck"})).online is None


def test_the_refresh_rule_and_store_are_decided_for_the_model_kind(tmp_path):
    cfg = run_config(tmp_path, selection={"protocol": "t3s_static", "rule": "top_frac", "top_frac": 0.3, "tau": 0.5,
                                          "max_anchor_frac": 0.4, "store_shards": 2, "summary": "ema",
                                          "ema_alpha": 0.25, "trajectory_len": 3})
    assert build(cfg).selection.rule == {"rule": "top_frac", "tau": 0.5, "top_frac": 0.3, "max_anchor_frac": 0.4}
    assert build(cfg, model_kind="dllm").selection.rule == {"rule": "forced", "tau": 0.5, "max_anchor_frac": 0.4}
    store = build(cfg).store
    assert (store.name, store.shards, store.namespace) == ("t3s-store-x", 2, cfg.ray.namespace)
    assert store.kwargs == {"trajectory_len": 3, "summary": "ema", "ema_alpha": 0.25}


def test_no_training_module_but_the_spec_reads_a_run_config():
    """A rank reads its spec: only ``spec.py`` (which runs on the driver) names ``RunConfig`` or parses one."""
    readers = {}
    for path in sorted(TRAINING.glob("*.py")):
        names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
                  for a in n.names}
        readers[path.name] = sorted(names & {"RunConfig", "from_dict", "load"})
    assert {name: found for name, found in readers.items() if found} == {"spec.py": ["RunConfig", "from_dict"]}


def test_both_sessions_have_the_protocols_methods():
    for method in ("latest_checkpoint", "save_checkpoint"):
        expected = list(inspect.signature(getattr(Session, method)).parameters)
        for session in (LocalSession, RaySession):
            assert list(inspect.signature(getattr(session, method)).parameters) == expected, (session, method)
