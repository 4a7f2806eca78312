"""Verifiers: is a generated response's final answer the gold answer?

A verifier maps ``(response, gold)`` to a ``Verdict(correct, extracted)``. Registry names:
``math`` (math-verify on the boxed or final answer: numbers, fractions, LaTeX, thousands
separators), ``exact`` (normalised string equality of the final answer), ``choice`` (a letter A-D)
and ``none`` (accept every response; for traces without gold answers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None


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


def _verify_math(response: str, gold: str | None) -> Verdict:
    import threading

    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify

    # math-verify times out with SIGALRM, which only the main thread may use: elsewhere (a Ray Tune
    # trial, a worker thread) every call would raise and be scored wrong. Off the main thread the
    # timeouts are dropped.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None

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


_CHOICE_PATTERNS = [
    re.compile(r"\\boxed\{\s*\(?([A-D])\)?\s*\}"),
    re.compile(r"answer\s*(?:is|:)?\s*(?:option\s*)?\(?\**([A-D])\b\)?", re.IGNORECASE),
    re.compile(r"^\s*\(?([A-D])\)?[.:)]?\s*$", re.MULTILINE),
]


def _verify_choice(response: str, gold: str | None) -> Verdict:
    letter = None
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(response)
        if found:
            letter = found[-1].upper()
            break
    gold_letter = (gold or "").strip().strip("()").upper()[:1]
    return Verdict(letter is not None and letter == gold_letter, letter)


def _verify_none(response: str, gold: str | None) -> Verdict:
    return Verdict(True, final_answer_text(response))


VERIFIERS: dict[str, Callable[[str, str | None], Verdict]] = {
    "math": _verify_math,
    "exact": _verify_exact,
    "choice": _verify_choice,
    "none": _verify_none,
}


def get_verifier(name: str) -> Callable[[str, str | None], Verdict]:
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(VERIFIERS)}") from None


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
