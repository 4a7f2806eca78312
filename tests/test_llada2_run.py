"""`t3s run` of a LLaDA2 student (builtin:tiny-llada2) under the static T3S protocol, over 2 gloo FSDP
ranks: the probe trains the AR selector (builtin:tiny-llama), the student trains by the block-diffusion
loss, pauses at a checkpoint and resumes to the weights of an uninterrupted training, is exported as a
folder that loads without remote code, and is evaluated with the block sampler. Slow (minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t3s_ray import config


def llada2_data(tmp_path: Path) -> dict:
    from conftest import tiny_run_data

    return tiny_run_data(
        tmp_path, "llada2",
        student={"ref": "builtin:tiny-llada2", "kind": "dllm", "selector_ref": "builtin:tiny-llama", "block_size": 8},
        train={"num_workers": 2, "strategy": "fsdp", "batch_size": 4, "micro_batch_size": 2, "max_steps": 2,
               "lr": 1e-3, "checkpoint_every": 1, "keep_last": 2},
        selection={"protocol": "t3s_static", "tau": 0.0},
        probe={"steps": 2, "eval_every": 1, "sampling": {"samples": 1, "max_tokens": 4}, "max_prompts": 2},
        eval={"limit": 2, "sampling": {"samples": 1, "max_tokens": 8}, "diffusion_block_length": 8},
        compare=["base", "t3s"])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_llada2_run_trains_by_blocks_resumes_exports_and_evaluates(ray_local, tmp_path):
    from t3s_ray import models
    from t3s_ray.pipeline import _prepare_method, link_shared_folder, run_pipeline
    from t3s_ray.runfolder import RunLayout
    from t3s_ray.traces import run_traces
    from t3s_ray.train import run_train

    cfg = config.from_dict(llada2_data(tmp_path))
    run_traces(cfg)
    # The t3s method paused after step 1 (its checkpoint), then `t3s run` resumes it to step 2.
    t3s = _prepare_method(cfg, "t3s")
    assert run_train(t3s, stop_at=1)["step"] == 1
    scores = run_pipeline(cfg)
    assert set(scores) == {"base", "t3s"} and all(s["benchmarks"]["builtin:arith"]["n"] == 2 for s in scores.values())
    folder = RunLayout(t3s.run_dir).train
    rows = [json.loads(x) for x in folder.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and {r["objective"] for r in rows} == {"block_diffusion"}
    assert all(r["anchor_frac"] > 0 for r in rows)  # the probe's forced tokens reached the noisy half
    probe_rows = [json.loads(x) for x in RunLayout(cfg.run_dir).probe.metrics.read_text().splitlines()]
    assert {r["objective"] for r in probe_rows} == {"ar"}  # the probe trains the AR selector

    # The same training uninterrupted, in a folder of its own sharing the traces and the probe.
    whole = config.from_dict({**t3s.to_dict(), "name": "t3s-whole"})
    for shared in ("traces", "probe"):
        link_shared_folder(getattr(RunLayout(cfg.run_dir), shared).path, getattr(RunLayout(whole.run_dir), shared).path)
    run_train(whole)
    resumed, uninterrupted = weights(folder.model), weights(RunLayout(whole.run_dir).train.model)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-4, atol=1e-5)
    theta0 = weights(Path(models.resolve("builtin:tiny-llada2")))
    assert any(not torch.equal(resumed[k].float(), theta0[k].float()) for k in theta0)  # it trained

    # The export: the Hub's key names, the generation config (the sampler's EOS ids), loadable without
    # remote code by the native class, sampled by the block sampler.
    assert resumed.keys() == theta0.keys()
    assert (folder.model / "generation_config.json").exists()
    model = models.load_model(str(folder.model), trust_remote_code=False)
    assert type(model).__name__ == "LLaDA2MoeModelLM" and models.uses_block_diffusion(model)
    assert models.is_masked_lm(model)
