"""Stage 2 on CPU: 2 Ray Train workers (gloo), a builtin tiny model, the ConfidenceStore actors."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from t3s_ray import config
from t3s_ray.batching import global_batch
from t3s_ray.distributed import read_sharded_model
from t3s_ray.traces import run_traces
from t3s_ray.train import choose_bottleneck, run_train
from t3s_ray.worker import bottleneck_passed


def write_config(tmp_path: Path, name: str, **sections) -> Path:
    data = {
        "name": name, "output_dir": str(tmp_path / "runs"), "ray": {"num_cpus": 4},
        "teacher": {"ref": "builtin:tiny-llama"}, "student": {"ref": "builtin:tiny-llama", "dtype": "float32"},
        "data": {"source": "builtin:arith", "builtin_size": 8, "max_seq_len": 256},
        # The builtin problems' worked solutions, imported as traces: no generation needed here.
        "traces": {"source": "dataset", "response_field": "solution", "keep": "all_correct", "verifier": "math",
                   "max_tokens": 24, "max_model_len": 256},
        "train": {"num_workers": 2, "batch_size": 4, "micro_batch_size": 1, "max_steps": 6, "lr": 1e-2,
                  "checkpoint_every": 2, "keep_last": 0},
        "selection": {"protocol": "sft"},
        "probe": {"steps": 4, "eval_every": 2, "samples": 1, "max_tokens": 8, "max_prompts": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def traces_root(tmp_path_factory, ray_local):
    """One traces folder shared by the training tests (8 verified worked solutions)."""
    root = tmp_path_factory.mktemp("train")
    cfg = config.load(write_config(root, "base"))
    assert run_traces(cfg)["accepted_traces"] == 8
    return root


def clone_traces(root: Path, tmp_path: Path, name: str, **sections):
    cfg_path = write_config(tmp_path, name, **sections)
    cfg = config.load(cfg_path)
    src = root / "runs" / "base" / "traces"
    dst = cfg.run_dir / "traces"
    dst.parent.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copytree(src, dst)
    return cfg


def final_weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(str(cfg.run_dir / "train" / "model" / "model.safetensors"))


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model of a sharded training checkpoint, keyed as in a Hugging Face state dict."""
    return {k.removeprefix("model."): v for k, v in read_sharded_model(checkpoint / "dcp").items()}


def metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def test_global_batch_order_is_deterministic_and_covers_every_epoch():
    n, b = 10, 4
    stream = [i for step in range(5) for i in global_batch(step, n, b, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream == [i for step in range(5) for i in global_batch(step, n, b, seed=3)]
    assert stream != [i for step in range(5) for i in global_batch(step, n, b, seed=4)]


def test_choose_bottleneck_is_argmin_earliest_on_ties():
    accs = [{"step": 0, "accuracy": 0.1, "model": "m0"}, {"step": 2, "accuracy": 0.5, "model": "m2"},
            {"step": 4, "accuracy": 0.2, "model": "m4"}, {"step": 6, "accuracy": 0.2, "model": "m6"},
            {"step": 8, "accuracy": 0.4, "model": "m8"}]
    r = choose_bottleneck(accs)
    assert r["bottleneck_step"] == 4 and r["bottleneck_model"] == "m4"  # θ0 is not a candidate


@pytest.mark.parametrize("accs,patience,passed", [
    ([0.5, 0.3, 0.4], 1, True),          # fell, then rose once
    ([0.5, 0.3, 0.4], 2, False),         # one rise is not two
    ([0.5, 0.3, 0.4, 0.45], 2, True),
    ([0.5, 0.3, 0.4, 0.35], 1, False),   # the latest evaluation fell again
    ([0.2, 0.3, 0.4], 1, True),          # the minimum may be the first evaluation
    ([0.3], 1, False),
    ([0.5, 0.5, 0.5], 1, False),         # flat is not rising
])
def test_bottleneck_rule(accs, patience, passed):
    assert bottleneck_passed(accs, patience) is passed


@pytest.fixture(scope="module")
def sft_run(traces_root, tmp_path_factory):
    """Run with a relative output_dir from the run's folder, as a user would: workers run in other
    working directories, so every path they write must come out where the driver expects it."""
    root = tmp_path_factory.mktemp("sft")
    cfg = clone_traces(traces_root, root, "sft")
    return cfg, run_relative(cfg, root)


def run_relative(cfg, root: Path) -> dict:
    """run_train from ``root`` with ``output_dir: runs`` (relative), restoring the working directory."""
    import dataclasses

    cwd = os.getcwd()
    os.chdir(root)
    try:
        return run_train(dataclasses.replace(cfg, output_dir="runs"))
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_sft_trains_and_checkpoints(sft_run):
    cfg, summary = sft_run
    out = cfg.run_dir / "train"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.model_type == "llama"
    m = metrics(cfg)
    assert [r["step"] for r in m] == list(range(1, 7))
    assert m[-1]["loss"] < m[0]["loss"]  # lr 1e-2 on 8 short traces: it must fit them
    assert all(r["kept_frac"] == 1.0 for r in m)  # SFT keeps every target
    assert summary["store"]["num_tokens"] > 0 and summary["store"]["visited_frac"] == 1.0
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    ckpts = sorted(p for p in (out / "ray_train").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 3  # steps 2, 4 and 6
    for c in ckpts:
        # Sharded: each rank wrote its own file; no consolidated model or optimizer in a checkpoint.
        assert {p.name for p in c.iterdir()} == {"dcp", "trainer_state.json", "store.npz", "rng_rank0.pt",
                                                 "rng_rank1.pt"}
        assert {p.name for p in (c / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"] == 6
    last = checkpoint_weights(ckpts[-1])  # the fp32 master weights of step 6 are the exported model
    final = final_weights(cfg)
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)


@pytest.fixture(scope="module")
def online_run(traces_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    cfg = clone_traces(traces_root, tmp, "online", selection={"protocol": "t3s_online", "refresh_interval": 2},
                       train={"max_failures": 1})
    run_train(cfg)
    return cfg


@pytest.mark.slow
def test_online_refresh_changes_masks_exactly_at_refresh_steps(online_run):
    m = metrics(online_run)
    versions = [r["mask_version"] for r in m]
    # Refreshes happen before steps 3 and 5 (every 2 steps); never in between.
    assert versions == [0, 0, 1, 1, 2, 2]
    assert all(r["mask_version_min_rank"] == r["mask_version_max_rank"] == r["mask_version"] for r in m)
    assert m[0]["anchor_frac"] == 0.0 and m[0]["kept_frac"] == 1.0
    later = m[2:]
    assert any(r["anchor_frac"] > 0 for r in later)  # lr 1e-2 raises the confidence of many tokens
    assert all(abs(r["kept_frac"] - (1 - r["anchor_frac"])) < 1e-9 for r in later)
    stats = json.loads((online_run.run_dir / "train" / "store_stats.json").read_text())
    assert [h["step"] for h in stats["refreshes"]] == [2, 4]


@pytest.mark.slow
def test_t3s_and_sft_give_different_updates(online_run, sft_run):
    sft, _ = sft_run
    a, b = final_weights(sft), final_weights(online_run)
    # Same seed, data and batches: the first two steps (no masks yet) agree, so any difference
    # comes from the anchors dropped after the first refresh.
    m_sft, m_t3s = metrics(sft), metrics(online_run)
    assert [r["batch"] for r in m_sft] == [r["batch"] for r in m_t3s]
    assert m_sft[0]["loss"] == pytest.approx(m_t3s[0]["loss"], rel=1e-6)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_worker_resumes_to_the_same_weights_and_store(online_run, traces_root, tmp_path, strategy):
    """Kill a worker mid-run: Ray Train restarts the group from the latest (sharded) checkpoint, and
    the run ends with the weights and store of the uninterrupted DDP run (FSDP: within the float
    tolerance FSDP and DDP agree to; a lost optimizer state or data position would be far off)."""
    cfg = clone_traces(traces_root, tmp_path, f"online-killed-{strategy}",
                       selection={"protocol": "t3s_online", "refresh_interval": 2},
                       train={"max_failures": 1, "strategy": strategy})
    errors = []
    thread = threading.Thread(target=lambda: _run_catching(cfg, errors))
    thread.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        # Kill once the step-3 checkpoint is surely registered (a later step has been logged).
        logged = cfg.run_dir / "train" / "metrics.jsonl"
        if logged.exists() and len(logged.read_text().splitlines()) >= 4:
            workers = _train_worker_pids()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    thread.join()
    assert not errors, errors
    assert killed is not None, "the run ended before a worker could be killed"
    m = metrics(cfg)
    assert [r["step"] for r in m] == list(range(1, 7))  # redone steps replaced, none lost
    a, b = final_weights(online_run), final_weights(cfg)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if strategy == "ddp" else {"rtol": 1e-4, "atol": 1e-5}
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tolerance)
    sa = np.load(online_run.run_dir / "train" / "store.npz")
    sb = np.load(cfg.run_dir / "train" / "store.npz")
    assert sorted(sa.files) == sorted(sb.files)
    for key in sa.files:
        if sa[key].dtype.kind == "f":
            np.testing.assert_allclose(sa[key], sb[key], rtol=1e-3, atol=1e-3)
        else:
            np.testing.assert_array_equal(sa[key], sb[key])


def _train_worker_pids() -> list[int]:
    """This test session's Ray Train worker processes (Ray names them ray::RayTrainWorker...): only
    those under this session's raylet, so that another Ray instance on the machine is left alone."""
    import psutil
    import ray

    session = ray._private.worker.global_worker.node.session_name
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if not cmd.startswith("ray::RayTrainWorker"):
            continue
        try:
            ours = any(session in " ".join(p.cmdline()) for p in proc.parents()[:3])
        except psutil.Error:
            continue
        if ours:
            pids.append(proc.info["pid"])
    return sorted(pids)


def _run_catching(cfg, errors):
    try:
        run_train(cfg)
    except Exception as e:  # surfaced by the assertion in the test
        errors.append(repr(e))


def test_the_worker_without_ray_matches_two_ray_workers(sft_run, tmp_path):
    """The same recipe under no Ray and no process group (one rank, one micro-batch of 4, an
    in-process store) gives the update of Ray Train's 2 DDP workers with micro-batches of 1: the
    loss is normalised over the global batch, so the split does not change the update."""
    import dataclasses

    from t3s_ray.distributed import Ranks
    from t3s_ray.models import load_tokenizer
    from t3s_ray.traces import load_traces
    from t3s_ray.train import tokenize_traces
    from t3s_ray.worker import SelectionPlan, TrainJob, train_standalone

    ray_cfg, _ = sft_run
    cfg = dataclasses.replace(ray_cfg, train=dataclasses.replace(ray_cfg.train, num_workers=1, micro_batch_size=4))
    traces = load_traces(ray_cfg.run_dir)
    examples, _ = tokenize_traces(traces, load_tokenizer(cfg.student.ref), system_prompt=cfg.data.system_prompt,
                                  chat_template=cfg.traces.chat_template, max_seq_len=cfg.data.max_seq_len)
    job = TrainJob(cfg=cfg.to_dict(), out_dir=str(tmp_path / "train"), model_ref=cfg.student.ref, model_kind="ar",
                   scoring_ref=cfg.student.ref, plan=SelectionPlan.for_protocol(cfg), anchor_model=None,
                   max_steps=cfg.train.max_steps, store_name="unused")
    train_standalone(job, examples, Ranks())
    a = final_weights(ray_cfg)
    b = load_file(str(tmp_path / "train" / "model" / "model.safetensors"))
    for k in a:  # AdamW at lr 1e-2 turns float summation-order noise into ~1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5)
    ray_losses = [r["loss"] for r in metrics(ray_cfg)]
    plain = [json.loads(line)["loss"] for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert plain == pytest.approx(ray_losses, rel=1e-5)


@pytest.mark.slow
def test_resume_at_epoch_boundary_continues_with_next_epoch(sft_run, traces_root, tmp_path):
    # 8 traces, batch 4: each epoch is 2 steps. Stop right after the step-2 checkpoint (an epoch
    # boundary), then rerun the same run name: it must go on with epochs 1 and 2 and match the
    # uninterrupted 6-step run batch for batch and weight for weight.
    full, _ = sft_run
    part = clone_traces(traces_root, tmp_path, "part", train={"max_steps": 2})
    run_train(part)
    (part.run_dir / "train" / "summary.json").unlink()  # as if interrupted after the checkpoint
    resumed = config.load(write_config(tmp_path, "part"))
    run_train(resumed)
    m_full, m_part = metrics(full), metrics(resumed)
    assert [r["step"] for r in m_part] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in m_part] == [0, 0, 1, 1, 2, 2]
    assert [r["batch"] for r in m_part] == [r["batch"] for r in m_full]
    assert sorted(i for r in m_part[2:4] for i in r["batch"]) == list(range(8))  # the whole next epoch
    a, b = final_weights(full), final_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def static_run(traces_root, tmp_path_factory):
    # A random tiny model gains confidence on nearly every token, so cap the anchors at half.
    root = tmp_path_factory.mktemp("static")
    cfg = clone_traces(traces_root, root, "static", selection={"protocol": "t3s_static", "max_anchor_frac": 0.5})
    return cfg, run_relative(cfg, root)  # relative: the probe's model paths must still resolve in workers


@pytest.mark.slow
def test_static_protocol_probes_scores_and_trains_with_anchors(static_run):
    cfg, summary = static_run
    probe = json.loads((cfg.run_dir / "probe" / "result.json").read_text())
    assert [a["step"] for a in probe["accuracies"]] == [0, 2, 4]  # θ0, then a model every 2 probe steps
    assert probe["bottleneck_step"] == choose_bottleneck(probe["accuracies"])["bottleneck_step"]
    assert summary["probe"]["bottleneck_model"].endswith(f"step-{probe['bottleneck_step']:06d}")
    assert (Path(probe["bottleneck_model"]) / "model.safetensors").exists()
    m = metrics(cfg)
    # One classification from Δc = c(θb) − c(θ0) before the first step; masks are on from step 1.
    assert all(r["mask_version"] == 1 and r["masking_on"] for r in m)
    assert all(0.3 < r["anchor_frac"] <= 0.5 for r in m)
    assert all(abs(r["kept_frac"] - (1 - r["anchor_frac"])) < 1e-9 for r in m)
    stats = json.loads((cfg.run_dir / "train" / "store_stats.json").read_text())
    assert [h["step"] for h in stats["refreshes"]] == [0] and stats["final"]["anchor_frac"] <= 0.5


@pytest.mark.slow
def test_the_static_probe_is_the_sft_training_up_to_its_steps(static_run, sft_run):
    """What lets `t3s run` use the probe's run as its sft method: SFT from θ0 in the same data order
    with the same settings. The probe's model (4 steps) is the sft run's checkpoint of step 4."""
    static, sft = static_run[0], sft_run[0]
    probe_final = load_file(str(static.run_dir / "probe" / "model" / "model.safetensors"))
    step4 = next(c for c in (sft.run_dir / "train" / "ray_train").glob("checkpoint_*")
                 if c.is_dir() and json.loads((c / "trainer_state.json").read_text())["step"] == 4)
    at4 = checkpoint_weights(step4)
    assert probe_final.keys() == at4.keys()
    for k in at4:
        torch.testing.assert_close(probe_final[k], at4[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_masked_lm_student_declared_ar_is_refused_before_training(traces_root, tmp_path):
    from t3s_ray.config import ConfigError

    cfg = clone_traces(traces_root, tmp_path, "dllm-as-ar", student={"ref": "builtin:tiny-dllm"})
    with pytest.raises(ConfigError, match="builtin:tiny-dllm is a masked LM .*set student.kind: dllm"):
        run_train(cfg)


def test_dllm_student_trains_with_forced_masks(traces_root, tmp_path):
    from transformers import AutoModelForMaskedLM

    cfg = clone_traces(traces_root, tmp_path, "dllm", selection={"protocol": "t3s_static", "tau": 0.0},
                       student={"ref": "builtin:tiny-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"},
                       probe={"steps": 2, "eval_every": 2})
    run_train(cfg)
    m = metrics(cfg)
    assert all(r["masking_on"] and r["mask_version"] == 1 for r in m)
    # The forced set: the few tokens whose selector confidence fell in the probe (Δc < -tau).
    stats = json.loads((cfg.run_dir / "train" / "store_stats.json").read_text())["final"]
    assert stats["num_anchor_tokens"] > 0 and stats["mean_delta_anchor"] < 0 < stats["mean_delta_other"]
    assert sum(r["anchor_frac"] for r in m) > 0
    assert all(math.isfinite(r["loss"]) for r in m) and m[-1]["loss"] < m[0]["loss"]
    model = AutoModelForMaskedLM.from_pretrained(cfg.run_dir / "train" / "model")
    assert model.config.model_type == "bert"


@pytest.mark.slow
def test_fsdp_matches_ddp_on_cpu(sft_run, traces_root, tmp_path):
    ddp, _ = sft_run
    fsdp = clone_traces(traces_root, tmp_path, "fsdp", train={"strategy": "fsdp"})
    run_train(fsdp)
    a, b = final_weights(ddp), final_weights(fsdp)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ckpt = max(p for p in (fsdp.run_dir / "train" / "ray_train").glob("checkpoint_*") if p.is_dir())
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # Each rank wrote its half of every sharded tensor (model and AdamW moments).
    sizes = [(ckpt / "dcp" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert min(sizes) > 0.4 * max(sizes), sizes
    shard_weights = checkpoint_weights(ckpt)
    for k in a:
        torch.testing.assert_close(shard_weights[k], b[k])


@pytest.mark.slow
def test_online_scoring_pass_refresh_and_bottleneck_accuracy(traces_root, tmp_path):
    """refresh_source: scoring_pass re-scores every example; switch: bottleneck measures train accuracy
    in the workers every probe.eval_every steps and keeps masking off while accuracy does not rise."""
    cfg = clone_traces(traces_root, tmp_path, "bottleneck", train={"max_steps": 4},
                       selection={"protocol": "t3s_online", "refresh_interval": 2, "refresh_source": "scoring_pass",
                                  "switch": "bottleneck"},
                       probe={"eval_every": 2, "samples": 1, "max_tokens": 6, "max_prompts": 4})
    run_train(cfg)
    m = metrics(cfg)
    assert [r["step"] for r in m if "train_accuracy" in r] == [2, 4]
    assert all(r["train_accuracy"] == 0.0 for r in m if "train_accuracy" in r)  # a random model answers nothing
    assert not any(r["masking_on"] for r in m) and all(r["kept_frac"] == 1.0 for r in m)

    online = clone_traces(traces_root, tmp_path, "scoring", train={"max_steps": 4},
                          selection={"protocol": "t3s_online", "refresh_interval": 2, "refresh_source": "scoring_pass"})
    run_train(online)
    stats = json.loads((online.run_dir / "train" / "store_stats.json").read_text())
    assert [h["step"] for h in stats["refreshes"]] == [2]
    # Each example: two training visits (two epochs) plus the scoring pass at the refresh.
    snapshot = np.load(online.run_dir / "train" / "store.npz")
    assert snapshot["shards/0/num_visits"].tolist() == [3] * 8
    assert [r["mask_version"] for r in metrics(online)] == [0, 0, 1, 1]


@pytest.mark.slow
def test_bottleneck_switch_rewinds_to_theta0(ray_local, tmp_path):
    """switch: bottleneck with rewind, on data a tiny model can learn: every trace answers "The answer
    is 7.", so train accuracy rises once the response is memorised (measured: 1.0 after the first
    step, 0 for the next nine, 0.5 at step 11: a real dip and rise). At the first step where the
    rule says the bottleneck has passed, masking switches on and the weights restart from θ0: the
    checkpoint of that step holds exactly θ0, the one before it does not."""
    from t3s_ray.models import resolve

    rows = [{"id": f"p{i}", "prompt": f"Q{i}: what is {i} + {7 - i}?", "answer": "7",
             "solution": "The answer is 7."} for i in range(8)]
    data = tmp_path / "sevens.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(write_config(
        tmp_path, "rewind", data={"source": str(data), "max_seq_len": 128},
        train={"num_workers": 1, "micro_batch_size": 4, "max_steps": 24, "lr": 1e-2, "checkpoint_every": 1},
        selection={"protocol": "t3s_online", "refresh_interval": 1, "switch": "bottleneck", "rewind": True},
        probe={"eval_every": 1, "samples": 1, "temperature": 0.0, "max_tokens": 8, "max_prompts": 4,
               "patience": 1}))
    assert run_traces(cfg)["accepted_traces"] == 8
    run_train(cfg)
    m = metrics(cfg)
    switched = [r["step"] for r in m if r.get("switched")]
    assert len(switched) == 1, [(r["step"], r.get("train_accuracy")) for r in m]
    s = switched[0]
    accs = [r["train_accuracy"] for r in m if "train_accuracy" in r]
    assert len(accs) == s  # measured every step until the switch, not after
    assert bottleneck_passed(accs, patience=1) and not bottleneck_passed(accs[:-1], patience=1)
    assert accs[-1] > min(accs)
    assert all(r["masking_on"] == (r["step"] > s) for r in m)
    theta0 = load_file(str(Path(resolve("builtin:tiny-llama")) / "model.safetensors"))

    def weights_at(step):
        for c in (cfg.run_dir / "train" / "ray_train").glob("checkpoint_*"):
            # Ray Train also writes checkpoint_manager_snapshot.json beside the checkpoint folders.
            if c.is_dir() and json.loads((c / "trainer_state.json").read_text())["step"] == step:
                return checkpoint_weights(c)
        raise AssertionError(f"no checkpoint of step {step}")

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)

    assert same(weights_at(s), theta0)  # rewound at the switch
    assert not same(weights_at(s - 1), theta0)  # trained before it
    assert not same(final_weights(cfg), theta0)  # and trained again (with masking) after it


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["inverse", "random"])
def test_inverse_and_random_diagnostics_use_the_static_anchors(static_run, traces_root, tmp_path, protocol):
    static, _ = static_run
    cfg = clone_traces(traces_root, tmp_path, protocol, selection={"protocol": protocol, "max_anchor_frac": 0.5})
    # Same probe (a finished probe is reused, as a resumed run would): only the kept tokens differ.
    import shutil

    shutil.copytree(static.run_dir / "probe", cfg.run_dir / "probe")
    run_train(cfg)
    m, m_static = metrics(cfg), metrics(static)
    assert [r["anchor_frac"] for r in m] == [r["anchor_frac"] for r in m_static]
    if protocol == "inverse":  # train on the anchors only
        assert all(abs(r["kept_frac"] - r["anchor_frac"]) < 1e-9 for r in m)
    else:  # drop as many random tokens as there are anchors
        assert all(abs(r["kept_frac"] - (1 - r["anchor_frac"])) < 1e-9 for r in m)
    a, b = final_weights(static), final_weights(cfg)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fsdp_static_probe(traces_root, tmp_path_factory):
    """The static probe under FSDP with 2 gloo ranks (shared by the FSDP static-protocol tests)."""
    root = tmp_path_factory.mktemp("fsdp-static")
    cfg = clone_traces(traces_root, root, "fsdp-static", train={"strategy": "fsdp", "max_steps": 2},
                       selection={"protocol": "t3s_static", "max_anchor_frac": 0.5})
    return cfg, run_train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["t3s_static", "inverse", "random", "dllm"])
def test_static_protocols_reload_theta0_under_fsdp_on_two_ranks(fsdp_static_probe, traces_root, tmp_path, protocol):
    """θb is scored, then θ0 is loaded into the same sharded module (a dLLM's selector module likewise):
    FSDP2 leaves its root unsharded after that scoring pass, and a load that only rank 0 resharded
    failed on rank 1 ("got mixed torch.Tensor and DTensor") while rank 0 hung."""
    static, summary = fsdp_static_probe
    if protocol == "t3s_static":
        cfg = static
    else:
        sections = {"selection": {"protocol": protocol, "max_anchor_frac": 0.5}}
        if protocol == "dllm":
            sections = {"selection": {"protocol": "t3s_static", "tau": 0.0},
                        "student": {"ref": "builtin:tiny-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"}}
            sections["probe"] = {"steps": 2, "eval_every": 2}  # its own probe: the selector's
        cfg = clone_traces(traces_root, tmp_path, protocol, train={"strategy": "fsdp", "max_steps": 2}, **sections)
        if protocol != "dllm":
            import shutil

            shutil.copytree(static.run_dir / "probe", cfg.run_dir / "probe")  # the same probe, reused
        summary = run_train(cfg)
    assert summary["step"] == 2 and (cfg.run_dir / "train" / "model" / "config.json").exists()
    m = metrics(cfg)
    assert [r["step"] for r in m] == [1, 2]
    assert all(r["masking_on"] and r["mask_version"] == 1 for r in m)
    assert all(math.isfinite(r["loss"]) for r in m)
    if protocol != "dllm":
        assert all(0 < r["anchor_frac"] <= 0.5 for r in m)
    ckpt = max(p for p in (cfg.run_dir / "train" / "ray_train").glob("checkpoint_*") if p.is_dir())
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}



def test_ray_checkpoints_are_written_straight_into_the_runs_storage(tmp_path, monkeypatch):
    """No rank stages its shard in local /tmp (98 GB a node for Qwen3-8B): each writes into the
    checkpoint's folder under Ray Train's storage, which is then reported without an upload."""
    import tempfile
    from types import SimpleNamespace

    import ray.train

    from t3s_ray.train import RaySession

    storage = tmp_path / "storage" / "ray_train"
    ctx = SimpleNamespace(get_storage=lambda: SimpleNamespace(experiment_fs_path=str(storage)),
                          get_world_rank=lambda: 0)
    reports = []
    monkeypatch.setattr(ray.train, "get_context", lambda: ctx)
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append((metrics, kw)))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: pytest.fail("a checkpoint was staged in a temp folder"))
    (storage / "checkpoint_step-000004").mkdir(parents=True)
    (storage / "checkpoint_step-000004" / "stale").write_text("from an interrupted attempt")
    written = []

    def write(folder: Path) -> None:
        written.append(folder)
        (folder / "shard").write_bytes(b"x")

    RaySession().save_checkpoint(4, {"loss": 1.0}, write)
    assert written == [storage / "checkpoint_step-000004"]
    assert sorted(p.name for p in written[0].iterdir()) == ["shard"]
    (metrics, kw), = reports
    assert metrics == {"loss": 1.0} and kw["checkpoint"].path == str(written[0])
    assert kw["checkpoint_dir_name"] == "checkpoint_step-000004"
    assert kw["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.NO_UPLOAD


def test_the_training_pairs_and_the_probe_render_with_the_configured_template_and_kwargs(tmp_path):
    """``traces.chat_template`` / ``chat_template_kwargs`` reach the training pairs
    (``training_inputs``) as they reach the teacher's prompts: with Qwen3's ``enable_thinking: false``
    the empty think block is prompt, not target."""
    from t3s_ray.train import training_inputs

    switch = ("{%- set off = enable_thinking is defined and not enable_thinking -%}"
              "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
              "{%- if m['role'] == 'assistant' and off -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
              "{{- m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
              "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
              "{%- if off -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}")
    from conftest import tiny_run_data

    cfg = config.from_dict(tiny_run_data(tmp_path, "tpl", traces={"chat_template": switch,
                                                                   "chat_template_kwargs": {"enable_thinking": False}}))
    run_traces(cfg)
    examples, _, _, _ = training_inputs(cfg)
    from t3s_ray.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    context = tok.decode([t for t, m in zip(examples[0]["input_ids"], examples[0]["target_mask"]) if not m])
    assert context.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
