"""The run folder's resumability promise: a folder written by an earlier version resumes. Its places
keep their names (``RunLayout``), and every stage's settings fingerprint (``stage_settings``) is the
one pinned in ``data/pinned_stage_settings.json`` (computed by the code before the fingerprints moved
into ``runfolder.py``) for a few sample configs: a key added, renamed or valued otherwise would make
those folders refuse to resume. If that is *meant*, rerun with ``T3S_PRINT_PINNED=1``, replace the
file with what it prints, and say in the commit why old runs may not resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_run_data

from t3s_ray import config
from t3s_ray.runfolder import RESTARTABLE, RunLayout, TracesFolder, TrainFolder, changed_keys, stage_settings

PINNED = Path(__file__).parent / "data" / "pinned_stage_settings.json"


def sample_configs(tmp_path: Path) -> dict[str, dict]:
    base = tiny_run_data(tmp_path, "pin")
    return {
        "dataset-hf": base,
        "generate-vllm": {**base, "traces": {"source": "generate", "backend": "vllm", "samples_per_prompt": 2},
                          "eval": {**base["eval"], "backend": "vllm", "seed_requests": False},
                          "probe": {"backend": "hf", "seed_requests": False},
                          "train": {**base["train"], "schedule": "constant"},
                          "selection": {"protocol": "t3s_online", "switch": "bottleneck"}},
        "generate-openai": {**base, "traces": {"source": "generate", "backend": "openai",
                                               "endpoint": {"model": "m", "base_url": "http://x/v1"}},
                            "selection": {"protocol": "random", "tau": 0.5}},
    }


def write_traces(run_dir: Path) -> None:
    """A finished traces folder: one shard pair (2 kept traces of 3 samples) and its manifest."""
    traces = RunLayout(run_dir).traces
    for shards, n in ((traces.kept, 2), (traces.samples, 3)):
        shards.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": [str(i) for i in range(n)]}), shards / "part-00000.parquet")
    traces.manifest.write_text(json.dumps({"shards": {"part-00000.parquet": {"samples": 3, "traces": 2}}}))


def test_every_stage_settings_are_the_pinned_ones(tmp_path):
    got = {}
    for name, data in sample_configs(tmp_path).items():
        cfg = config.from_dict(data)
        write_traces(cfg.run_dir)
        model = {"model_ref": "org/model", "model_dtype": "bfloat16"}
        got[name] = {stage: json.loads(json.dumps(stage_settings(stage, cfg, **(model if stage == "eval" else {})),
                                                  default=str))  # as claim records them
                     for stage in RESTARTABLE}
    if os.environ.get("T3S_PRINT_PINNED"):
        print(json.dumps(got, indent=1))
    pinned = json.loads(PINNED.read_text())
    for name, stages in pinned.items():
        for stage, settings in stages.items():
            assert changed_keys(settings, got[name][stage]) == [], f"{name}: the {stage} stage's settings changed"
            assert list(got[name][stage]) == list(settings)  # the same keys in the same order: the same file
    assert json.dumps(got, indent=1) == PINNED.read_text().rstrip("\n")


def test_the_train_and_probe_settings_record_the_traces_they_read(tmp_path):
    cfg = config.from_dict(tiny_run_data(tmp_path, "pin"))
    write_traces(cfg.run_dir)
    before = {s: stage_settings(s, cfg)["traces"] for s in ("train", "probe")}
    assert before["train"] == before["probe"]
    (RunLayout(cfg.run_dir).traces.kept / "part-00000.parquet").unlink()  # traces changed under the training
    with pytest.raises(Exception, match="part-00000.parquet is missing from traces/"):
        stage_settings("train", cfg)
    with pytest.raises(ValueError, match="model_ref"):
        stage_settings("eval", cfg)
    with pytest.raises(ValueError, match="unknown stage"):
        stage_settings("report", cfg)


def test_the_layout_keeps_the_places_of_folders_written_before(tmp_path):
    run = RunLayout(tmp_path)
    places = {
        run.config: "config.yaml", run.traces.path: "traces", run.traces.kept: "traces/traces",
        run.traces.samples: "traces/samples", run.traces.manifest: "traces/manifest.json",
        run.traces.errors: "traces/errors.jsonl", run.probe.path: "probe", run.probe.result: "probe/result.json",
        run.probe.model: "probe/model", run.probe.saved_model(20): "probe/models/step-000020",
        run.train.path: "train", run.train.metrics: "train/metrics.jsonl", run.train.summary: "train/summary.json",
        run.train.checkpoints: "train/checkpoints", run.train.ray_train: "train/ray_train",
        run.train.store: "train/store.npz", run.train.store_stats: "train/store_stats.json",
        run.train.tensorboard: "train/tensorboard", run.methods: "methods",
        run.method("sft").train.path: "methods/sft/train", run.method("rrt").merged_model: "methods/rrt/model",
        run.evals: "eval", run.eval("final").path: "eval/final", run.eval("final").scores: "eval/final/scores.json",
        run.eval("final").samples: "eval/final/samples.jsonl", run.results: "results.json",
        run.results_md: "results.md", run.report: "report", run.sweep: "sweep",
    }
    assert {str(p.relative_to(tmp_path)): want for p, want in places.items()} == {w: w for w in places.values()}
    assert TrainFolder.step_of(run.probe.saved_model(20)) == 20

    # A traces folder is found from its run folder or as itself (a sweep's shared one).
    write_traces(tmp_path)
    assert TracesFolder.of(tmp_path) == run.traces == TracesFolder.of(run.traces.path)
    (run.method("t3s").train.path / "ray_train").mkdir(parents=True)
    (run.methods / "sft").mkdir()
    (run.methods / "sft" / "train").symlink_to(run.probe.path, target_is_directory=True)  # dangling: no probe yet
    assert list(run.method_trainings()) == ["t3s"]


def test_an_sft_training_does_not_depend_on_the_selection_or_the_probe(tmp_path):
    """Changing tau (or the probe's knobs) and rerunning must not refuse the finished SFT method (it
    selects nothing and reads no probe); a selecting protocol's training still depends on them."""
    from t3s_ray.runfolder import claim

    def settings(protocol, **selection):
        cfg = config.from_dict(tiny_run_data(tmp_path, "sel", selection={"protocol": protocol, **selection},
                                             probe={"steps": 7 if selection else 4}))
        write_traces(cfg.run_dir)
        return stage_settings("train", cfg)

    assert settings("sft") == settings("sft", tau=2.0)
    assert not any(k.startswith("probe.") for k in settings("sft"))
    assert changed_keys(settings("t3s_static"), settings("t3s_static", tau=2.0)) == ["probe.steps", "selection.tau"]
    # A folder claimed when SFT still recorded the selection and the probe resumes; a changed value does not.
    folder = tmp_path / "sft-train"
    older = {**settings("sft"), "selection.tau": 0.0, "probe.steps": 40}
    claim(folder, "train", older)
    TrainFolder(folder).model.mkdir(parents=True)  # the stage has output
    claim(folder, "train", settings("sft"))
    with pytest.raises(config.ConfigError, match=r"train\.lr"):
        claim(folder, "train", {**settings("sft"), "train.lr": 1.0})


def test_the_probe_engine_is_operational(tmp_path):
    """Actors, batch sizes and backend options of the probe's engine change no stage's settings (as
    every engine's); whether its samples are seeded does."""
    def settings(**engine):
        cfg = config.from_dict(tiny_run_data(tmp_path, "eng", probe={"engine": engine}))
        write_traces(cfg.run_dir)
        return {stage: stage_settings(stage, cfg) for stage in ("probe", "train")}

    assert settings() == settings(concurrency=3, batch_size=7, engine_kwargs={"enforce_eager": True})
    assert settings(backend="vllm")["probe"] != settings(backend="vllm", seed_requests=False)["probe"]


def test_block_diffusion_keys_are_recorded_resolved_for_a_llada2_student_only(tmp_path):
    """``student.dllm_attention``, ``block_size`` and ``eos_fill`` enter a training's settings only where
    they are read, by a LLaDA2 student's training, and as what they mean for it: an AR student's or
    another diffusion LM's folders (written before the keys existed) resume whatever they say, and
    spelling out LLaDA2's default is the default."""
    def settings(ref: str, kind: str = "dllm", **student):
        dllm = {"kind": "dllm", "selector_ref": "builtin:tiny-llama"} if kind == "dllm" else {}
        cfg = config.from_dict(tiny_run_data(tmp_path, "bd", student={"ref": ref, **dllm, **student}))
        write_traces(cfg.run_dir)
        return {stage: stage_settings(stage, cfg) for stage in ("train", "probe")}

    keys = ("student.dllm_attention", "student.block_size", "student.eos_fill")
    ar = settings("builtin:tiny-llama", kind="ar")
    assert ar == settings("builtin:tiny-llama", kind="ar", block_size=8, eos_fill=False)
    assert not any(k in ar["train"] for k in keys)
    other = settings("builtin:tiny-dllm")  # LLaDA's objective: reads none of them
    assert other == settings("builtin:tiny-dllm", dllm_attention="full", block_size=8)
    assert not any(k in other["train"] for k in keys)
    llada2 = settings("builtin:tiny-llada2")
    assert [llada2["train"][k] for k in keys] == ["block_diffusion", 32, True]
    assert llada2 == settings("builtin:tiny-llada2", dllm_attention="block_diffusion", block_size=32)
    assert changed_keys(llada2["train"], settings("builtin:tiny-llada2", dllm_attention="full", block_size=16,
                                                  eos_fill=False)["train"]) == sorted(keys)
    assert list(llada2["train"])[:11] == [f"student.{k}" for k in (  # after the student's keys of before
        "ref", "revision", "dtype", "trust_remote_code", "kind", "selector_ref", "mask_token", "attn_implementation",
        "dllm_attention", "block_size", "eos_fill")]
    # block_diffusion for a diffusion LM that is not LLaDA2 is refused where the settings are taken: on the
    # driver, when the stage claims its folder (before any worker).
    with pytest.raises(config.ConfigError, match="student.ref builtin:tiny-dllm is not a LLaDA2 model"):
        settings("builtin:tiny-dllm", dllm_attention="block_diffusion")


def test_the_new_data_and_template_keys_enter_the_fingerprints_only_when_set(tmp_path):
    """Keys added since (``data.data_files``, ``data.revision``, ``traces.messages_field``, ...,
    ``traces.chat_template_kwargs``) read None at their defaults, as a folder written before they
    existed reads them: such folders resume. Set, they refuse another value, and dropping them again
    is a change too (a mapping is one value, not keys of its own that ``changed_keys`` would skip)."""
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")

    def settings(stage="traces", **sections):
        cfg = config.from_dict(tiny_run_data(tmp_path, "keys", **sections))
        write_traces(cfg.run_dir)
        model = {"model_ref": "org/model", "model_dtype": "bfloat16"} if stage == "eval" else {}
        return json.loads(json.dumps(stage_settings(stage, cfg, **model), default=str))

    base = settings()
    before = {k: v for k, v in base.items() if not k.startswith(("data.data_files", "data.revision", "traces.messag",
                                                                   "traces.chat_template_kwargs"))}
    assert changed_keys(before, base) == []  # a folder written without the keys resumes
    assert "data.streaming" not in base  # the same rows either way
    assert changed_keys(base, settings(data={"streaming": True})) == []
    kwargs = settings(traces={"chat_template_kwargs": {"enable_thinking": False}})
    assert changed_keys(base, kwargs) == ["traces.chat_template_kwargs"]
    assert changed_keys(kwargs, base) == ["traces.chat_template_kwargs"]  # dropped again: a change too
    assert changed_keys(base, settings(data={"revision": "v2", "data_files": ["a.parquet"], "source": "parquet"})) \
        == ["data.data_files", "data.revision", "data.source"]
    roles = settings(traces={"response_field": None, "messages_field": "c", "message_roles": {"Q": "user"}})
    assert changed_keys(base, roles) == ["traces.message_roles", "traces.messages_field", "traces.response_field"]
    own = settings(traces={"chat_template": str(template)})
    assert own["traces.chat_template"].startswith(f"{template} (sha256 ")
    template.write_text("{{ messages[-1]['content'] }}")  # edited in place: another template
    assert changed_keys(own, settings(traces={"chat_template": str(template)})) == ["traces.chat_template"]
    # The evaluation records what renders its prompts.
    ev = settings("eval")
    assert ev["traces.chat_template"] is None and ev["traces.chat_template_kwargs"] is None
    assert changed_keys(ev, settings("eval", traces={"chat_template_kwargs": {"enable_thinking": False}})) == \
        ["traces.chat_template_kwargs"]


def test_an_unreadable_settings_file_is_named(tmp_path):
    from t3s_ray.errors import DataError
    from t3s_ray.runfolder import claim

    folder = tmp_path / "traces"
    claim(folder, "traces", {"a": 1})
    (folder / "traces").mkdir()
    (folder / "traces" / "part-00000.parquet").write_bytes(b"")  # output: the settings are checked
    (folder / "settings.json").write_text('{"stage": "traces", "settings": {"a": ')
    with pytest.raises(DataError, match=r"settings.json: the traces stage's settings cannot be read"):
        claim(folder, "traces", {"a": 1})
