"""Verifiers: is a generated response's final answer the gold answer?

A verifier (``get_verifier(name)``) maps ``(response, gold)`` to a ``Verdict(correct, extracted,
timed_out)``, and ``.batch(pairs)`` many at once. Registry names: ``math`` (math-verify on the boxed
or final answer: numbers, fractions, LaTeX, thousands separators), ``exact`` (normalised string
equality of the final answer), ``choice`` (a letter among the declared options, A-D unless told
more, up to A-Z) and ``none`` (accept every response; for traces without gold answers).

``math`` runs in a child process of its own (``MathProcess``), one per process that verifies, with a
deadline per answer: math-verify's own timeouts use SIGALRM, which only a main thread may set, so in
a Ray Tune trial (a thread) or any worker thread a pathological answer (``9^{9^{9^{9}}}``) hung the
caller. In the child's main thread an alarm ends an answer after ``MATH_TIMEOUT_S``; an answer stuck
where no signal reaches (C code) has the child killed by the parent ``KILL_GRACE_S`` later. Either
way it is scored wrong with ``timed_out`` set, and the next answer goes on.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    timed_out: bool = False  # the answer ran past its deadline, or crashed the verifier twice (math): wrong, counted


_BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    i = start + len(_BOXED) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is\s*:?|:)\s*\$?([^\n$]+?)\$?\s*(?:\.\s*$|\.\s|$)", re.IGNORECASE)


def final_answer_text(text: str) -> str | None:
    """The response's final answer as written: the last boxed answer, else 'the answer is X'."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_IS.findall(text)
    return matches[-1].strip() if matches else None


def verify_math_here(response: str, gold: str | None, timeout: int | None = None) -> Verdict:
    """The math verdict, computed in this thread. ``timeout``: math-verify's own per-operation
    timeouts (SIGALRM: the main thread only; None turns them off)."""
    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify

    def parse(text: str):
        return mv_parse(text, parsing_timeout=timeout)

    def verify(gold_parsed, parsed) -> bool:
        return mv_verify(gold_parsed, parsed, timeout_seconds=timeout)

    if gold is None:
        return Verdict(False, None)
    candidate = final_answer_text(response)
    # A marked final answer is read as LaTeX, then as plain text ("25 books" -> 25); without one,
    # math-verify falls back to the last number of the whole response.
    attempts = [f"${candidate}$", candidate] if candidate is not None else [response]
    extracted = candidate
    try:
        gold_parsed = parse(f"${gold}$") or parse(gold)
        for text in attempts:
            parsed = parse(text)
            if parsed:
                extracted = str(parsed[-1])
                if gold_parsed and verify(gold_parsed, parsed):
                    return Verdict(True, extracted)
    except Exception:  # math-verify raises on pathological inputs; a crash is a wrong answer
        pass
    return Verdict(False, extracted)


# --------------------------------------------------------------------------------------------
# The math verifier's child process
# --------------------------------------------------------------------------------------------

MATH_TIMEOUT_S = 10.0    # one answer's deadline in the child (math-verify's default is 5 s per operation)
KILL_GRACE_S = 10.0      # the parent's deadline beyond it, for an answer that no alarm interrupts
START_TIMEOUT_S = 180.0  # the child imports sympy and math-verify (seconds on a loaded machine)


class AnswerTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise AnswerTimeout()


def serve() -> None:
    """The child: one JSON line per batch in (``{"timeout_s": t, "items": [[response, gold], ...]}``),
    one JSON line per answer out (``[index, correct, extracted, timed_out]``), as each is done."""
    import logging

    try:  # die with the parent, even while stuck in an answer (Linux)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeouts are off": this process has its own
    import math_verify  # noqa: F401  (loaded before "ready", so that the first answer's deadline is its own)

    signal.signal(signal.SIGALRM, _on_alarm)
    # Ctrl-C reaches the whole process group: the parent answers it (one line, exit 130); this child
    # ends when its stdin closes or its parent goes, without a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        message = json.loads(line)
        timeout_s = float(message["timeout_s"])
        for i, (response, gold) in enumerate(message["items"]):
            try:
                if timeout_s > 0:
                    signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    verdict = verify_math_here(response, gold)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                record = [i, verdict.correct, verdict.extracted, False]
            except AnswerTimeout:
                record = [i, False, final_answer_text(response), True]
            out.write(json.dumps(record) + "\n")
            out.flush()


class MathProcess:
    """The math verifier's child process (started on first use, restarted after a kill), shared by
    the threads of this process one batch at a time. ``timeouts`` counts the answers that ran out
    of time here."""

    def __init__(self, timeout_s: float | None = None, grace_s: float | None = None):
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.proc: subprocess.Popen | None = None
        self.buffer = b""
        self.lock = threading.Lock()
        self.timeouts = 0
        self.unavailable: str | None = None  # why no child could start: verify in the caller's thread

    def _start(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the child imports this package from where we did
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.buffer = b""
        command = [sys.executable, "-c", "from t3s_ray.verify import serve; serve()"]
        # Started from a thread that lives as long as this process: the child's PR_SET_PDEATHSIG fires
        # when the thread that forked it ends, and a caller's thread (a Tune trial's) may end first.
        self.proc = _spawner().submit(subprocess.Popen, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env).result()
        if self._line(START_TIMEOUT_S) != "ready":
            self._kill()
            raise RuntimeError(f"the math verifier's process did not start within {START_TIMEOUT_S:.0f} s")

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                pipe.close()
        self.proc = None

    def _line(self, timeout_s: float) -> str | None:
        """The child's next line, or None when it died or said nothing for ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def verify(self, pairs: list[tuple[str, str | None]]) -> list[Verdict]:
        timeout_s = MATH_TIMEOUT_S if self.timeout_s is None else self.timeout_s
        grace_s = KILL_GRACE_S if self.grace_s is None else self.grace_s
        out: list[Verdict] = []
        crashed = False  # the child died (not stuck) on the answer out[len(out)]
        with self.lock:
            while len(out) < len(pairs):
                if self.unavailable:
                    return out + [verify_math_here(r, g, 5 if _main_thread() else None) for r, g in pairs[len(out):]]
                if self.proc is None or self.proc.poll() is not None:
                    try:
                        self._start()
                    except (OSError, RuntimeError) as e:
                        self.unavailable = str(e)
                        print(f"t3s: warning: math answers are verified without a deadline in this process: {e}",
                              file=sys.stderr, flush=True)
                        continue
                rest = pairs[len(out):]
                try:
                    self.proc.stdin.write((json.dumps({"timeout_s": timeout_s, "items": rest}) + "\n").encode())
                    self.proc.stdin.flush()
                except BrokenPipeError:
                    self._kill()
                    continue
                # A timed-out child answers at its own deadline; no line by ours: stuck beyond signals.
                wait_s = (timeout_s + grace_s) if timeout_s > 0 else grace_s
                for response, _ in rest:
                    line = self._line(wait_s)
                    if line is None:
                        died = self.proc.poll() is not None or self._exited(1.0)
                        self._kill()
                        if died and not crashed:  # killed from outside, or this answer crashed it: once more
                            crashed = True
                            break
                        # Stuck, or crashed it twice: this answer is wrong, the rest go to a new child.
                        out.append(Verdict(False, final_answer_text(response), timed_out=True))
                        self.timeouts += 1
                        crashed = False
                        break
                    _, correct, extracted, timed_out = json.loads(line)
                    self.timeouts += bool(timed_out)
                    out.append(Verdict(bool(correct), extracted, bool(timed_out)))
                    crashed = False
        return out

    def _exited(self, wait_s: float) -> bool:
        try:
            self.proc.wait(wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        with self.lock:
            self._kill()


_SPAWNER = None
_SPAWNER_LOCK = threading.Lock()


def _spawner():
    """One thread for the life of this process that starts the verifier children (``_start``)."""
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            from concurrent.futures import ThreadPoolExecutor

            _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t3s-verify-spawner")
        return _SPAWNER


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


_MATH: MathProcess | None = None
_MATH_LOCK = threading.Lock()


def math_process() -> MathProcess:
    """This process's math verifier child (one, shared by its threads)."""
    global _MATH
    with _MATH_LOCK:
        if _MATH is None:
            _MATH = MathProcess()
            import atexit

            atexit.register(_MATH.close)
        return _MATH


# --------------------------------------------------------------------------------------------
# The verifiers
# --------------------------------------------------------------------------------------------


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\s+", " ", s).rstrip(".").strip()
    return s.casefold()


def _verify_exact(response: str, gold: str | None) -> Verdict:
    candidate = final_answer_text(response)
    if candidate is None:
        lines = [ln for ln in response.strip().splitlines() if ln.strip()]
        candidate = lines[-1] if lines else ""
    return Verdict(gold is not None and _normalise(candidate) == _normalise(gold), candidate)


def _choice_patterns(letters: str) -> list[re.Pattern]:
    cls = f"[{letters[0]}-{letters[-1]}]"
    return [
        re.compile(rf"\\boxed\{{\s*\(?({cls})\)?\s*\}}"),
        re.compile(rf"answer\s*(?:is|:)?\s*(?:option\s*)?\(?\**({cls})\b\)?", re.IGNORECASE),
        re.compile(rf"^\s*\(?({cls})\)?[.:)]?\s*$", re.MULTILINE),
    ]


def _verify_choice(response: str, gold: str | None, patterns: list[re.Pattern]) -> Verdict:
    letter = None
    for pattern in patterns:
        found = pattern.findall(response)
        if found:
            letter = found[-1].upper()
            break
    gold_letter = (gold or "").strip().strip("()").upper()[:1]
    return Verdict(letter is not None and letter == gold_letter, letter)


def _verify_none(response: str, gold: str | None) -> Verdict:
    return Verdict(True, final_answer_text(response))


class Verifier:
    """``check(response, gold)`` is a ``Verdict``; ``check.batch(pairs)`` the verdicts of many."""

    def __init__(self, name: str, one: Callable[[str, str | None], Verdict]):
        self.name, self.one = name, one

    def __call__(self, response: str, gold: str | None) -> Verdict:
        return self.batch([(response, gold)])[0]

    def batch(self, pairs: Iterable[tuple[str, str | None]]) -> list[Verdict]:
        return [self.one(r, g) for r, g in pairs]


class MathVerifier(Verifier):
    """``math``, in this process's child (``math_process``): one round trip per batch."""

    def __init__(self):
        super().__init__("math", verify_math_here)

    def batch(self, pairs: Iterable[tuple[str, str | None]]) -> list[Verdict]:
        pairs = [(str(r), None if g is None else str(g)) for r, g in pairs]
        return math_process().verify(pairs) if pairs else []


VERIFIERS = ("math", "exact", "choice", "none")
DEFAULT_CHOICES = 4  # a choice benchmark or trace set that declares no options: A-D


def get_verifier(name: str, choices: int | None = None) -> Verifier:
    """The verifier ``name``; for ``choice``, the letters of ``choices`` options (A.. up to Z) are
    the only answers read: a letter beyond them is no answer."""
    if name == "math":
        return MathVerifier()
    if name == "exact":
        return Verifier(name, _verify_exact)
    if name == "choice":
        n = DEFAULT_CHOICES if choices is None else choices
        if not 2 <= n <= len(LETTERS):
            raise ValueError(f"a choice verifier takes 2 to {len(LETTERS)} options, got {n}")
        patterns = _choice_patterns(LETTERS[:n])
        return Verifier(name, lambda response, gold: _verify_choice(response, gold, patterns))
    if name == "none":
        return Verifier(name, _verify_none)
    raise ValueError(f"unknown verifier {name!r}; known: {', '.join(VERIFIERS)}")


# --------------------------------------------------------------------------------------------
# Scores over verdicts: shared by the evaluation stage and the training probe
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def score_counts(counts: list[tuple[int, int]], pass_k: list[int] = ()) -> dict[str, float]:
    """avg@k (mean over problems of the fraction of correct samples) and pass@k from per-problem
    ``(n_samples, n_correct)``. A problem with no samples (it could not be generated) scores 0."""
    if not counts:
        return {"avg@k": 0.0, **{f"pass@{k}": 0.0 for k in pass_k}}
    out = {"avg@k": sum(c / n if n else 0.0 for n, c in counts) / len(counts)}
    for k in pass_k:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) if n >= k else 0.0 for n, c in counts) / len(counts)
    return out
