import pytest

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
