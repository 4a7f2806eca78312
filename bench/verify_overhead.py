"""Per-answer cost of the math verifier in its child process (``verify.MathProcess``, the shipped
path, with a deadline per answer) against math-verify in the caller's thread (the path before it,
without a deadline off the main thread).

Answers: the same mix of responses a run sees (boxed LaTeX, "the answer is N", plain text, wrong
ones), verified ``--rounds`` times each way, alternating in-thread, child, child, in-thread (ABBA),
the child path in batches of ``--batch`` answers (a prompt's samples: ``generate_and_verify`` sends
one batch per prompt) and one answer per call (the online probe's ``check(response, gold)``). The
child is started before timing (its start, ~2 s of imports, is paid once per process).

    python bench/verify_overhead.py [--answers 400 --batch 8 --rounds 2]

Also the round trip alone (answers without gold return before any parsing). Last lines:
``in-thread X ms/answer``, ``child batch=B Y ms/answer``, ``child batch=1 Z ms/answer``, ``overhead ...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t3s_ray import verify  # noqa: E402

CASES = [
    ("So the result is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("The total is 1,234 apples. The answer is 1,234.", "1234"),
    ("\\boxed{12,500}", "12500"),
    ("The answer is 25 books.", "26"),
    ("First 7, then \\boxed{9}.", "7"),
    ("no marked answer, but it ends with 42", "42"),
    ("The answer is \\boxed{x^2+1}", "1 + x^2"),
    ("I don't know.", "3"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    # Distinct answers (the numbers shifted by i): math-verify caches what it parsed.
    pairs = [(r.replace("9", str(9 + i)).replace("42", str(42 + i)), g.replace("42", str(42 + i)))
             for i, (r, g) in zip(range(args.answers), CASES * (args.answers // len(CASES) + 1))]
    child = verify.MathProcess()
    expected = [verify.verify_math_here(r, g, timeout=None) for r, g in pairs]  # warms math-verify's caches too
    assert child.verify(pairs[:2]) == expected[:2]  # started before timing

    def in_thread() -> float:
        start = time.perf_counter()
        got = [verify.verify_math_here(r, g, timeout=None) for r, g in pairs]
        assert got == expected
        return time.perf_counter() - start

    def in_child(batch: int) -> float:
        start = time.perf_counter()
        got = []
        for i in range(0, len(pairs), batch):
            got += child.verify(pairs[i:i + batch])
        assert [(v.correct, v.extracted) for v in got] == [(v.correct, v.extracted) for v in expected]
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"in-thread": [], f"child batch={args.batch}": [], "child batch=1": []}
    for _ in range(args.rounds):
        times["in-thread"].append(in_thread())
        times[f"child batch={args.batch}"].append(in_child(args.batch))
        times["child batch=1"].append(in_child(1))
        times["child batch=1"].append(in_child(1))
        times[f"child batch={args.batch}"].append(in_child(args.batch))
        times["in-thread"].append(in_thread())
    # The round trip alone: answers without a gold answer return before any parsing.
    trip = {}
    for batch in (1, args.batch):
        empty = [(f"The answer is {i}.", None) for i in range(len(pairs))]
        start = time.perf_counter()
        for i in range(0, len(empty), batch):
            child.verify(empty[i:i + batch])
        trip[batch] = 1e6 * (time.perf_counter() - start) / len(empty)
    child.close()
    per = {k: 1000 * statistics.median(v) / len(pairs) for k, v in times.items()}
    for batch, us in trip.items():
        print(f"round trip alone, batch={batch}: {us:.1f} us/answer")
    for k, ms in per.items():
        print(f"{k} {ms:.3f} ms/answer")
    base = per["in-thread"]
    print("overhead " + ", ".join(f"{k}: {ms - base:+.3f} ms/answer ({ms / base:.2f}x)"
                                  for k, ms in per.items() if k != "in-thread"))


if __name__ == "__main__":
    main()
