"""One rank's view of the others: plain ``torch.distributed``, no Ray.

Every collective of the training code goes through this module, for two reasons that only show on
GPUs:

* **The device a collective needs.** NCCL (what Ray Train picks when workers have GPUs) takes only
  CUDA tensors and gloo only CPU ones, so a CPU counter all-reduced under NCCL fails at the first
  step. :func:`collective_device` answers "where must this tensor be" from the process group's
  backend, and :func:`all_reduce` moves a tensor there and back.
* **Memory at the paper's scale.** A full Qwen3-32B in fp32 is 131 GB: no worker may hold more than
  its shard. The model is built with its parameters on the meta device (:func:`models.empty_model`),
  sharded, materialised shard by shard on the device (:func:`materialize`), and filled from one full
  copy that only rank 0 reads (:func:`load_full_state`, a broadcast). The reverse, a consolidated
  Hugging Face export, is gathered one tensor at a time into rank 0's host memory
  (:func:`gather_full_state`). Checkpoints never consolidate: every rank writes its own shard with
  ``torch.distributed.checkpoint`` (:func:`save_sharded` / :func:`load_sharded`).

Nothing here imports Ray, so the same worker runs under Ray Train or a plain process group
(``bench/gpu_check.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Ranks",
    "all_reduce",
    "all_reduce_numbers",
    "barrier",
    "broadcast_object",
    "collective_device",
    "gather_full_state",
    "gather_objects",
    "hybrid_mesh",
    "init_process_group",
    "initialized",
    "load_full_state",
    "load_sharded",
    "materialize",
    "read_sharded_model",
    "sharded_model_keys",
    "reshard",
    "rng_state",
    "save_sharded",
    "set_rng_state",
    "shard_model",
    "use_expandable_segments",
]

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


@dataclass(frozen=True)
class Ranks:
    """Who this process is: its global rank, the world size, its rank on the node and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device(backend: str | None = None) -> torch.device:
    """The device whose tensors the process group's backend accepts: this process's CUDA device under
    NCCL (also a mixed ``cpu:gloo,cuda:nccl`` group), the CPU under gloo or without a group."""
    if backend is None:
        if not initialized():
            return torch.device("cpu")
        backend = str(dist.get_backend())
    if "nccl" in backend.lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a copy of ``tensor`` on the backend's device; returned on ``tensor``'s own device."""
    if not initialized():
        return tensor
    moved = tensor.to(collective_device(), copy=True)
    dist.all_reduce(moved, op=getattr(dist.ReduceOp, _OPS[op]))
    return moved.to(tensor.device)


def all_reduce_numbers(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max, min) a dict of numbers over ranks in one collective, in float64."""
    if not initialized():
        return {k: float(v) for k, v in values.items()}
    reduced = all_reduce(torch.tensor([float(v) for v in values.values()], dtype=torch.float64), op)
    return dict(zip(values, reduced.tolist()))


def barrier() -> None:
    if initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value: a problem message, a path)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (small picklable values: a sample's scores)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_process_group(device: torch.device, timeout_s: float = 1800) -> Ranks:
    """Join the process group described by the usual environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``, as torchrun sets them; world size 1 when they are absent):
    NCCL for a CUDA device, gloo otherwise. Ray Train does this itself for its workers."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(rank, world, local_rank, device)


# --------------------------------------------------------------------------------------------
# Building, sharding and filling a model without a full copy per worker
# --------------------------------------------------------------------------------------------


def shard_model(module: torch.nn.Module, units, *, bf16_compute: bool, mesh=None) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` over each of ``units`` (decoder layers, an untied input embedding), then
    the root, which holds the rest (the final norm and the lm head).

    Parameters stay fp32 (the master weights AdamW updates); ``bf16_compute`` all-gathers them as
    bf16 for the forward and backward, and gradients are reduce-scattered in fp32. The root does not
    cast its floating inputs: they are the fp32 loss weights, which bf16 would round by up to 0.2 %
    (each unit still casts its own inputs, the hidden states). ``mesh``: a 2-D
    ``(replicate, shard)`` device mesh for hybrid sharding (:func:`hybrid_mesh`); None shards flat
    over all ranks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = torch.bfloat16 if bf16_compute else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in units or []:
        fully_shard(unit, mp_policy=policy, mesh=mesh)
    fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                       cast_forward_inputs=False), mesh=mesh)
    return module


def hybrid_mesh(shard_size: int, device: torch.device):
    """The device mesh of hybrid sharding: parameters sharded inside groups of ``shard_size``
    consecutive ranks (one node's GPUs: Ray Train and torchrun number a node's workers
    consecutively), replicated across the groups. None (flat sharding over every rank) when
    ``shard_size`` is 0 or the world size.

    Why, with Qwen3-32B on 2 nodes x 8 GPUs: flat sharding over 16 ranks reduce-scatters the fp32
    gradients (32.8B x 4 B = 131 GB) in collectives that span both nodes, each rank sending ~15/16 of
    131 GB per reduction, much of it over the inter-node link; hybrid (shard 8) keeps the all-gathers
    and reduce-scatters on a node's NVLink and sends only an all-reduce of each GPU's 1/8 shard
    (~16 GB) to its peer on the other node. The price is memory: each GPU holds 1/8 of the 16 B/param
    state (525 / 8 = 66 GB) instead of 1/16 (33 GB), which fits 141 GB H200s, not 80 GB H100s.
    """
    if not initialized():
        return None
    world = dist.get_world_size()
    if shard_size in (0, world):
        return None
    if shard_size < 0 or world % shard_size:
        raise ValueError(f"train.fsdp_shard_size {shard_size} must divide the world size {world}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Allocate the meta parameters of ``module`` (sharded or not) on ``device``, uninitialised.

    Buffers were built for real (rotary frequencies are computed, not loaded: they are not in a
    checkpoint) and survive the move; tied parameters (an lm head sharing the input embedding)
    stay tied, which ``Module.to_empty`` alone does not guarantee.
    """
    buffers = {name: b.detach().clone() for name, b in module.named_buffers() if not b.is_meta}
    ties: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    module.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            module.get_buffer(name).copy_(value)
    for names in ties.values():
        first = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, first)


def load_full_state(module: torch.nn.Module, full_state: dict[str, torch.Tensor] | None, source: str) -> None:
    """Fill ``module`` (sharded or not) from one full state dict that only rank 0 holds (host memory).

    Under a process group, rank 0's tensors are broadcast one at a time and each rank keeps its
    shard: no rank but 0 ever holds a full copy. Every key of the module must be in the state and
    nothing else may be (``source`` names the weights in the error).
    """
    problem = None
    if full_state is not None:
        expected = set(module.state_dict())
        missing, extra = sorted(expected - set(full_state)), sorted(set(full_state) - expected)
        if missing or extra:
            problem = (f"the weights of {source} do not match the model: missing {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if not initialized():  # one process, plain tensors
        if problem:
            raise ValueError(problem)
        module.load_state_dict(full_state, strict=True)
        return
    problem = broadcast_object(problem)
    if problem:
        raise ValueError(problem)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # After a forward without gradients (a scoring pass) FSDP2 leaves its root group unsharded: plain
    # tensors, not DTensors. Rank 0's state_dict() call above reshards it there, but not on the other
    # ranks, whose copy then fails ("got mixed torch.Tensor and DTensor") while rank 0 hangs.
    reshard(module)

    # The call consumes the dict it is given (it puts the local shards into it): hand it a copy.
    set_model_state_dict(module, dict(full_state or {}), options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=True))


def reshard(module: torch.nn.Module) -> None:
    """Free the unsharded parameters of every FSDP2 group of ``module`` (a no-op without FSDP): after
    a scoring pass, before weights are loaded into it, and to give back the memory of the root group
    (lm head and final norm: 2.5 GB in bf16 at Qwen3-8B's vocabulary) that a forward without a
    backward leaves gathered."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gather_full_state(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The whole state dict on rank 0's host, each floating tensor cast to ``dtype``; None elsewhere.

    A collective when the module is sharded (every rank must call it). Tensors are gathered one at
    a time, so the device never holds more than one full tensor beyond its shards, and rank 0's
    host ends with one copy in ``dtype`` (16 GB for Qwen3-8B in bf16, not 33 GB in fp32).
    """
    from torch.distributed.tensor import DTensor

    is_main = not initialized() or dist.get_rank() == 0
    aliases: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    state = module.state_dict()
    params = dict(module.named_parameters(remove_duplicate=False))
    for name, value in state.items():
        key = id(params[name]) if name in params else None
        if key is not None and key in aliases:  # a tied parameter: gathered once
            if is_main:
                out[name] = out[aliases[key]]
            continue
        if key is not None:
            aliases[key] = name
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if is_main:
            cast = dtype if dtype is not None and full.is_floating_point() else full.dtype
            out[name] = full.detach().to("cpu", cast, copy=True)
        del full
    return out if is_main else None


def use_expandable_segments(device: torch.device) -> bool:
    """Let the CUDA caching allocator grow segments in place (``expandable_segments:True``) on a
    training worker's GPU, unless ``PYTORCH_CUDA_ALLOC_CONF`` already says otherwise. Long-tailed
    trace lengths make every micro-batch a different size; without it the allocator keeps blocks cut
    for earlier shapes and a 16k-token step can fail with several GB reserved but unusable. Set at
    run time: Ray Train has initialised CUDA (the NCCL group) before the training function runs, so
    an environment variable set then would not be read. True when it was set."""
    if device.type != "cuda" or "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return False
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random state: the CPU generator's, and the CUDA device's when training on one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# Sharded checkpoints
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_process_quiet():
    """Without a process group DCP warns on every call that it assumes one process: that is meant."""
    with warnings.catch_warnings():
        if not initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the model and the optimizer (``torch.distributed.checkpoint``:
    ``__<rank>_0.distcp`` files, ``.metadata`` from rank 0). Replicated (DDP) tensors are written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder), no_dist=not initialized())


def load_sharded(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read this rank's shards of a :func:`save_sharded` checkpoint back into ``module`` and ``optimizer``
    (any world size: the reader reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (Path(folder) / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint (no .metadata)")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not initialized())
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def sharded_model_keys(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model's tensors in a :func:`save_sharded` checkpoint, read from its metadata alone: name
    (as the saved module's ``state_dict`` has it) -> (full shape, saved dtype)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    return {key[len("model."):]: (tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


def read_sharded_model(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model state of a :func:`save_sharded` checkpoint, in one process without a group
    (inspection, tests, ``t3s models export``). Only the model's tensors are read, not the optimizer's
    (AdamW's two moments are twice the model), straight into their full tensors, each floating one in
    ``dtype`` (default: as saved, the fp32 master weights): host memory is one copy of the model."""
    import torch.distributed.checkpoint as dcp

    state = {name: torch.empty(shape, dtype=dtype if dtype is not None and saved.is_floating_point else saved)
             for name, (shape, saved) in sharded_model_keys(folder).items()}
    with _single_process_quiet():
        dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return state
