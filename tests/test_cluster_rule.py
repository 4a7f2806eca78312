"""Which Ray a command runs on when others run on the machine (issue 26, item 8): a cluster started
with ``ray start`` is joined (and said so), ``ray.address: local`` starts a private instance beside it,
and two commands at once, each with its private instance, each watch their own: Ray Train's
placement-group cleaner and the State API inside the workers ask their own cluster, not "the" local
one (which failed with "Found multiple active Ray instances", or asked the other cluster).

Each command is a fresh process (``ray_session`` starts or joins Ray once per process), with
``RAY_TMPDIR`` pointing at a temp dir of the test's own, so that a ``ray start`` cluster of anyone else
on this machine is not the one found, and the test's is not found by anyone else."""

from __future__ import annotations

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

# One t3s-like command: a Ray session by the project's rule, a named marker actor, then from inside a
# worker the State API's view of the actors (what Ray Train's cleaner polls), and optionally a tiny
# Ray Train fit (the cleaner itself). Waits for GO_FILE (if any) so that two commands overlap.
COMMAND = r'''
import json, os, sys, time
sys.path.insert(0, os.environ["T3S_ROOT"])
import ray
from t3s_ray.cluster import ray_session
from t3s_ray.config import RayConfig

args = json.loads(sys.argv[1])
with ray_session(RayConfig(**args["ray"], namespace="rule")) as info:
    @ray.remote(num_cpus=0)
    class Marker:
        def ping(self):
            return 1

    marker = Marker.options(name=args["marker"], lifetime="detached").remote()
    ray.get(marker.ping.remote())
    open(args["ready"], "w").close()
    deadline = time.time() + 300
    while args.get("wait_for") and not os.path.exists(args["wait_for"]) and time.time() < deadline:
        time.sleep(0.2)

    @ray.remote(num_cpus=0)
    def state_view():
        from ray.util.state import list_actors
        return {"names": sorted(a.name for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.name),
                "RAY_ADDRESS": os.environ.get("RAY_ADDRESS"),
                "RAY_API_SERVER_ADDRESS": os.environ.get("RAY_API_SERVER_ADDRESS")}

    view = ray.get(state_view.remote())
    if args.get("fit"):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        def loop(config):
            time.sleep(4)  # the cleaner polls its controller every second meanwhile

        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(storage_path=args["storage"], name=args["marker"])).fit()
    ray.kill(marker)
    print("RESULT " + json.dumps({"joined": info["joined"], "cpus": ray.cluster_resources().get("CPU"),
                                  "gcs": ray.get_runtime_context().gcs_address, **view}), flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmpdir: str) -> dict[str, str]:
    return separate_ray_env(RAY_TMPDIR=tmpdir, T3S_ROOT=str(ROOT), OMP_NUM_THREADS="1")


def _command(env: dict[str, str], **args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", COMMAND, json.dumps(args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: float = 400) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), out + err


@pytest.fixture
def short_tmpdir():
    path = tempfile.mkdtemp(prefix="t3r", dir="/tmp")  # short: Ray's socket paths have a length limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_ray_start_cluster_is_joined_and_ray_address_local_starts_a_private_one_beside_it(short_tmpdir):
    env = _env(short_tmpdir)
    port = _free_port()
    own_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    # --block: stopping this process stops this cluster only (`ray stop` stops every Ray on the machine).
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                             f"--temp-dir={short_tmpdir}/ray", *own_ports],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        record = Path(short_tmpdir) / "ray" / "ray_current_cluster"  # where Ray looks for it under RAY_TMPDIR
        deadline = time.time() + 120
        while not record.exists():
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        # Without an address: joined, with its 1 CPU rather than the 3 asked, and said so in one line.
        joined, log = _result(_command(env, ray={"num_cpus": 3}, marker="joiner", ready=f"{short_tmpdir}/j"))
        assert joined["joined"] == record.read_text().strip() and joined["joined"].endswith(f":{port}")
        assert joined["gcs"] == joined["joined"] and joined["cpus"] == 1.0
        assert joined["RAY_ADDRESS"] == joined["joined"] and "joiner" in joined["names"]
        lines = [ln for ln in log.splitlines() if ln.startswith("[ray] joining")]
        assert lines == [f"[ray] joining the Ray cluster started with `ray start` on this machine ({joined['joined']}), "
                         "with its CPUs and GPUs (ray.num_cpus ignored); set ray.address: local for a private instance"]
        # ray.address: local: a private instance of 2 CPUs beside it, whose workers' State API asks it
        # (not the `ray start` cluster, which Ray's own lookup would pick).
        private, log = _result(_command(env, ray={"address": "local", "num_cpus": 2}, marker="private",
                                        ready=f"{short_tmpdir}/p", fit=True, storage=f"{short_tmpdir}/storage"))
        assert private["joined"] is None and private["cpus"] == 2.0 and not private["gcs"].endswith(f":{port}")
        assert "private" in private["names"] and private["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
        assert "[ray] joining" not in log and "multiple active Ray instances" not in log
        assert "Failed to query Ray Train Controller" not in log
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()


@pytest.mark.slow
def test_two_commands_at_once_each_watch_their_own_instance(short_tmpdir):
    """Two commands, each with its private instance, overlapping: each one's workers see their own
    actors through the State API, and Ray Train's cleaner in each prints nothing about the other."""
    env = _env(short_tmpdir)
    a_ready, b_ready = f"{short_tmpdir}/a", f"{short_tmpdir}/b"
    common = {"ray": {"num_cpus": 2}, "fit": True, "storage": f"{short_tmpdir}/storage"}
    a = _command(env, marker="command-a", ready=a_ready, wait_for=b_ready, **common)
    b = _command(env, marker="command-b", ready=b_ready, wait_for=a_ready, **common)
    (ra, log_a), (rb, log_b) = _result(a), _result(b)
    assert ra["gcs"] != rb["gcs"]
    assert "command-a" in ra["names"] and "command-b" not in ra["names"]
    assert "command-b" in rb["names"] and "command-a" not in rb["names"]
    for log in (log_a, log_b):
        assert "multiple active Ray instances" not in log and "Failed to query Ray Train Controller" not in log
        assert "[ray] joining" not in log
