"""Connecting to a Ray cluster, or starting an embedded local one, with the workers' runtime_env.

Which Ray a command runs on (``ray_session``), in order:

* ``ray.address`` in the config, else ``RAY_ADDRESS`` (set by ``ray job submit`` and by ``ray start``
  users): that cluster. ``ray.address: local`` always starts a private instance.
* Without either, a cluster started with ``ray start`` on this machine (Ray records it in
  ``$RAY_TMPDIR/ray/ray_current_cluster``, default ``/tmp/ray``) whose GCS answers: the command joins
  it, as a bare ``ray.init()`` would, and says so in one line. Its CPUs and GPUs are that cluster's
  (``ray.num_cpus`` / ``ray.num_gpus`` size only a private instance: Ray refuses them when joining),
  and two commands joining it share its resources instead of each counting all the machine's cores.
* Else a private local instance sized by ``ray.num_cpus`` / ``ray.num_gpus``.

Several Ray instances on one machine (two t3s commands at once, each with its private instance, or
one beside a ``ray start`` cluster) confuse the code inside Ray that finds "the" local cluster by
itself: the State API that Ray Train's placement-group cleaner polls for its controller found several
GCS processes and failed ("Found multiple active Ray instances"), or, with a ``ray start`` cluster up,
would ask that cluster about the controller of another one, find it missing and remove the live
training's placement group. So every worker is told its own cluster: ``RAY_ADDRESS`` (the GCS) when
joining, ``RAY_API_SERVER_ADDRESS`` (its dashboard, on a port chosen here before it starts) for a
private instance; the driver gets the same for the length of the session.

Every worker also gets the thread counts, the builtin-model cache path and the Hugging Face offline
flag of the driver through ``runtime_env.env_vars``, so a builtin model materialised by the driver is
found by workers.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
    """The address the config or ``RAY_ADDRESS`` names (``local``: a private instance), else None."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def running_local_cluster() -> str | None:
    """The GCS address of a cluster started with ``ray start`` on this machine, when its GCS accepts a
    connection (a record left by a cluster that died without ``ray stop`` does not count): Ray's own
    record of it, the one a bare ``ray.init()`` joins."""
    import socket

    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environment(updates: dict[str, str | None]) -> Iterator[None]:
    """Set (or, with None, remove) environment variables in this process for the block; the values of
    before restored after (the driver's own Ray settings; the rehearsal's offline switches)."""
    before = {k: os.environ.get(k) for k in updates}
    _set_environment(updates)
    try:
        yield
    finally:
        _set_environment(before)


def _set_environment(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _without_multiple_instances_warning() -> Iterator[None]:
    """Ray's own join (``ray.init()`` without an address) warns when other instances run beside the
    ``ray start`` cluster it joins ("Found multiple active Ray instances ... Connecting to latest
    cluster"): the line of :func:`ray_session` already names the cluster joined."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Found multiple active Ray instances" not in record.getMessage()

    logger, drop = logging.getLogger("ray._private.services"), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[dict[str, Any]]:
    """Use the Ray instance already initialised, or connect to / join / start one (the rule of the
    module docstring) for the duration of the block.

    Yields a dict with ``address`` (None for a private instance), ``started`` (whether this call
    connected or started it) and ``joined`` (the ``ray start`` cluster it joined, else None).
    """
    import ray

    from .errors import quiet_user_error_tracebacks

    quiet_user_error_tracebacks()
    if ray.is_initialized():
        yield {"address": resolve_address(cfg), "started": False, "joined": None}
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = resolve_address(cfg)
    joined = running_local_cluster() if address is None else None
    env = worker_env(cfg)
    own: dict[str, str] = {}  # what tells a worker (and the driver) which cluster is its own
    if joined:
        own["RAY_ADDRESS"] = joined
        sized = [k for k in ("num_cpus", "num_gpus") if getattr(cfg, k) is not None]
        ignored = f" ({' and '.join('ray.' + k for k in sized)} ignored)" if sized else ""
        print(f"[ray] joining the Ray cluster started with `ray start` on this machine ({joined}), with its CPUs "
              f"and GPUs{ignored}; set ray.address: local for a private instance", file=sys.stderr, flush=True)
        kwargs: dict[str, Any] = {}  # ray.init()'s own join, which also picks up the cluster's auth token
    elif address and address != "local":
        kwargs = {"address": address}
    else:
        # The dashboard serves the State API that Ray Train uses to watch its controller; on a port
        # known before it starts, so that every worker can be pointed at it.
        port = _free_port()
        own["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs = {"address": "local", "num_cpus": cfg.num_cpus or os.cpu_count(), "num_gpus": cfg.num_gpus,
                  "dashboard_host": "127.0.0.1", "dashboard_port": port}
    env.update({k: v for k, v in own.items() if k not in cfg.env_vars})
    with _without_multiple_instances_warning():
        ray.init(namespace=cfg.namespace, runtime_env={"env_vars": env}, log_to_driver=True, **kwargs)
    # (After the init: a RAY_ADDRESS seen by ray.init() would make its join an explicit address.)
    try:
        with environment(own):
            yield {"address": address if address != "local" else None, "started": True, "joined": joined}
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

