"""The training worker without Ray: one rank, no process group, its store in process (what
``bench/gpu_check.py`` runs on a bare GPU machine). Fast: the builtin tiny model, a few steps."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from t3s_ray import config
from t3s_ray.distributed import Ranks
from t3s_ray.models import load_tokenizer, resolve
from t3s_ray.runfolder import changed_keys
from t3s_ray.train import tokenize_traces
from t3s_ray.worker import SelectionPlan, TrainJob, run_settings, train_standalone


def tiny_examples(n: int = 8, ragged: bool = False):
    """``n`` short traces; ``ragged``: their lengths differ widely (a longer working for some)."""
    tok = load_tokenizer("builtin:tiny-llama")
    rows = [{"id": str(i), "sample_index": 0, "prompt": f"What is {i} + {i + 3}?",
             "response": f"{i} + {i + 3} = {2 * i + 3}. " + ("Let me check that again. " * (i % 4) * ragged)
             + f"The answer is {2 * i + 3}."} for i in range(n)]
    return tokenize_traces(rows, tok, system_prompt=None, chat_template=True, max_seq_len=256)[0]


def make_job(out: Path, model_ref: str = "builtin:tiny-llama", stop_at: int | None = None, **sections) -> TrainJob:
    data = {"name": "w", "output_dir": str(out), "student": {"ref": model_ref, "dtype": "float32"},
            "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 4, "lr": 1e-2, "checkpoint_every": 2,
                      "keep_last": 0},
            "selection": {"protocol": "sft"}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    cfg = config.from_dict(data)
    return TrainJob(cfg=cfg.to_dict(), out_dir=str(out / "train"), model_ref=model_ref, model_kind="ar",
                    scoring_ref=model_ref, plan=SelectionPlan.for_protocol(cfg), anchor_model=None,
                    max_steps=cfg.train.max_steps, store_name="unused", stop_at=stop_at)


def exported(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "train" / "model" / "model.safetensors"))


def moved_past_bf16(weights: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor]) -> float:
    """Fraction of the weights whose bf16 rounding differs from that of θ0."""
    changed = sum(int((weights[k].bfloat16() != theta0[k].bfloat16()).sum()) for k in theta0)
    return changed / sum(v.numel() for v in theta0.values())


def test_bf16_compute_over_fp32_master_weights_moves_the_weights_like_fp32(tmp_path):
    """At the paper's lr 1e-5 an update is smaller than half a bf16 ulp of most weights: with bf16
    compute over fp32 master weights a short training moves about as many weights past bf16
    rounding of θ0 as fp32 training does, while training bf16 weights directly (the control, a
    plain loop) loses most updates."""
    examples = tiny_examples()
    theta0 = load_file(str(Path(resolve("builtin:tiny-llama")) / "model.safetensors"))
    settings = {"train": {"max_steps": 40, "lr": 1e-5, "checkpoint_every": 40}}
    fractions = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        job = make_job(out, **{"train": {**settings["train"], "dtype": dtype}})
        trainer = train_standalone(job, examples, Ranks())
        fractions[dtype] = moved_past_bf16(exported(out), theta0)
        assert all(p.dtype == torch.float32 for p in trainer.module.parameters())  # the master weights
        assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())

    from t3s_ray.batching import collate, global_batch
    from t3s_ray.models import load_model
    from t3s_ray.t3s import masked_token_loss, token_confidence

    pure = load_model("builtin:tiny-llama", dtype="bfloat16")
    optimizer = torch.optim.AdamW(pure.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(40):
        ids, attention, target = collate(examples, global_batch(step, len(examples), 4, 0), 0, torch.device("cpu"))
        masked_token_loss(token_confidence(pure, ids, attention, target), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    pure_fraction = moved_past_bf16(pure.state_dict(), theta0)
    assert fractions["float32"] > 0.5, fractions
    assert abs(fractions["bfloat16"] - fractions["float32"]) < 0.1, fractions
    assert pure_fraction < fractions["float32"] / 2, (pure_fraction, fractions)


def test_exported_model_is_written_in_the_students_dtype(tmp_path):
    job = make_job(tmp_path, stop_at=1, student={"dtype": "bfloat16"}, train={"max_steps": 2})
    train_standalone(job, tiny_examples(), Ranks())
    weights = exported(tmp_path)
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "train" / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_resume_matches_an_uninterrupted_run_and_refuses_other_settings(tmp_path):
    examples = tiny_examples()
    train_standalone(make_job(tmp_path / "full"), examples, Ranks())
    part = tmp_path / "part"
    train_standalone(make_job(part, stop_at=2), examples, Ranks())
    assert sorted(p.name for p in (part / "train" / "checkpoints").iterdir()) == ["step-000002"]
    train_standalone(make_job(part), examples, Ranks())  # resumes from step 2
    a, b = exported(tmp_path / "full"), exported(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (part / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"other settings \(train\.lr\)"):
        train_standalone(make_job(part, train={"lr": 1e-3, "max_steps": 6}), examples, Ranks())
    # The operational keys may change on resume, and a constant schedule may be extended.
    cfg = config.from_dict(make_job(part).cfg)
    other = config.from_dict({**make_job(part).cfg, "train": {**make_job(part).cfg["train"], "keep_last": 5,
                                                                "max_steps": 9}})
    assert changed_keys(run_settings(cfg), run_settings(other)) == []


def fake_hub_repo(repo_id: str, source: Path, drop: str | None = None) -> Path:
    """Lay ``source`` out in the Hugging Face cache as the hub repo ``repo_id`` (so that, offline,
    ``from_pretrained(repo_id)`` finds it), optionally without the tensor ``drop``."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 39 + ("1" if drop else "0")
    snapshot = repo / "snapshots" / commit
    shutil.rmtree(repo, ignore_errors=True)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy(f, snapshot / f.name)
    if drop:
        weights = load_file(str(snapshot / "model.safetensors"))
        weights.pop(drop)
        save_file(weights, str(snapshot / "model.safetensors"), metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_rewind_and_rrt_load_a_hub_id_student_strictly(tmp_path):
    """``rewind`` used to glob ``*.safetensors`` in the hub id itself (nothing) and load that with
    strict=False; now θ0 is read through the hub cache and every key must be there."""
    from t3s_ray.models import local_folder
    from t3s_ray.t3s import rrt_merge

    source = Path(resolve("builtin:tiny-llama"))
    fake_hub_repo("t3s-test/tiny-llama", source)
    theta0 = load_file(str(source / "model.safetensors"))
    job = make_job(tmp_path / "hub", model_ref="t3s-test/tiny-llama", train={"max_steps": 2, "checkpoint_every": 2})
    trainer = train_standalone(job, tiny_examples(), Ranks())
    state = {k.removeprefix("model."): v for k, v in trainer.module.state_dict().items()}
    assert any(not torch.equal(state[k], theta0[k]) for k in theta0), "training was meant to move the weights"
    old = trainer.optimizer
    trainer.rewind()
    state = {k.removeprefix("model."): v for k, v in trainer.module.state_dict().items()}
    assert all(torch.equal(state[k], theta0[k]) for k in theta0)
    assert trainer.optimizer is not old and not trainer.optimizer.state
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in trainer.module.parameters()}

    # RRT merges θ0 + (θf − θb) with θ0 read from the hub cache.
    snapshot = Path(local_folder("t3s-test/tiny-llama"))
    assert (snapshot / "model.safetensors").is_file()
    thetaf = tmp_path / "hub" / "train" / "model"
    merged = rrt_merge(snapshot, thetaf, source, tmp_path / "rrt")
    got, f = load_file(str(merged / "model.safetensors")), load_file(str(thetaf / "model.safetensors"))
    for k in theta0:
        torch.testing.assert_close(got[k], f[k])  # θb = θ0 here, so the merge is θf

    # A hub repo that lacks a tensor is refused by name, not loaded half-way.
    fake_hub_repo("t3s-test/tiny-llama", source, drop="model.norm.weight")
    with pytest.raises(ValueError, match=r"the weights of t3s-test/tiny-llama lack \['model\.norm\.weight'\]"):
        trainer.rewind()


@pytest.mark.parametrize("protocol", ["sft", "random"])
def test_the_update_does_not_depend_on_how_the_batch_is_split(tmp_path, protocol):
    """One micro-batch of 4, four of 1, a token budget (long rows alone, short ones together) and
    padding-free micro-batches give the same weights: the loss is normalised over the step's kept
    tokens, and the random protocol's kept tokens are drawn per example. (Ray Train's 2 workers x
    micro-batch 1 against this recipe: tests/test_train.py.)"""
    examples = tiny_examples(8, ragged=True)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    splits = {
        "mb4": {"micro_batch_size": 4},
        "mb1": {"micro_batch_size": 1},
        "budget": {"micro_batch_size": 1, "max_tokens_per_micro_batch": 2 * lengths[-1]},
        "packed": {"micro_batch_size": 1, "max_tokens_per_micro_batch": 3 * lengths[-1], "padding_free": True},
    }
    weights, metrics = {}, {}
    for name, train in splits.items():
        job = make_job(tmp_path / name, train={**train, "max_steps": 3, "checkpoint_every": 3},
                       selection={"protocol": protocol, "rule": "top_frac", "top_frac": 0.5})
        if protocol == "random":  # θb = θ0: Δc = 0, half of each trace's tokens are anchors by rank
            job = dataclasses.replace(job, anchor_model="builtin:tiny-llama")
        train_standalone(job, examples, Ranks())
        weights[name] = exported(tmp_path / name)
        metrics[name] = [json.loads(x) for x in (tmp_path / name / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["micro_batches"] for m in metrics["mb4"]] == [1, 1, 1]
    assert [m["micro_batches"] for m in metrics["mb1"]] == [4, 4, 4]
    assert 1 < metrics["budget"][0]["micro_batches"] < 4
    assert metrics["packed"][0]["padding_frac"] == 0 < metrics["mb4"][0]["padding_frac"]
    for name in ("mb1", "budget", "packed"):
        assert [m["loss"] for m in metrics[name]] == pytest.approx([m["loss"] for m in metrics["mb4"]], rel=1e-5)
        assert [m["kept_frac"] for m in metrics[name]] == [m["kept_frac"] for m in metrics["mb4"]]
        # AdamW at lr 1e-2 turns float summation-order noise into ~1e-5, up to 5.9e-5 on some CPUs (a
        # split-dependent normalisation would move weights by ~lr = 1e-2)
        for k in weights["mb4"]:
            torch.testing.assert_close(weights[name][k], weights["mb4"][k], rtol=1e-4, atol=2e-4)
    if protocol == "random":
        assert all(m["kept_frac"] < 1 for m in metrics["mb4"])


@pytest.mark.parametrize("every_micro_batch", [False, True])
def test_fsdp_reduces_gradients_once_per_step_unless_asked_every_micro_batch(every_micro_batch):
    """The decision ``_gradient_sync`` makes for FSDP2 (that accumulating without a reduce-scatter
    gives DDP's update is tests/test_train.py::test_fsdp_matches_ddp_on_cpu, 2 micro-batches a rank)."""
    from t3s_ray.worker import StudentTrainer

    calls = []

    class FakeFSDPModule:
        def set_requires_gradient_sync(self, sync):
            calls.append(sync)

    trainer = StudentTrainer.__new__(StudentTrainer)
    trainer.sharded, trainer.module = True, FakeFSDPModule()
    trainer.cfg = config.from_dict({"train": {"strategy": "fsdp", "fsdp_reduce_every_micro_batch": every_micro_batch}})
    for k in range(3):
        with trainer._gradient_sync(last_micro_batch=k == 2):
            pass
    assert calls == ([True, True, True] if every_micro_batch else [False, False, True])


def test_the_dllm_selectors_sharded_scorer_is_freed_before_training(tmp_path, monkeypatch):
    """FSDP2 modules sit in reference cycles, so ``del scorer`` alone left the selector's weights on
    the device for the whole training. One rank in a gloo group (FSDP on), the automatic collector
    off so that only the worker's own collection can free it."""
    import gc
    import os
    import weakref

    import torch.distributed as dist
    from test_distributed import _free_port

    from t3s_ray import distributed
    from t3s_ray.store import local_store
    from t3s_ray.worker import LocalSession, StudentTrainer

    built = []
    build = StudentTrainer._build_module

    def recording(self, ref):
        module = build(self, ref)
        built.append((ref, weakref.ref(module)))
        return module

    monkeypatch.setattr(StudentTrainer, "_build_module", recording)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ranks = distributed.init_process_group(torch.device("cpu"), timeout_s=60)
    gc.disable()
    try:
        job = make_job(tmp_path, model_ref="builtin:tiny-dllm", train={"strategy": "fsdp", "max_steps": 1},
                       selection={"protocol": "t3s_static", "tau": 0.0},
                       student={"kind": "dllm", "selector_ref": "builtin:tiny-llama"})
        job = dataclasses.replace(job, model_kind="dllm", scoring_ref="builtin:tiny-llama",
                                  anchor_model="builtin:tiny-llama")
        session = LocalSession(tmp_path / "checkpoints", ranks)
        trainer = StudentTrainer(job, tiny_examples(), ranks, local_store(1), session)
        trainer.setup()
        assert trainer.sharded and [ref for ref, _ in built] == ["builtin:tiny-dllm", "builtin:tiny-llama"]
        assert built[0][1]() is trainer.module
        assert built[1][1]() is None, "the selector's sharded scorer outlived the scoring passes"
    finally:
        gc.enable()
        dist.destroy_process_group()
        os.environ.pop("MASTER_PORT", None)


def test_a_llada2_student_trains_by_the_block_diffusion_loss(tmp_path, monkeypatch):
    """One step of builtin:tiny-llada2 in process: its loss is exactly the no-shift block-diffusion CE
    (recomputed here from θ0 with full logits, on the layout ``diffusion_batch`` gives for the same
    seed), the forced tokens are the anchors of the response, masked in the noisy half; LLaDA's
    objective (``dllm_loss``) never runs; the export keeps the generation config (``complete_export``)."""
    import numpy as np

    import t3s_ray.t3s as core
    import t3s_ray.t3s.diffusion as diffusion
    from t3s_ray.batching import build_micro_batch, global_batch, rank_share
    from t3s_ray.config import DiffusionTraining
    from t3s_ray.models import load_model
    from t3s_ray.training import steps
    from t3s_ray.training.steps import stable_seed

    tok = load_tokenizer("builtin:tiny-llada2")
    rows = [{"id": str(i), "sample_index": 0, "prompt": f"What is {i} + {i + 3}?",
             "response": f"{i} + {i + 3} = {2 * i + 3}. " + "Check. " * i + f"The answer is {2 * i + 3}."}
            for i in range(4)]
    examples = tokenize_traces(rows, tok, system_prompt=None, chat_template=True, max_seq_len=256)[0]
    # Anchors (the store's forced tokens): every third response token of each example.
    anchors = {i: np.arange(int(np.sum(ex["target_mask"]))) % 3 == 0 for i, ex in enumerate(examples)}
    monkeypatch.setattr(steps.MaskPrefetcher, "get", lambda self, step: (
        1, [anchors[i] for i in rank_share(global_batch(step, len(examples), 4, 0), 0, 1)]))
    calls = []
    real_batch = diffusion.diffusion_batch
    monkeypatch.setattr(diffusion, "diffusion_batch", lambda *a, **k: calls.append((a, k)) or real_batch(*a, **k))

    def llada_loss(*a, **k):
        raise AssertionError("LLaDA's objective ran for a LLaDA2 student")

    monkeypatch.setattr(core, "dllm_loss", llada_loss)
    job = make_job(tmp_path, model_ref="builtin:tiny-llada2", train={"max_steps": 1, "lr": 1e-3},
                   student={"kind": "dllm", "selector_ref": "builtin:tiny-llama", "block_size": 8},
                   selection={"protocol": "t3s_static"})
    job = dataclasses.replace(job, model_kind="dllm", scoring_ref="builtin:tiny-llama")
    spec = job.spec()
    assert spec.diffusion == DiffusionTraining(layout="block", block_size=8, fill=True, mask_lo=0.3, mask_hi=0.8)
    train_standalone(spec, examples, Ranks())
    metrics = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["objective"] for m in metrics] == ["block_diffusion"]

    # The same micro-batch, noised again from the trainer's seed, by an independent computation.
    assert len(calls) == 1
    mine = rank_share(global_batch(0, len(examples), 4, 0), 0, 1)
    batch = build_micro_batch(examples, mine, tok.pad_token_id or 0, torch.device("cpu"))
    forced = batch.to_positions([anchors[i] for i in mine])
    args, kwargs = calls[0]
    assert torch.equal(args[0], batch.input_ids) and torch.equal(args[3], forced) and forced.any()
    assert {k: kwargs[k] for k in ("block_size", "layout", "fill", "mask_lo", "mask_hi")} == {
        "block_size": 8, "layout": "block", "fill": True, "mask_lo": 0.3, "mask_hi": 0.8}
    model = load_model("builtin:tiny-llada2", dtype="float32")
    config = model.config
    noisy = real_batch(batch.input_ids, batch.attention_mask, batch.target_mask, forced,
                       mask_id=tok.convert_tokens_to_ids("<|mask|>"), fill_id=config.pad_token_id, block_size=8,
                       generator=torch.Generator().manual_seed(stable_seed(0, "dllm", 0, *mine)))
    length = noisy.length
    assert (noisy.input_ids[:, :length][forced.nonzero(as_tuple=True)] == kwargs["mask_id"]).all()
    assert noisy.masked.sum() > forced.sum()
    with torch.no_grad():
        logits = model(input_ids=noisy.input_ids, attention_mask=noisy.attention_mask,
                       position_ids=noisy.position_ids).logits[:, :length].float()
    ce = torch.nn.functional.cross_entropy(logits[noisy.masked], noisy.targets[noisy.masked])  # no shift
    assert metrics[0]["loss"] == pytest.approx(float(ce), rel=1e-5)
    # LLaDA's loss on a shifted, unmasked-layout forward is another number altogether.
    shifted = torch.nn.functional.cross_entropy(logits[:, :-1][noisy.masked[:, 1:]], noisy.targets[:, 1:][noisy.masked[:, 1:]])
    assert abs(float(shifted) - float(ce)) > 1e-3
    assert (tmp_path / "train" / "model" / "generation_config.json").exists()
