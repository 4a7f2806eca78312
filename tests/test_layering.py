"""The package's layers, read from the modules' own imports (function-level ones included): the core
and the store import no stage, no module imports a higher layer, no import cycles. Issue 27's safety
net before its refactors: ``KNOWN`` lists the violations that exist today, each to be removed by the
refactor that fixes it; the test fails on any new one, and on a listed one that is gone (so that the
list only shrinks)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "t3s_ray"

# Lowest first. A module may import its own layer and the ones below.
LAYERS = [
    {"errors", "lab", "stats", "verify", "batching", "distributed", "t3s", "t3s.confidence", "t3s.diagnostics",
     "t3s.diffusion", "t3s.losses", "t3s.selection", "", "protocols"},
    {"config"},
    {"models", "llada2", "data", "runfolder", "store", "tracking"},
    {"generate", "engines", "engines.hf", "engines.vllm", "engines.openai", "engines.rows", "cluster"},
    {"worker", "probe_diagnostics", "export", "training", "training.spec", "training.trainer", "training.module",
     "training.steps", "training.online", "training.metrics", "training.sessions"},
    {"traces", "train", "evaluate", "report"},
    {"sweep", "pipeline", "rehearse"},
    {"cli"},
]
STAGES = {"traces", "train", "evaluate", "report", "sweep", "pipeline", "rehearse", "cli"}
CORE = {m for m in LAYERS[0] if m.startswith("t3s")} | {"store"}

KNOWN: dict[tuple[str, str], str] = {}  # (importer, imported): why it is wrong


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                stem = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{stem}.{a.name}".strip(".") for a in node.names] + [stem]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("t3s_ray"):
                stem = node.module.removeprefix("t3s_ray").strip(".")
                targets = [f"{stem}.{a.name}".strip(".") for a in node.names] + [stem]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("t3s_ray").strip(".") for a in node.names if a.name.startswith("t3s_ray")]
            for t in targets:
                if t in modules and t != name:
                    found.add(t)
                    break
        graph[name] = found
    return graph


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_every_module_has_a_layer():
    assert sorted(m for m in imports() if not any(m in layer for layer in LAYERS)) == []


def test_no_module_imports_a_higher_layer_or_a_stage_from_the_core():
    graph = imports()
    found = {(a, b) for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a)
             or (a in CORE and b in STAGES) or (a in STAGES - {"pipeline", "sweep", "rehearse", "cli"} and b in STAGES)}
    cycles = {(a, b) for a, deps in graph.items() for b in deps if a in graph.get(b, set())}
    found |= cycles
    assert sorted(found - set(KNOWN)) == [], "new layering violations"
    assert sorted(set(KNOWN) - found) == [], "fixed: remove these from KNOWN"
