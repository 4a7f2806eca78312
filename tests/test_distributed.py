"""The collectives and sharded model state of ``t3s_ray.distributed`` on a real 2-process gloo group
(the CPU equivalent of the NCCL path), and the device decision NCCL needs."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from t3s_ray import distributed


def test_collective_device_is_cuda_under_nccl_and_cpu_under_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device("nccl") == torch.device("cuda", 3)
    assert distributed.collective_device("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)
    assert distributed.collective_device("gloo") == torch.device("cpu")
    assert distributed.collective_device() == torch.device("cpu")  # no process group
    # Under a group the backend is read from it.
    monkeypatch.setattr(distributed, "initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert distributed.collective_device() == torch.device("cuda", 3)


def tied_tiny_model(folder: Path) -> Path:
    """A tiny Llama with tied input/output embeddings (as SmolLM2 has), saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank(rank: int, world: int, port: int, model_dir: str, out: str, errors, checks) -> None:
    """One spawned rank of a gloo group running ``checks(ranks, model_dir, out)``."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        ranks = distributed.init_process_group(torch.device("cpu"), timeout_s=120)
        assert (ranks.rank, ranks.world) == (rank, world)
        checks(ranks, Path(model_dir), Path(out))
    except BaseException:  # surfaced by the parent
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, checks, model_dir: Path, out: Path) -> None:
    """``checks`` on ``world`` spawned gloo ranks; every rank's failure, with its traceback, fails the test."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_one_rank, args=(world, _free_port(), str(model_dir), str(out), errors, checks), nprocs=world,
                       start_method="spawn")
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, "\n".join(problems)


def _checks(ranks, model_dir: Path, out: Path) -> None:
    from t3s_ray.models import empty_model, full_state
    from t3s_ray.worker import fsdp_units

    rank = ranks.rank
    total = distributed.all_reduce(torch.tensor([rank + 1.0]))
    assert total.item() == 3.0
    assert distributed.all_reduce_numbers({"a": rank, "b": 10 * rank}, "max") == {"a": 1.0, "b": 10.0}
    assert distributed.broadcast_object({"from": rank}) == {"from": 0}
    assert distributed.gather_objects({"from": rank}) == [{"from": 0}, {"from": 1}]

    reference = full_state(str(model_dir), dtype="float32")
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(input_ids=x).logits

    for sharded in (True, False):
        model = empty_model(str(model_dir))
        assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
        if sharded:
            distributed.shard_model(model, fsdp_units(model), bf16_compute=False)
        distributed.materialize(model, torch.device("cpu"))
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        # Only rank 0 holds the full copy; rank 1 gets its part by broadcast.
        distributed.load_full_state(model, dict(reference) if rank == 0 else None, "the test model")
        torch.testing.assert_close(model(input_ids=x).logits, expected)
        gathered = distributed.gather_full_state(model, torch.bfloat16)
        if rank == 0:
            assert gathered.keys() == reference.keys()
            assert all(gathered[k].dtype == torch.bfloat16 for k in reference)
            assert all(torch.equal(gathered[k], reference[k].bfloat16()) for k in reference)
        else:
            assert gathered is None
        if sharded:
            local = model.model.layers[0].mlp.up_proj.weight.to_local()
            assert local.shape[0] == 48  # half of the 96 rows on each rank
        # The static protocol's reload: score with one set of weights (a forward without gradients,
        # after which FSDP2 leaves its root group unsharded), then load another into the same module.
        # Every rank must reshard first, not only rank 0 (whose state_dict() call would do it).
        with torch.no_grad():
            model(input_ids=x)
        other = {k: v * 0.5 for k, v in reference.items()}
        distributed.load_full_state(model, dict(other) if rank == 0 else None, "the other weights")
        with torch.no_grad():
            model(input_ids=x)
        distributed.load_full_state(model, dict(reference) if rank == 0 else None, "the test model")
        torch.testing.assert_close(model(input_ids=x).logits, expected)

    # A full state that lacks a key is refused on every rank (not a hang, not a half-load).
    model = empty_model(str(model_dir))
    distributed.materialize(model, torch.device("cpu"))
    broken = {k: v for k, v in reference.items() if k != "model.norm.weight"} if rank == 0 else None
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        distributed.load_full_state(model, broken, "the test model")

    # A sharded checkpoint: each rank writes its shard into a shared folder, a fresh sharded model and
    # optimizer read it back, and one more step gives the same weights on both.
    def build():
        m = empty_model(str(model_dir))
        distributed.shard_model(m, fsdp_units(m), bf16_compute=False)
        distributed.materialize(m, torch.device("cpu"))
        distributed.load_full_state(m, dict(reference) if rank == 0 else None, "the test model")
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2)

    def step(m, opt):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    a, opt_a = build()
    step(a, opt_a)
    distributed.save_sharded(out / "dcp", a, opt_a)
    distributed.barrier()
    b, opt_b = build()
    distributed.load_sharded(out / "dcp", b, opt_b)
    step(a, opt_a)
    step(b, opt_b)
    full_a, full_b = distributed.gather_full_state(a), distributed.gather_full_state(b)
    if rank == 0:
        assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)
        torch.save(full_a, out / "after_two_steps.pt")


def test_shard_load_gather_and_sharded_checkpoint_on_two_gloo_ranks(tmp_path):
    model_dir = tied_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(2, _checks, model_dir, out)
    files = {p.name for p in (out / "dcp").iterdir()}
    assert files == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # The checkpoint reads back whole in one process (another world size): the model after one step.
    one_step = distributed.read_sharded_model(out / "dcp")
    two_steps = torch.load(out / "after_two_steps.pt", map_location="cpu", weights_only=True)
    assert one_step.keys() >= {"model.norm.weight", "lm_head.weight"}
    assert any(not torch.equal(one_step[k], two_steps[k]) for k in two_steps)


def _hybrid_checks(ranks, model_dir: Path, out: Path) -> None:
    from torch.distributed.tensor import Replicate, Shard

    from t3s_ray.models import empty_model, full_state
    from t3s_ray.worker import LogprobModule, fsdp_units

    reference = full_state(str(model_dir), dtype="float32")
    gen = torch.Generator().manual_seed(10 + ranks.rank)  # each rank its own rows, as in training
    x = torch.randint(0, 96, (2, 9), generator=gen)

    def trained(mesh) -> dict[str, torch.Tensor] | None:
        model = empty_model(str(model_dir))
        distributed.shard_model(model, fsdp_units(model), bf16_compute=False, mesh=mesh)
        distributed.materialize(model, torch.device("cpu"))
        distributed.load_full_state(model, dict(reference) if ranks.rank == 0 else None, "the test model")
        weight = model.model.layers[0].mlp.up_proj.weight
        if mesh is None:
            assert weight.placements == (Shard(0),) and weight.to_local().shape[0] == 24  # 96 rows / 4
        else:
            assert weight.placements == (Replicate(), Shard(0)) and weight.to_local().shape[0] == 48  # / 2
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        return distributed.gather_full_state(model)

    flat = trained(None)
    hybrid = trained(distributed.hybrid_mesh(2, torch.device("cpu")))
    if ranks.rank == 0:
        assert flat.keys() == hybrid.keys() == reference.keys()
        assert any(not torch.equal(flat[k], reference[k]) for k in flat)  # it trained
        for k in flat:
            torch.testing.assert_close(hybrid[k], flat[k], rtol=1e-5, atol=1e-6)

    # Under bf16 compute the root's floating inputs stay fp32: they are the loss weights.
    model = empty_model(str(model_dir))
    module = LogprobModule(model, chunk_size=4)
    distributed.shard_model(module, fsdp_units(model), bf16_compute=True)
    distributed.materialize(module, torch.device("cpu"))
    distributed.load_full_state(module, {f"model.{k}": v for k, v in reference.items()} if ranks.rank == 0 else None,
                                "the test model")
    seen = {}

    def record(_module, _args, kwargs):
        seen["dtype"] = kwargs["loss_weights"].dtype

    module.register_forward_pre_hook(record, with_kwargs=True)  # runs after FSDP's own pre-forward
    mask = torch.ones_like(x, dtype=torch.bool)
    weights = torch.full(x.shape, 1 / 3, dtype=torch.float32)
    loss, _ = module(x, torch.ones_like(x), mask, loss_weights=weights)
    assert seen["dtype"] == torch.float32
    assert torch.isfinite(loss)


def test_hybrid_sharding_on_a_2x2_mesh_equals_flat_fsdp_on_four_gloo_ranks(tmp_path):
    run_ranks(4, _hybrid_checks, tied_tiny_model(tmp_path / "model"), tmp_path)


def test_expandable_segments_are_set_on_a_cuda_worker_unless_the_user_chose(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert not distributed.use_expandable_segments(torch.device("cpu")) and calls == []
    assert distributed.use_expandable_segments(torch.device("cuda", 0)) and calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert not distributed.use_expandable_segments(torch.device("cuda", 0)) and len(calls) == 1
