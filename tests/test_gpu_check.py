"""``bench/gpu_check.py`` runs on a bare GPU machine: torch, transformers, accelerate, safetensors and
tensorboard (with their numpy, pyyaml, tokenizers, huggingface_hub), and nothing else this project
installs. Here it runs in a subprocess where Ray, vLLM, pyarrow, datasets, math-verify and matplotlib
cannot be found."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "bench" / "gpu_check.py"
ABSENT = ("ray", "vllm", "pyarrow", "datasets", "math_verify", "matplotlib")

# Every finder on sys.meta_path is wrapped so that it finds none of ABSENT: ``import ray`` raises
# ModuleNotFoundError and ``importlib.util.find_spec("ray")`` returns None, as where the package is not
# installed (a finder that raised instead would also break transformers' optional-package probes,
# which a bare machine answers with None).
HIDE = f"""
import sys

ABSENT = {ABSENT!r}


class Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
"""


def run_hidden(code: str, *args: str, timeout: float, env: dict[str, str] | None = None):
    return subprocess.run([sys.executable, "-c", HIDE + code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def t3s_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``t3s_ray`` import in ``path``, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "t3s_ray":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "t3s_ray"]
    return found


def test_the_hiding_works():
    """The simulation itself: a hidden package is missing, and probes for it answer None."""
    out = run_hidden("import importlib.util\nassert importlib.util.find_spec('ray') is None\n"
                     "try:\n    import pyarrow\nexcept ModuleNotFoundError:\n    print('missing')\n", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "missing"


def test_every_t3s_ray_import_of_gpu_check_works_without_ray_vllm_pyarrow():
    """gpu_check's own imports and every ``t3s_ray`` module and name it imports in its functions. It
    used to take ``tokenize_traces`` from ``t3s_ray.train``, which imports the traces stage (pyarrow):
    on a torch + transformers machine it stopped at its 4th check."""
    imports = t3s_imports(GPU_CHECK)
    assert ("t3s_ray.worker", ["train_standalone"]) in imports  # the walk sees imports inside functions
    code = f"""
import importlib, importlib.util
spec = importlib.util.spec_from_file_location("gpu_check", {str(GPU_CHECK)!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # its top level (main() is not run)
for module, names in {imports!r}:
    mod = importlib.import_module(module)
    for name in names:
        getattr(mod, name)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ABSENT)
assert not loaded, loaded
print("ok")
"""
    out = run_hidden(code, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_gpu_check_dry_run_passes_without_ray_vllm_pyarrow():
    """The whole ``--device cpu`` dry run (every check at small shapes: lazy imports inside t3s_ray's
    functions included), under the same hiding. ~50 s of CPU (minutes on a loaded machine)."""
    with socket.socket() as s:  # a port of its own for the gloo process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(port)}
    code = f"""
import runpy
sys.argv = [{str(GPU_CHECK)!r}, "--device", "cpu"]
runpy.run_path({str(GPU_CHECK)!r}, run_name="__main__")
"""
    out = run_hidden(code, timeout=880, env=env)
    tail = out.stdout[-4000:] + out.stderr[-3000:]
    assert out.returncode == 0, tail
    lines = out.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], tail
    numbers = {line.split()[1] for line in lines if line.startswith("PASS")}
    # the checks issue 23 added: the sampler at temperature > 0, the static reload under FSDP, the
    # cleanup after an (injected) out-of-memory error, the loss at larger chunks, nothing imported; issue
    # 24's LLaDA2 section: tiny-llada2's loss and sampler against the CPU, the mini-width block-diffusion
    # step under FSDP2 and the sampler with and without its cache (at small sizes here)
    assert {"3.2", "4.5", "6.1", "7.1", "7.2", "8.1", "8.2", "8.3", "8.4", "9.1"} <= numbers, tail
    assert [line for line in lines if line.startswith("PASS   9.1  nothing imported")], tail
    passed, total = lines[-1].split()[0].split("/")
    assert passed == total and int(total) == len(numbers), tail
