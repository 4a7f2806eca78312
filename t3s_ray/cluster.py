"""Connecting to a Ray cluster, or starting an embedded local one, with the workers' runtime_env.

Address resolution: ``ray.address`` in the config, else ``RAY_ADDRESS`` (set by ``ray job submit``
and by ``ray start`` users), else an embedded local Ray sized to this machine. Every worker gets
the thread counts, the builtin-model cache path and the Hugging Face offline flag of the driver
through ``runtime_env.env_vars``, so a builtin model materialised by the driver is found by workers.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from .config import RayConfig
from .models import cache_dir

# Variables forwarded from the driver's environment to every worker when they are set.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN",
                  "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "PIP_CONSTRAINT")


def worker_env(cfg: RayConfig) -> dict[str, str]:
    """Environment variables every Ray worker of a run gets."""
    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    threads = str(cfg.omp_num_threads)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
                "T3S_CACHE": str(cache_dir()), "RAY_DEDUP_LOGS": os.environ.get("RAY_DEDUP_LOGS", "0")})
    env.update(cfg.env_vars)
    return env


def runtime_env(cfg: RayConfig) -> dict[str, Any]:
    return {"env_vars": worker_env(cfg)}


def resolve_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[dict[str, Any]]:
    """Use the Ray instance already initialised, or connect/start one for the duration of the block.

    Yields a dict with ``address`` (None when embedded) and ``started`` (whether this call started it).
    """
    import ray

    from .errors import quiet_user_error_tracebacks

    quiet_user_error_tracebacks()
    if ray.is_initialized():
        yield {"address": resolve_address(cfg), "started": False}
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = resolve_address(cfg)
    kwargs: dict[str, Any] = {"namespace": cfg.namespace, "runtime_env": runtime_env(cfg),
                              "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves the State API that Ray Train uses to watch its controller.
        ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), num_gpus=cfg.num_gpus, **kwargs)
    try:
        yield {"address": address, "started": True}
    finally:
        ray.shutdown()


def _fetch_on_this_node(refs: dict[str, str | None]) -> None:
    from .models import fetch_weights

    for ref, revision in refs.items():
        fetch_weights(ref, revision=revision)


def prefetch_on_other_nodes(refs: dict[str, str | None], nodes: list[str] | None = None) -> list[str]:
    """Download the hub-id models among ``refs`` (ref -> revision) on every alive node but the
    driver's (which :func:`models.fetch_weights` has served), one task per node, all at once, before
    the training workers start: the Hugging Face cache is usually per node, and a rank that
    downloads 16-65 GB inside its first collective keeps every other rank waiting on the collective
    timeout. Local folders and builtins are skipped (they are read where they are). Returns the
    node ids it fetched on; ``nodes`` overrides the alive-node list (tests)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .models import resolve

    hub = {ref: rev for ref, rev in refs.items() if ref and not os.path.isdir(resolve(ref))}
    if nodes is None:
        here = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not hub or not nodes:
        return []
    fetch = ray.remote(num_cpus=0)(_fetch_on_this_node)
    ray.get([fetch.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(hub)
             for node in nodes])
    return nodes

