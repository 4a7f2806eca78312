"""The bench scripts' interleaved rounds: two sides timed A B, B A, A B, ... (ABBA), so that a slow
spell of a noisy machine, or a warm cache, lands on both sides alike instead of on one."""

from __future__ import annotations

from typing import TypeVar

Side = TypeVar("Side")


def abba(a: Side, b: Side, rounds: int) -> list[Side]:
    """The order of ``rounds`` rounds of the two sides: ``a, b``, then ``b, a``, then ``a, b``, ...
    (two rounds: a, b, b, a)."""
    return [side for r in range(rounds) for side in ((a, b) if r % 2 == 0 else (b, a))]
