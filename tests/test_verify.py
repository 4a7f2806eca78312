import time

import pytest

from t3s_ray import verify
from t3s_ray.verify import final_answer_text, get_verifier, last_boxed


@pytest.mark.parametrize("response,gold,correct", [
    ("So the result is \\boxed{\\frac{3}{4}}.", "0.75", True),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", True),
    ("The total is 1,234 apples. The answer is 1,234.", "1234", True),
    ("\\boxed{12,500}", "12500", True),
    ("The answer is -5.", "-5", True),
    ("The answer is 5.", "-5", False),
    ("The answer is 25 books.", "25", True),
    ("The answer is 25 books.", "26", False),
    ("First 7, then \\boxed{9}.", "7", False),  # the boxed answer wins over earlier numbers
    ("no marked answer, but it ends with 42", "42", True),
    ("The answer is \\boxed{x^2+1}", "1 + x^2", True),
    ("I don't know.", "3", False),
    ("The answer is 3", None, False),
])
def test_math_verifier(response, gold, correct):
    assert get_verifier("math")(response, gold).correct is correct


def test_math_verifier_reports_extracted_answer():
    assert get_verifier("math")("\\boxed{\\frac{1}{2}}", "0.5").extracted == "\\frac{1}{2}"


@pytest.mark.parametrize("response,gold,correct,letter", [
    ("The answer is (B).", "B", True, "B"),
    ("\\boxed{C}", "C", True, "C"),
    ("Answer: D", "A", False, "D"),
    ("Between A and C I pick\nC", "C", True, "C"),
    ("The answer is (b)", "(B)", True, "B"),
    ("no letter here", "A", False, None),
])
def test_choice_verifier(response, gold, correct, letter):
    verdict = get_verifier("choice")(response, gold)
    assert (verdict.correct, verdict.extracted) == (correct, letter)


def test_exact_and_none_verifiers():
    assert get_verifier("exact")("The answer is Paris.", "paris").correct
    assert not get_verifier("exact")("The answer is Lyon.", "paris").correct
    assert get_verifier("none")("anything", None).correct


def test_boxed_extraction_handles_nesting():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{unclosed") is None
    assert final_answer_text("Thus the final answer is: 17.") == "17"


def test_unknown_verifier():
    with pytest.raises(ValueError, match="unknown verifier 'regex'"):
        get_verifier("regex")


def test_math_verifier_gives_the_same_verdicts_off_the_main_thread():
    """Ray Tune runs trials in threads; math-verify's SIGALRM timeouts must not turn verdicts wrong there."""
    import threading

    cases = [("So the total is 4 + 15 = 19. The answer is 19.", "19"), ("15 + 9 = 24. So, Ana has 24 apples.", "24"),
             ("The answer is \\boxed{\\frac{1}{2}}", "0.5"), ("The answer is 7.", "8")]
    check = get_verifier("math")
    on_main = [check(r, g) for r, g in cases]
    off_main = []
    thread = threading.Thread(target=lambda: off_main.extend(check(r, g) for r, g in cases))
    thread.start()
    thread.join()
    assert [v.correct for v in on_main] == [True, True, True, False]
    assert off_main == on_main


@pytest.mark.parametrize("choices,response,gold,correct,letter", [
    (5, "So it is \\boxed{E}.", "E", True, "E"),
    (5, "The answer is (e)", "E", True, "E"),
    (5, "\\boxed{F}", "F", False, None),          # beyond the five declared options: no answer
    (5, "Between E and F:\nF", "E", False, None),
    (10, "The answer is J.", "J", True, "J"),
    (10, "\\boxed{(H)}", "H", True, "H"),
    (10, "\\boxed{K}", "K", False, None),
    (None, "\\boxed{E}", "E", False, None),      # declared nothing: A-D, as before
    (None, "\\boxed{D}", "D", True, "D"),
    (26, "\\boxed{Z}", "Z", True, "Z"),
])
def test_choice_verifier_reads_exactly_the_declared_options(choices, response, gold, correct, letter):
    verdict = get_verifier("choice", choices=choices)(response, gold)
    assert (verdict.correct, verdict.extracted) == (correct, letter)


def test_a_choice_benchmark_declares_its_options():
    from t3s_ray.config import BenchmarkConfig, ConfigError, _check_all
    from t3s_ray.evaluate import _shuffled_choices, bench_verifier

    fields = [f"opt{i}" for i in range(10)]
    ten = BenchmarkConfig(name="mmlu-pro", source="x.jsonl", prompt_field="q", answer_field=None,
                          choice_fields=fields, verifier="choice")
    shown, gold = _shuffled_choices([f"option {i}" for i in range(10)], "problem-7")
    assert shown.index("option 0") == "ABCDEFGHIJ".index(gold)
    check = bench_verifier(ten)
    assert check(f"\\boxed{{{gold}}}", gold).correct
    assert not check("\\boxed{K}", "K").correct
    lettered = BenchmarkConfig(name="five", source="x.jsonl", answer_field="letter", verifier="choice", num_choices=5)
    assert bench_verifier(lettered)("\\boxed{E}", "E").correct
    with pytest.raises(ConfigError, match="num_choices comes from choice_fields"):
        _check_all(BenchmarkConfig(name="b", source="x", choice_fields=fields, verifier="choice", num_choices=4), "", "")
    with pytest.raises(ConfigError, match="num_choices must be 2 to 26"):
        _check_all(BenchmarkConfig(name="b", source="x", verifier="choice", num_choices=27), "", "")
    with pytest.raises(ConfigError, match="num_choices only applies with verifier: choice"):
        _check_all(BenchmarkConfig(name="b", source="x", num_choices=5), "", "")


# ------------------------------------------------------------------ math answers that never finish

HANGS = "The answer is \\boxed{9^{9^{9^{9}}}}"  # math-verify's comparison evaluates the power: it never ends


def in_a_thread(fn, timeout_s: float):
    """``fn()`` in a thread (as a Ray Tune trial runs), which must finish within ``timeout_s``."""
    import threading

    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still verifying after {timeout_s} s"
    return out[0], time.monotonic() - start


def test_an_answer_that_hangs_math_verify_is_wrong_and_counted_off_the_main_thread(monkeypatch):
    """In a thread math-verify's own timeouts are off (SIGALRM): this answer hung the caller for good.
    The verifier's child ends it at the deadline and goes on with the next answers."""
    monkeypatch.setattr(verify, "MATH_TIMEOUT_S", 2.0)
    check = get_verifier("math")
    before = verify.math_process().timeouts
    verdicts, seconds = in_a_thread(lambda: check.batch([("\\boxed{42}", "42"), (HANGS, "1"), ("\\boxed{7}", "7")]),
                                    timeout_s=60)
    assert [(v.correct, v.timed_out) for v in verdicts] == [(True, False), (False, True), (True, False)]
    assert verdicts[1].extracted == "9^{9^{9^{9}}}"
    assert verify.math_process().timeouts == before + 1
    assert 2.0 <= seconds < 30  # the deadline, not forever
    assert check("The answer is 19.", "19") == verify.Verdict(True, "19")  # the same child goes on


def test_an_answer_stuck_where_no_alarm_reaches_has_its_process_killed():
    """The parent's own deadline: here the child sets no alarm (timeout 0), as if stuck in C code."""
    proc = verify.MathProcess(timeout_s=0, grace_s=2.0)
    try:
        assert proc.verify([("\\boxed{3}", "3")]) == [verify.Verdict(True, "3")]
        first = proc.proc.pid
        verdicts, seconds = in_a_thread(lambda: proc.verify([("\\boxed{1}", "1"), (HANGS, "1"), ("\\boxed{2}", "3"),
                                                             ("\\boxed{5}", "5")]), timeout_s=90)
        assert [(v.correct, v.timed_out) for v in verdicts] == [(True, False), (False, True), (False, False),
                                                                 (True, False)]
        assert proc.timeouts == 1 and proc.proc.pid != first  # killed, and a new one verified the rest
    finally:
        proc.close()


def test_math_verdicts_in_the_child_are_the_in_thread_ones():
    cases = [("So the result is \\boxed{\\frac{3}{4}}.", "0.75"), ("The answer is 25 books.", "26"),
             ("no marked answer, but it ends with 42", "42"), ("The answer is \\boxed{x^2+1}", "1 + x^2"),
             ("I don't know.", "3"), ("The answer is 3", None)]
    assert get_verifier("math").batch(cases) == [verify.verify_math_here(r, g, timeout=5) for r, g in cases]


def test_a_child_killed_from_outside_costs_no_verdict():
    import signal

    proc = verify.MathProcess()
    try:
        assert proc.verify([("\\boxed{3}", "3")]) == [verify.Verdict(True, "3")]
        proc.proc.send_signal(signal.SIGKILL)  # the OOM killer, say
        proc.proc.wait()
        assert proc.verify([("\\boxed{4}", "4"), ("\\boxed{5}", "6")]) == [verify.Verdict(True, "4"),
                                                                          verify.Verdict(False, "5")]
        assert proc.timeouts == 0
    finally:
        proc.close()
