"""What each selection protocol and each compared method is: two frozen tables, asked by everyone.

A **protocol** (``selection.protocol``) is how one training run picks the tokens it learns from; a
**method** (an entry of ``compare``) is one model of ``t3s run``'s final table, trained under a
protocol or not trained at all. Config validation, the pipeline, the training driver and the
worker read these rows instead of keeping their own lists, so a protocol or a method changes here
(and in ``config.py``'s ``Literal`` and docstring, which a test holds equal to these keys).

No torch and nothing above the config: the config loader imports this module. The keep rules
are the core's (``t3s.selection.KEEP_METHODS``, named here by their strings; a test holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["METHODS", "PROTOCOLS", "STATIC_PROBE", "Method", "Protocol", "compare_problems", "dllm_protocols",
           "protocol_for", "runs_static_probe"]

KEEP_ALL = "all"  # the core's t3s.selection.KEEP_ALL: every target is kept (plain SFT)


@dataclass(frozen=True)
class Protocol:
    """One selection protocol.

    Attributes:
        name: Its ``selection.protocol`` value.
        keep: The keep rule of a step once masking is on (``t3s.selection.keep_mask``'s method).
        online: Reclassifies tokens from the training trajectories during the run (no probe).
        dllm: Allowed for a dLLM student (whose AR selector is probed once, not trained alongside).
    """

    name: str
    keep: str
    online: bool = False
    dllm: bool = False

    @property
    def selects(self) -> bool:
        """Whether it drops any target token (every protocol but plain SFT)."""
        return self.keep != KEEP_ALL

    @property
    def needs_probe(self) -> bool:
        """Whether its anchors come from the static probe's θb (selecting, and not online)."""
        return self.selects and not self.online


STATIC_PROBE = "a method with a static probe"  # a prerequisite: any method that may run the static probe


@dataclass(frozen=True)
class Method:
    """One method of ``compare``.

    Attributes:
        name: Its ``compare`` value.
        protocols: The protocols it trains under: the config's ``selection.protocol`` when listed
            here, else the first. Empty: not trained (its model is given, or merged from others).
        dllm: Allowed with a dLLM student.
        needs: What ``compare`` must list before it: method names, or ``STATIC_PROBE``.
        why: Why it needs them (for the error message).
    """

    name: str
    protocols: tuple[str, ...] = ()
    dllm: bool = False
    needs: tuple[str, ...] = ()
    why: str = ""

    @property
    def trained(self) -> bool:
        """Trained by ``t3s run`` (under ``methods/<name>/train``): it has a training trajectory."""
        return bool(self.protocols)

    @property
    def may_probe(self) -> bool:
        """Whether one of its protocols runs the static probe."""
        return any(PROTOCOLS[p].needs_probe for p in self.protocols)


PROTOCOLS: MappingProxyType[str, Protocol] = MappingProxyType({p.name: p for p in (
    Protocol("sft", keep=KEEP_ALL, dllm=True),
    Protocol("t3s_static", keep="t3s", dllm=True),
    Protocol("t3s_online", keep="t3s", online=True),
    Protocol("inverse", keep="inverse"),
    Protocol("random", keep="random"),
)})

METHODS: MappingProxyType[str, Method] = MappingProxyType({m.name: m for m in (
    Method("base", dllm=True),
    Method("teacher", dllm=True),
    Method("sft", ("sft",), dllm=True),
    Method("t3s", ("t3s_static", "t3s_online"), dllm=True),
    Method("inverse", ("inverse",)),
    Method("random", ("random",)),
    Method("rrt", needs=("sft", STATIC_PROBE), why="merges θ0 + (θ_sft − θb)"),
    Method("t3s_online", ("t3s_online",)),
)})


def _listed(items: list[str], last: str = "and") -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def protocol_for(method: str, configured: str) -> str:
    """The protocol a trained ``method`` runs when the config's ``selection.protocol`` is ``configured``."""
    protocols = METHODS[method].protocols
    return configured if configured in protocols else protocols[0]


def runs_static_probe(method: str, configured: str) -> bool:
    """Whether ``method`` trains from the static probe's anchors under ``configured``."""
    return METHODS[method].trained and PROTOCOLS[protocol_for(method, configured)].needs_probe


def dllm_protocols() -> str:
    """The protocols a dLLM student may run, for a message: ``'sft' and 't3s_static'``."""
    return _listed([repr(p.name) for p in PROTOCOLS.values() if p.dllm])


def _prerequisite(need: str) -> str:
    if need != STATIC_PROBE:
        return repr(need)
    probing = [m.name for m in METHODS.values() if m.may_probe]
    named = [repr(m) + (" with " + "/".join(p for p in METHODS[m].protocols if PROTOCOLS[p].needs_probe)
                        if len(METHODS[m].protocols) > 1 else "") for m in probing]
    return f"{need} ({_listed(named, 'or')})"


def compare_problems(compare: list[str], dllm: bool) -> list[str]:
    """Why ``compare`` cannot run (empty when it can): a method listed before what it needs, or a
    method a dLLM student does not support."""
    problems = []
    for name in dict.fromkeys(compare):
        method, before = METHODS[name], compare[: compare.index(name)]
        met = [any(METHODS[b].may_probe for b in before) if need == STATIC_PROBE else need in before
               for need in method.needs]
        if not all(met):
            problems.append(f"{name!r} {method.why}: list it after "
                            f"{_listed([_prerequisite(n) for n in method.needs])}")
    if dllm and any(not METHODS[m].dllm for m in compare):
        problems.append(f"a dLLM student supports {_listed([m.name for m in METHODS.values() if m.dllm])}; "
                        f"got {compare}")
    return problems
