"""Shared test fixtures: one local Ray instance per test session, an offline model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline and quiet before anything imports transformers or Ray.
os.environ.setdefault("T3S_CACHE", str(ROOT / ".cache" / "t3s_ray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for the whole test session (each ray.init costs seconds)."""
    from t3s_ray.cluster import ray_session
    from t3s_ray.config import RayConfig

    with ray_session(RayConfig(num_cpus=4, namespace="t3s_ray_tests")) as info:
        yield info


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from t3s_ray.models import materialize_builtin

    return materialize_builtin("tiny-llama")
