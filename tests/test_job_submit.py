"""`ray job submit` against a local `ray start --head` cluster, exactly as the README shows it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from servers import separate_ray_env

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ray_logs(temp_dir: str, tail: int = 1500) -> str:
    """The tails of the head's own logs (gcs, raylet, dashboard), for a failure message."""
    logs = Path(temp_dir, "session_latest", "logs")
    wanted = [logs / name for name in ("gcs_server.out", "raylet.out", "dashboard.log", "dashboard.err")
              if (logs / name).is_file()]
    return "\n".join(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}" for f in wanted)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_on_a_local_cluster(tmp_path):
    env = separate_ray_env(PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    # Every port this cluster listens on is its own: the test session's embedded Ray already holds
    # the defaults, and a dashboard agent whose default port (52365) is taken never registers, so
    # every submission fails with "No available agent" (seen in CI).
    own_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    # --block keeps `ray start` in the foreground: stopping it stops this cluster only (`ray stop`
    # would stop every Ray instance on the machine, the test session's too).
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                             "--include-dashboard=true", f"--temp-dir={temp_dir}", *own_ports],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    out_dir = tmp_path / "job-runs"
    try:
        deadline = time.time() + 180
        while (listed := _ray("job", "list", "--address", address, env=env, timeout=60)).returncode != 0:
            assert head.poll() is None, "ray start --head exited\n" + _ray_logs(temp_dir)
            assert time.time() < deadline, ("the cluster's job server did not come up in 180 s; last answer:\n"
                                            + listed.stderr[-2000:] + "\n" + _ray_logs(temp_dir))
            time.sleep(2)
        overrides = ["name=job", f"output_dir={out_dir}", "teacher.ref=builtin:tiny-llama",
                     "student.ref=builtin:tiny-llama", "data.source=builtin:arith", "data.builtin_size=4",
                     "eval.benchmarks=[builtin:arith]", "traces.source=dataset",
                     "traces.response_field=solution", "traces.keep=all", "eval.limit=2", "eval.samples=1",
                     "eval.max_tokens=4", "eval.concurrency=1", "compare=[base]"]
        command = ["job", "submit", "--address", address, "--submission-id", "t3s-test-job", "--no-wait",
                   "--working-dir", ".", "--", "python", "jobs/run.py", "--config", "configs/demo.yaml",
                   *[x for o in overrides for x in ("--set", o)]]
        deadline = time.time() + 180  # the job server answers a while before its agent registers
        while True:  # the job server answers before its agent is ready ("No available agent")
            submit = _ray(*command, env=env)
            if submit.returncode == 0 or "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stderr + submit.stdout
        deadline = time.time() + 480
        status = ""
        while time.time() < deadline:
            # "Job 't3s-test-job' succeeded" / "... failed" / "... stopped" (the CLI's words, lower case)
            status = _ray("job", "status", "--address", address, "t3s-test-job", env=env, timeout=60).stdout.upper()
            if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
                break
            time.sleep(3)
        logs = _ray("job", "logs", "--address", address, "t3s-test-job", env=env, timeout=60).stdout
        assert "SUCCEEDED" in status, f"job status: {status}\n--- logs ---\n{logs[-4000:]}"
        # The job's outputs: the traces, the base model's scores and the table, the report.
        results = json.loads((out_dir / "job" / "results.json").read_text())
        assert list(results["scores"]) == ["base"] and results["scores"]["base"]["benchmarks"]["builtin:arith"]["n"] == 2
        assert (out_dir / "job" / "traces" / "manifest.json").exists()
        assert (out_dir / "job" / "report" / "report.md").exists()
        assert "avg@k" in logs and "base" in logs  # the printed table reached the job's logs
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
