import os
from pathlib import Path

import ray

from t3s_ray.cluster import resolve_address, worker_env
from t3s_ray.config import RayConfig


def test_workers_get_runtime_env(ray_local):
    @ray.remote
    def read_env():
        return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "T3S_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}

    env = ray.get(read_env.remote())
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["T3S_CACHE"] == os.environ["T3S_CACHE"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"


def test_worker_env_merges_config_vars():
    env = worker_env(RayConfig(omp_num_threads=3, env_vars={"FOO": "bar"}))
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3" and env["FOO"] == "bar"


def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(RayConfig()) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(RayConfig()) == "10.0.0.1:6379"
    assert resolve_address(RayConfig(address="auto")) == "auto"


def test_hub_models_are_fetched_on_the_other_nodes_before_training(ray_local, tmp_path):
    """One task per node (here the only node, named explicitly): a hub id found in that node's cache
    passes; one that is missing fails as the project's one-line error; local folders are not sent."""
    import pytest
    from test_worker import fake_hub_repo

    from t3s_ray.cluster import prefetch_on_other_nodes
    from t3s_ray.errors import user_error
    from t3s_ray.models import resolve

    node = ray.get_runtime_context().get_node_id()
    assert prefetch_on_other_nodes({resolve("builtin:tiny-llama"): None}, nodes=[node]) == []  # local: skipped
    assert prefetch_on_other_nodes({"t3s-test/prefetch": None}) == []  # the driver's own node: not again
    fake_hub_repo("t3s-test/prefetch", Path(resolve("builtin:tiny-llama")))
    assert prefetch_on_other_nodes({"t3s-test/prefetch": None}, nodes=[node]) == [node]
    with pytest.raises(Exception) as failure:
        prefetch_on_other_nodes({"t3s-test/not-in-the-cache": None}, nodes=[node])
    assert "could not get the files of model 't3s-test/not-in-the-cache'" in user_error(failure.value)
