"""The engine and sampling sections (issue 27, item 4): ``traces.engine``, ``eval.engine``,
``probe.engine`` (eval's, key by key) and each stage's ``sampling``; the flat keys of before still
load, moved with a deprecation notice, and a config that writes a key both ways is refused; a stage's
``GenerationSpec`` built from its sections is the one the stages built by hand before."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from t3s_ray import config
from t3s_ray.cli import main
from t3s_ray.config import FLAT_KEYS, ConfigError, ModelConfig
from t3s_ray.generate import GenerationSpec

ROOT = Path(__file__).resolve().parents[1]

# A value per flat key that differs from its default and passes the checks (with the others here).
VALUES = {"backend": "vllm", "concurrency": 3, "batch_size": 5, "max_model_len": 3000,
          "engine_kwargs": {"gpu_memory_utilization": 0.5}, "num_gpus_per_actor": 1.0, "seed_requests": True,
          "samples_per_prompt": 2, "samples": 2, "temperature": 0.3, "top_p": 0.9, "max_tokens": 100, "seed": 7}
MOVED = [(section, old, now) for section, keys in FLAT_KEYS.items() for old, now in keys.items() if old != now]


@pytest.fixture
def notices(monkeypatch, capsys):
    """The deprecation notices printed since the test started (each key's first in this process)."""
    monkeypatch.setattr(config, "_NOTIFIED", set())
    capsys.readouterr()
    return lambda: [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("t3s: warning:")]


@pytest.mark.parametrize("section,old,now", MOVED, ids=[f"{s}.{o}" for s, o, _ in MOVED])
def test_a_flat_key_loads_as_its_new_key_with_one_notice(section, old, now, notices, tmp_path):
    value = not config.from_dict({}).eval.engine.seed_requests if (section, old) == ("eval", "seed_requests") \
        else VALUES[old]
    flat = config.from_dict({section: {old: value}})
    part, key = now.split(".")
    assert flat == config.from_dict({section: {part: {key: value}}})
    assert getattr(getattr(getattr(flat, section), part), key) == value
    assert getattr(getattr(flat, section), old) == value  # code written against the flat key reads it too
    # Once per key and process, from a dict, a file or a --set override alike.
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({section: {old: value}}))
    assert config.load(path) == flat
    assert config.load(None, [f"{section}.{old}={json.dumps(value)}"]) == flat
    assert notices() == [f"t3s: warning: {section}.{old} is deprecated: write {section}.{now}"]


def test_every_flat_key_has_a_home_and_the_defaults_read_in_the_old_order():
    defaults = config.from_dict({}).to_dict()
    for section, keys in FLAT_KEYS.items():
        for old, now in keys.items():
            assert config._key_path_problem(config.RunConfig, [section, *now.split(".")]) in (
                None, "names a whole section, not a value"), f"{section}.{old}"  # traces.endpoint: a section
        # the flat keys first, in their old order; keys added since (eval.diffusion_threshold, ...) follow
        assert list(config.flat_section(section, defaults[section]))[:len(keys)] == list(keys)


def test_a_key_written_both_ways_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "both.yaml"
    path.write_text("traces:\n  backend: vllm\n  engine:\n    backend: hf\n")
    with pytest.raises(ConfigError, match=r"traces.backend and traces.engine.backend are both set in both.yaml"):
        config.load(path)
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("t3s: error:")] == [
        "t3s: error: traces.backend and traces.engine.backend are both set in both.yaml: keep traces.engine.backend "
        "only (traces.backend is its deprecated spelling)"]
    assert "Traceback" not in err


def test_an_override_or_a_child_file_wins_over_the_other_spelling(tmp_path, notices):
    parent = tmp_path / "parent.yaml"
    parent.write_text("eval:\n  engine:\n    concurrency: 2\n  sampling:\n    temperature: 0.2\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\neval:\n  concurrency: 4\n")  # a flat key over its base's new one
    cfg = config.load(child, ["eval.sampling.temperature=0.5"])
    assert (cfg.eval.engine.concurrency, cfg.eval.sampling.temperature) == (4, 0.5)
    cfg = config.load(parent, ["eval.concurrency=6", "eval.engine_kwargs.enforce_eager=true"])
    assert cfg.eval.engine.concurrency == 6 and cfg.eval.engine.engine_kwargs == {"enforce_eager": True}
    assert notices() == ["t3s: warning: eval.concurrency is deprecated: write eval.engine.concurrency",
                         "t3s: warning: eval.engine_kwargs is deprecated: write eval.engine.engine_kwargs"]


def test_a_problem_names_the_key_as_the_config_wrote_it():
    with pytest.raises(ConfigError, match=r"^eval.sampling.samples must be >= 1 in --set overrides"):
        config.load(None, ["eval.sampling.samples=0"])
    with pytest.raises(ConfigError, match=r"^eval.samples must be >= 1 in --set overrides"):
        config.load(None, ["eval.samples=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'eval.max_tokenz'.*did you mean 'eval.sampling.max_tokens'"):
        config.load(None, ["eval.max_tokenz=3"])
    cfg = config.from_dict({"traces": {"max_model_len": 2048}})
    assert cfg.written_as("traces.engine.max_model_len") == "traces.max_model_len"
    assert config.from_dict({}).written_as("traces.engine.max_model_len") == "traces.engine.max_model_len"


def test_every_shipped_config_loads_without_a_notice(notices):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config.load(path)
    assert notices() == []


def test_a_sweep_over_a_flat_key_keeps_its_name_and_sets_the_new_key(tmp_path, notices):
    from t3s_ray.sweep import trial_config

    cfg = config.from_dict({"sweep": {"space": {"eval.temperature": {"grid": [0.1, 0.2]}}}})
    assert list(cfg.sweep.space) == ["eval.temperature"]  # a trial's name is its parameters'
    with pytest.raises(ConfigError, match=r"sweep.space.eval.temprature 'temprature' is not a key"):
        config.from_dict({"sweep": {"space": {"eval.temprature": {"grid": [0.1, 0.2]}}}})
    trial = trial_config(cfg.to_dict(), {"eval.temperature": 0.2}, tmp_path, "trial-x")
    assert trial.eval.sampling.temperature == 0.2
    assert notices() == ["t3s: warning: eval.temperature is deprecated: write eval.sampling.temperature"]


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(config.ProbeEngineConfig)])
def test_the_probe_takes_evals_engine_key_by_key(key):
    eval_engine = {"backend": "vllm", "concurrency": 3, "batch_size": 5, "engine_kwargs": {"enforce_eager": True},
                   "num_gpus_per_actor": 1.0, "seed_requests": False}
    own = {"backend": "hf", "concurrency": 2, "batch_size": 7, "engine_kwargs": {}, "num_gpus_per_actor": 0.5,
           "seed_requests": True}
    cfg = config.from_dict({"eval": {"engine": eval_engine}, "data": {"max_seq_len": 500},
                            "probe": {"engine": {key: own[key]}, "sampling": {"max_tokens": 24}}})
    probe = cfg.engine("probe")
    assert getattr(probe, key) == own[key]
    assert {k: getattr(probe, k) for k in eval_engine if k != key} == {k: v for k, v in eval_engine.items() if k != key}
    assert probe.max_model_len == 524  # a training-length prompt and the probe's answer
    assert cfg.engine("eval") == config.EngineConfig(**dataclasses.asdict(cfg.eval.engine))


# --------------------------------------------------------------------------------------------
# GenerationSpec: built from the sections, the spec each stage built by hand before
# --------------------------------------------------------------------------------------------

def old_traces_spec(cfg):
    """traces.generation_spec as it was written before the sections (the flat keys read where they are now)."""
    t, e = cfg.traces, cfg.engine("traces")
    endpoint = dataclasses.asdict(t.endpoint) if t.backend == "openai" else None
    return GenerationSpec(model_ref=cfg.teacher.ref, backend=e.backend, concurrency=e.concurrency,
                          batch_size=e.batch_size, max_model_len=e.max_model_len, engine_kwargs=dict(e.engine_kwargs),
                          num_gpus_per_actor=e.gpus_per_engine, seed_requests=e.seed_requests,
                          n=t.samples_per_prompt, temperature=t.temperature, top_p=t.top_p, max_tokens=t.max_tokens,
                          seed=t.seed, topk_logprobs=t.topk_logprobs, chat_template=t.chat_template,
                          system_prompt=cfg.data.system_prompt, dtype=cfg.teacher.dtype,
                          trust_remote_code=cfg.teacher.trust_remote_code, revision=cfg.teacher.revision,
                          endpoint=endpoint, logprobs=True)  # (issue 26: the traces are the stage that keeps them)


def old_probe_spec(cfg, ref, engine):
    p = cfg.probe
    return GenerationSpec.for_engine(engine, ref, n=p.samples, temperature=p.temperature, max_tokens=p.max_tokens,
                                     seed=cfg.seed, system_prompt=cfg.data.system_prompt, dtype=cfg.student.dtype,
                                     trust_remote_code=cfg.student.trust_remote_code)


def old_eval_spec(cfg, bench, model_ref, who):
    ev = cfg.eval
    return GenerationSpec.for_engine(
        cfg.engine("eval"), model_ref, n=bench.samples or ev.samples,
        temperature=ev.temperature if bench.temperature is None else bench.temperature,
        top_p=ev.top_p if bench.top_p is None else bench.top_p,
        max_tokens=bench.max_tokens or ev.max_tokens, seed=cfg.seed if ev.seed is None else ev.seed,
        system_prompt=bench.system_prompt, dtype=who.dtype, trust_remote_code=who.trust_remote_code,
        sampler="ar", diffusion_steps=ev.diffusion_steps, diffusion_block_length=ev.diffusion_block_length,
        mask_token=cfg.student.mask_token)


@pytest.mark.parametrize("name", ["qwen3-8b-boba200.yaml", "llada2-mini-dllm.yaml", "smollm2-selfdistill.yaml",
                                  "lab.yaml"])
def test_each_stage_spec_from_its_sections_is_the_hand_built_one(name):
    from t3s_ray.traces import generation_spec

    cfg = config.load(ROOT / "configs" / name)
    assert generation_spec(cfg) == old_traces_spec(cfg)
    # The probe: eval's engine but for probe.engine's keys, the run's seed, top-p 0.95.
    engine = cfg.engine("probe")
    spec = GenerationSpec(cfg.student.with_weights("/x/step-5"), engine, cfg.sampling("probe"),
                          system_prompt=cfg.data.system_prompt)
    assert spec == old_probe_spec(cfg, "/x/step-5", engine)
    # The evaluation: per benchmark, its own sampling over eval's.
    bench = config.load_benchmark("builtin:lab-greedy")  # temperature 0 and one sample of its own
    for b in (config.load_benchmark(cfg.eval.benchmarks[0]), bench):
        spec = GenerationSpec(cfg.student.with_weights("org/m"), cfg.engine("eval"), b.sampling(cfg.sampling("eval")),
                              system_prompt=b.system_prompt, diffusion_steps=cfg.eval.diffusion_steps,
                              diffusion_block_length=cfg.eval.diffusion_block_length,
                              mask_token=cfg.student.mask_token)
        assert spec == old_eval_spec(cfg, b, "org/m", cfg.student)


def test_an_openai_teachers_spec_and_the_flat_spec_reads():
    cfg = config.load(ROOT / "configs" / "qwen3-8b-boba200.yaml",
                      ["traces.engine.backend=openai", "traces.engine.engine_kwargs={}",
                       "traces.engine.num_gpus_per_actor=0", "traces.endpoint.model=m"])
    from t3s_ray.traces import generation_spec

    spec = generation_spec(cfg)
    assert spec == old_traces_spec(cfg) and spec.endpoint["model"] == "m"
    assert (spec.model, spec.engine, spec.sampling) == (cfg.teacher, cfg.engine("traces"), cfg.sampling("traces"))
    assert (spec.n, spec.backend, spec.model_ref, spec.max_tokens) == (16, "openai", cfg.teacher.ref, 16384)
    assert GenerationSpec(ModelConfig(ref="a"), max_tokens=6) == GenerationSpec(model_ref="a", max_tokens=6)
    with pytest.raises(TypeError, match="unexpected keywords"):
        GenerationSpec(model_ref="a", samples_per_prompt=2)


def test_the_hash_a_manifest_records_is_the_one_of_before():
    """``config_hash`` of the defaults and of a vLLM teacher, as the code before the sections computed them."""
    assert config.from_dict({}).hash("teacher", "data", "traces") == "09748414c96e"
    # The whole config's hash (no stage records it) moved when eval gained diffusion_threshold and
    # diffusion_steps_per_block (issue 24); traces' config_hash above, the one a manifest records, did not.
    assert config.from_dict({}).hash() == "be9904a20099"
    cfg = config.from_dict({"traces": {"engine": {"backend": "vllm", "engine_kwargs": {"tensor_parallel_size": 2},
                                                  "num_gpus_per_actor": 2}, "sampling": {"samples": 3}}})
    assert (cfg.hash("teacher", "data", "traces"), cfg.hash()) == ("806eead9f473", "6834072a50bf")
    # The data and traces keys of issue 26 (config.HASH_OMITS_AT_DEFAULT) count once set, not before.
    assert config.from_dict({"data": {"revision": "v2"}}).hash("teacher", "data", "traces") != "09748414c96e"
    assert config.from_dict({"traces": {"chat_template_kwargs": {"enable_thinking": False}}}).hash() != "be9904a20099"
    # The student keys of issue 24 likewise.
    assert config.from_dict({"student": {"block_size": 16}}).hash() != "be9904a20099"
    # eval.endpoint (issue 26) likewise.
    assert config.from_dict({"eval": {"endpoint": {"model": "r1"}}}).hash() != "be9904a20099"
    # report_to and tracking (issue 26), top-level keys, likewise.
    assert config.from_dict({"report_to": []}).hash() != "be9904a20099"
    assert config.from_dict({"tracking": {"project": "p"}}).hash() != "be9904a20099"


def test_one_rule_for_the_gpus_of_an_engine():
    engine = config.EngineConfig(backend="vllm", engine_kwargs={"tensor_parallel_size": 4, "pipeline_parallel_size": 2},
                                 num_gpus_per_actor=8)
    assert config.engine_gpus(engine.engine_kwargs) == 8 == engine.gpus_per_engine
    assert dataclasses.replace(engine, backend="hf").gpus_per_engine == 8.0  # hf: its own num_gpus_per_actor
    assert config.engine_problems(dataclasses.replace(engine, num_gpus_per_actor=1), "eval.engine") == [
        ("num_gpus_per_actor", "is 1, but eval.engine.engine_kwargs asks for tensor_parallel_size x "
         "pipeline_parallel_size = 8 GPUs per engine: set eval.engine.num_gpus_per_actor: 8")]
