"""Shared test fixtures: one local Ray instance per test session, an offline model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline and quiet before anything imports transformers or Ray.
os.environ.setdefault("T3S_CACHE", str(ROOT / ".cache" / "t3s_ray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A Hugging Face cache of the tests' own, where tests lay out fake hub repos (hub-id students).
os.environ.setdefault("HF_HUB_CACHE", str(ROOT / ".cache" / "hf-hub"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s, so each of the suite's many short fits waits up
# to 2 s to notice that it finished; Ray Train passes this variable on to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


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


def tiny_run_data(tmp_path: Path, name: str, **sections) -> dict:
    """A small run config on the builtin tiny model: traces imported from the offline problems'
    worked solutions (no generation), one training worker, a few steps, a small evaluation.
    Each keyword replaces or extends (for mappings) one top-level entry."""
    data = {
        "name": name, "output_dir": str(tmp_path / "runs"),
        "teacher": {"ref": "builtin:tiny-llama"}, "student": {"ref": "builtin:tiny-llama"},
        "data": {"source": "builtin:arith", "builtin_size": 8, "max_seq_len": 256},
        "traces": {"source": "dataset", "response_field": "solution", "verifier": "math", "keep": "all"},
        "train": {"num_workers": 1, "batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "lr": 1e-4,
                  "checkpoint_every": 2, "keep_last": 1},
        "eval": {"benchmarks": ["builtin:arith"], "sampling": {"samples": 1, "max_tokens": 4}, "limit": 3,
                 "engine": {"concurrency": 1, "batch_size": 4, "max_model_len": 512}},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data
