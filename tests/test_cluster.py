import os

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
