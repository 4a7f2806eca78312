import dataclasses
from pathlib import Path

import pytest
import yaml

from t3s_ray import config
from t3s_ray.cli import main
from t3s_ray.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "demo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = config.load(path)
    assert cfg.name


def test_defaults_validate():
    cfg = config.load(None)
    assert cfg.selection.tau == 0.0 and cfg.train.lr == 1e-5


def test_unknown_top_level_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "trian:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert "unknown key 'trian'" in msg and "demo.yaml" in msg and "did you mean 'train'" in msg


def test_unknown_nested_key_names_full_path(tmp_path):
    p = write(tmp_path, "selection:\n  refresh_intervl: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'selection.refresh_intervl' in demo.yaml; did you mean 'selection.refresh_interval'"):
        config.load(p)


def test_wrong_type_in_file_names_expected_type(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"train.max_steps: expected int, got 'ten' \(str\) in demo.yaml"):
        config.load(p)


def test_wrong_literal_lists_choices(tmp_path):
    p = write(tmp_path, "selection:\n  protocol: t3s_magic\n")
    with pytest.raises(ConfigError, match=r"selection.protocol: expected one of 'sft', 't3s_static'"):
        config.load(p)


def test_bool_is_not_an_int(tmp_path):
    p = write(tmp_path, "train:\n  num_workers: true\n")
    with pytest.raises(ConfigError, match="train.num_workers: expected int"):
        config.load(p)


def test_override_sets_typed_value(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-5\n")
    cfg = config.load(p, ["train.lr=2e-5", "selection.refresh_interval=7", "eval.benchmarks=[aime24, math500]"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.selection.refresh_interval == 7
    assert cfg.eval.benchmarks == ["aime24", "math500"]


def test_override_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"train.lr: expected float, got 'abc' \(str\) in --set train.lr=abc"):
        config.load(None, ["train.lr=abc"])


def test_override_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' in --set train.lrr=1; did you mean 'train.lr'"):
        config.load(None, ["train.lrr=1"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        config.load(None, ["train.lr"])


@pytest.mark.parametrize("override,message", [
    ("selection.tau=-0.1", "selection.tau must be >= 0"),
    ("selection.refresh_interval=0", "selection.refresh_interval must be >= 1"),
    ("selection.max_anchor_frac=0", "selection.max_anchor_frac must be in (0, 1]"),
    ("selection.max_anchor_frac=1.5", "selection.max_anchor_frac must be in (0, 1]"),
    ("probe.samples=0", "probe.samples must be >= 1"),
    ("traces.samples_per_prompt=0", "traces.samples_per_prompt must be >= 1"),
    ("train.batch_size=6", "train.batch_size must be a multiple of micro_batch_size * num_workers (4)"),
    ("student.kind=dllm", "student.selector_ref is required when kind is 'dllm'"),
    ("student.block_size=0", "student.block_size must be >= 1"),
    ("student.dllm_attention=block_diffusion", "student.dllm_attention is 'block_diffusion', but kind is 'ar'"),
    ("traces.source=dataset", "traces.response_field is required when source is 'dataset'"),
    ("eval.pass_k=[8]", "eval.pass_k every k must be in [1, samples=4]"),
    ("sweep.space={selection.tau: {between: [0, 1]}}", "sweep.space.selection.tau must be one of"),
    ("name=has space", "name must be non-empty"),
])
def test_cross_field_checks(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value)


def test_yaml_float_without_dot_is_accepted(tmp_path):
    # YAML 1.1 reads 1e-5 as a string; a float field takes it as a number.
    p = write(tmp_path, "train:\n  lr: 1e-5\n")
    assert config.load(p).train.lr == 1e-5


def test_base_inheritance_and_override(tmp_path):
    write(tmp_path, "name: parent\ntrain:\n  lr: 3.0e-5\n  max_steps: 7\n", "parent.yaml")
    child = write(tmp_path, "base: parent.yaml\nname: child\ntrain:\n  max_steps: 9\n", "child.yaml")
    cfg = config.load(child)
    assert (cfg.name, cfg.train.lr, cfg.train.max_steps) == ("child", 3e-5, 9)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        config.load(tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(write(tmp_path, "- a\n- b\n"))


def test_every_field_is_documented_in_its_docstring():
    for cls in [config.RunConfig, *config.SECTIONS.values()]:
        docs = config.field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__} lacks docs for {undocumented}"


def test_reference_markdown_lists_every_key():
    md = config.reference_markdown()
    for name, cls in config.SECTIONS.items():
        assert f"### `{name}`" in md
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in md


def test_resolved_yaml_roundtrips():
    cfg = config.load(ROOT / "configs" / "demo.yaml", ["train.lr=2e-5"])
    again = config.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_cli_config_show_prints_override(capsys):
    assert main(["config", "show", str(ROOT / "configs" / "demo.yaml"), "--set", "train.lr=2e-5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 2e-5 and shown["name"] == "demo"


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    p = write(tmp_path, "trian: {}\n")
    assert main(["config", "show", str(p)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train'" in err and "Traceback" not in err
    assert main(["config", "show", str(ROOT / "configs" / "demo.yaml"), "--set", "train.lr=abc"]) == 2
    assert "train.lr: expected float" in capsys.readouterr().err


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config.readme_with_reference(readme) == readme, "run `make docs` to regenerate the README's config reference"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = config.load(path)
    assert cfg.name and cfg.eval.benchmarks
    if "sweep" in path.name:
        assert cfg.sweep.space, f"{path.name} is a sweep config without a search space"


def _gpu_stages(cfg):
    stages = ["eval", "probe"] + (["traces"] if cfg.traces.source == "generate" and cfg.traces.backend != "openai" else [])
    return {stage: cfg.engine(stage) for stage in stages}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_configs_say_their_hardware_and_their_gpus_add_up(path):
    """Every GPU config names the hardware it needs in its header, and each vLLM engine's GPUs are
    tensor_parallel_size x pipeline_parallel_size, as num_gpus_per_actor says."""
    cfg = config.load(path)
    if not cfg.train.use_gpu:
        return
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# Hardware:") for line in header), f"{path.name}: no '# Hardware:' header line"
    for stage, engine in _gpu_stages(cfg).items():
        assert engine.num_gpus_per_actor > 0, f"{path.name}: {stage} samples without GPUs on a GPU cluster"
        if engine.backend == "vllm":
            tp_pp = config.engine_gpus(engine.engine_kwargs)
            assert engine.gpus_per_engine == tp_pp or tp_pp == 1, (path.name, stage, engine)
            if tp_pp > 1:
                assert engine.num_gpus_per_actor == tp_pp, (path.name, stage, engine)
    if cfg.teacher.ref == "deepseek-ai/DeepSeek-R1" and cfg.traces.source == "generate" and cfg.traces.backend == "vllm":
        # R1 ships in FP8 (~690 GB): 8x H200 at TP8 or 16x H100 at TP8xPP2, never bf16 weights.
        assert cfg.teacher.dtype == "auto"
        assert cfg.engine("traces").gpus_per_engine in (8, 16)
    if cfg.student.ref == "Qwen/Qwen3-32B":
        assert cfg.engine("eval").gpus_per_engine >= 2  # TP2: room for 40k-token KV caches on an H100


@pytest.mark.parametrize("section,where", [("traces", "traces"), ("eval", "eval"), ("probe", "probe")])
def test_num_gpus_per_actor_that_contradicts_tp_times_pp_names_both_keys(section, where):
    data = {section: {"engine_kwargs": {"tensor_parallel_size": 4, "pipeline_parallel_size": 2},
                      "num_gpus_per_actor": 1, "backend": "vllm"}}
    with pytest.raises(ConfigError, match=rf"{where}.num_gpus_per_actor is 1, but {where}.engine_kwargs asks for "
                                          rf"tensor_parallel_size x pipeline_parallel_size = 8 GPUs per engine"):
        config.from_dict(data)
    data[section]["num_gpus_per_actor"] = 8
    cfg = config.from_dict(data)
    assert cfg.engine(section).gpus_per_engine == 8


def test_the_probe_samples_on_evals_engine_unless_it_overrides():
    cfg = config.from_dict({"eval": {"backend": "vllm", "concurrency": 3, "num_gpus_per_actor": 1,
                                     "engine_kwargs": {"gpu_memory_utilization": 0.8}},
                            "data": {"max_seq_len": 1000}, "probe": {"max_tokens": 24}})
    probe = cfg.engine("probe")
    assert (probe.backend, probe.concurrency, probe.num_gpus_per_actor, probe.max_model_len) == ("vllm", 3, 1, 1024)
    assert probe.engine_kwargs == {"gpu_memory_utilization": 0.8}
    cfg = config.from_dict({"eval": {"backend": "vllm"}, "probe": {"backend": "hf", "batch_size": 2}})
    assert (cfg.engine("probe").backend, cfg.engine("probe").batch_size) == ("hf", 2)


def test_flash_attention_in_float32_and_a_shard_size_that_does_not_divide_are_refused():
    from t3s_ray.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"student.attn_implementation flash_attention_2 computes in fp16/bf16 only"):
        from_dict({"student": {"attn_implementation": "flash_attention_2"}, "train": {"dtype": "float32"}})
    from_dict({"student": {"attn_implementation": "flash_attention_2"}, "train": {"dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match=r"train.fsdp_shard_size must divide num_workers \(16\)"):
        from_dict({"train": {"strategy": "fsdp", "num_workers": 16, "batch_size": 64, "micro_batch_size": 1,
                             "fsdp_shard_size": 6}})
    with pytest.raises(ConfigError, match=r"train.fsdp_shard_size applies to strategy: fsdp only"):
        from_dict({"train": {"strategy": "ddp", "num_workers": 2, "fsdp_shard_size": 1}})
    assert from_dict({"train": {"strategy": "fsdp", "num_workers": 16, "batch_size": 64, "micro_batch_size": 1,
                                "fsdp_shard_size": 8}}).train.fsdp_shard_size == 8


def test_block_diffusion_with_flash_attention_is_refused_at_load():
    dllm = {"kind": "dllm", "selector_ref": "builtin:tiny-llama", "dllm_attention": "block_diffusion"}
    with pytest.raises(ConfigError, match=r"student.attn_implementation flash_attention_2 cannot take block "
                                          r"diffusion's 4-D boolean mask: use sdpa"):
        config.from_dict({"student": {**dllm, "attn_implementation": "flash_attention_2"},
                          "train": {"dtype": "bfloat16"}})
    assert config.from_dict({"student": dllm}).student.dllm_attention == "block_diffusion"


def test_diffusion_training_resolves_auto_by_the_model_and_refuses_what_cannot_apply():
    import inspect

    from t3s_ray.config import DiffusionTraining, diffusion_training
    from t3s_ray.t3s.diffusion import diffusion_batch

    def cfg(**student):
        return config.from_dict({"student": {"kind": "dllm", "selector_ref": "builtin:tiny-llama",
                                             "ref": "org/some-dllm", **student},
                                 "selection": {"mask_lo": 0.2, "mask_hi": 0.7}, "train": {"dtype": "bfloat16"}})

    # An AR student, and a diffusion LM that is not trained by blocks (LLaDA, BERT-style): nothing to resolve.
    assert diffusion_training(config.from_dict({}), block_model=True) is None
    assert diffusion_training(cfg(), block_model=False) is None
    assert diffusion_training(cfg(dllm_attention="full"), block_model=False) is None
    with pytest.raises(ConfigError, match="block_diffusion is LLaDA2's training regime, but student.ref "
                                          "org/some-dllm is not a LLaDA2 model"):
        diffusion_training(cfg(dllm_attention="block_diffusion"), block_model=False)
    # A LLaDA2 student: auto is block diffusion; the selection's masking rates come along.
    assert diffusion_training(cfg(), block_model=True) == DiffusionTraining("block", 32, True, 0.2, 0.7)
    assert diffusion_training(cfg(dllm_attention="block_diffusion"), block_model=True) == \
        diffusion_training(cfg(), block_model=True)
    assert diffusion_training(cfg(dllm_attention="full", block_size=16, eos_fill=False), block_model=True) == \
        DiffusionTraining("full", 16, False, 0.2, 0.7)
    with pytest.raises(ConfigError, match="flash_attention_3: the LLaDA2 student org/some-dllm attends under "
                                          "explicit 4-D masks"):
        diffusion_training(cfg(attn_implementation="flash_attention_3"), block_model=True)
    # The spec's fields are diffusion_batch's keyword arguments: the worker passes it as it is.
    spec = diffusion_training(cfg(), block_model=True)
    keywords = {name for name, p in inspect.signature(diffusion_batch).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert set(dataclasses.asdict(spec)) == keywords - {"mask_id", "fill_id", "generator"}
