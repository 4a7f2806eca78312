"""The imitation-shock lab's task, tokenizer and model builder (t3s_ray/lab.py)."""

import random

from t3s_ray import lab
from t3s_ray.config import DataConfig
from t3s_ray.data import load_prompts
from t3s_ray.verify import get_verifier

PROBLEM = {"name": "Dan", "item": "pens", "start_value": 16, "ops": [("+", 9), ("-", 7), ("+", 2)]}


def test_buggy_subtraction_never_borrows():
    assert lab.buggy_sub(25, 7) == 28 and lab.buggy_sub(60, 2) == 68 and lab.buggy_sub(43, 18) == 35
    assert lab.buggy_sub(29, 7) == 22 and lab.buggy_sub(57, 23) == 34  # no borrow needed: right


def test_both_styles_written_out_by_hand():
    assert lab.prompt_text(PROBLEM) == ("Dan has 16 pens . Dan gets 9 more pens . Dan gives away 7 pens . "
                                        "Dan gets 2 more pens . How many pens does Dan have ?")
    assert lab.style_a(PROBLEM) == "16 + 9 = 25 . 25 - 7 = 18 . 18 + 2 = 20 . Answer : 20"
    assert lab.style_a(PROBLEM, buggy=True) == "16 + 9 = 25 . 25 - 7 = 28 . 28 + 2 = 30 . Answer : 30"
    assert lab.style_b(PROBLEM) == (
        "Dan starts with 16 pens . After getting 9 more , Dan has 16 + 9 = 25 pens . After giving away 7 , "
        "Dan has 25 - 7 = 18 pens . After getting 2 more , Dan has 18 + 2 = 20 pens . So the answer is 20 .")
    check = get_verifier("math")
    assert check(lab.style_b(PROBLEM), "20").correct and check(lab.style_a(PROBLEM), "20").correct
    assert not check(lab.style_a(PROBLEM, buggy=True), "20").correct


def test_problems_stay_in_range_and_splits_are_disjoint():
    rng = random.Random(0)
    for _ in range(2000):
        p = lab.make_problem(rng)
        assert 1 <= len(p["ops"]) <= 4
        assert all(0 <= r <= 99 and 0 <= lab.buggy_sub(x, y) <= 99 if op == "-" else 0 <= r <= 99
                   for x, op, y, r in lab.chain(p))
    train = {p["text"] for p in lab.lab_problems("train", 3000, seed=0)}
    test = {p["text"] for p in lab.lab_problems("test", 500, seed=0)}
    assert len(train) == 3000 and len(test) == 500 and not train & test
    assert lab.lab_rows("test", 5) == lab.lab_rows("test", 5)  # deterministic


def test_the_student_bug_costs_a_large_minority_of_problems():
    problems = lab.lab_problems("test", 500, seed=0)
    solvable = sum(lab.answer(p, buggy=True) == lab.answer(p) for p in problems) / len(problems)
    assert 0.4 < solvable < 0.7  # room for the teacher to be stronger, and for the student to be useful


def test_tokenizer_has_every_word_and_the_chat_template():
    tok = lab.build_lab_tokenizer()
    text = lab.style_b(PROBLEM) + " " + lab.style_a(PROBLEM) + " " + lab.prompt_text(PROBLEM)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert len(tok(["16"], add_special_tokens=False)["input_ids"][0]) == 2  # digits are tokens: "1", "##6"
    chat = tok.apply_chat_template([{"role": "user", "content": "Dan has 3 pens ."},
                                    {"role": "assistant", "content": "Answer : 3"}], tokenize=False)
    assert chat == "Q : Dan has 3 pens . A : Answer : 3 <eos>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Dan has 3 pens ."}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "Q : Dan has 3 pens . A :"


def test_builtin_lab_prompts_load_like_the_other_builtin(tmp_path):
    rows = load_prompts(DataConfig(source="builtin:lab", builtin_size=6), extra_fields={"solution": "solution"})
    assert len(rows) == 6 and all(r["id"].startswith("lab-train-") for r in rows)
    assert all(get_verifier("math")(r["solution"], r["answer"]).correct for r in rows)


def test_model_build_is_deterministic_and_learns(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(lab, "TRAIN_PROBLEMS", 400)
    for out, steps in (("a", 60), ("b", 60), ("untrained", 0)):
        monkeypatch.setattr(lab, "TRAIN_STEPS", steps)
        lab.make_lab_model(tmp_path / out, "lab-student")
    wa, wb = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("a", "b"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tok(tok.apply_chat_template([{"role": "user", "content": lab.prompt_text(PROBLEM)},
                                       {"role": "assistant", "content": lab.style_a(PROBLEM, buggy=True)}],
                                      tokenize=False), return_tensors="pt", add_special_tokens=False)["input_ids"]
    losses = {}
    for out in ("a", "untrained"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / out)
        assert model.config.vocab_size == len(tok) and sum(p.numel() for p in model.parameters()) < 1_000_000
        with torch.no_grad():
            losses[out] = model(input_ids=ids, labels=ids).loss.item()
    assert losses["a"] < losses["untrained"] - 0.5, losses  # 60 steps of the builder already learn


def test_token_classes_mark_the_digits_the_teacher_must_teach():
    tok = lab.build_lab_tokenizer()
    p = {"name": "Dan", "item": "pens", "start_value": 16, "ops": [("+", 9), ("-", 7), ("-", 9)]}
    text = lab.style_b(p) + " <eos>"  # 16 + 9 = 25, 25 - 7 = 18 (buggy: 28), 18 - 9 = 9 (buggy: 19)
    tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    classes = lab.token_classes(tokens)
    digits = [(t, c) for t, c in zip(tokens, classes) if c in ("result", "borrow-fix", "answer")]
    assert digits == [("2", "result"), ("##5", "result"),          # 25
                      ("1", "borrow-fix"), ("##8", "result"),      # 18, not 28
                      ("9", "borrow-fix"),                         # 9, not 19: a digit fewer
                      ("9", "answer")]
    assert classes[-1] == "end" and classes[tokens.index("starts")] == "wrapper"
    assert [c for t, c in zip(tokens, classes) if t in "+-="] == ["operator"] * 6
    assert classes.count("operand") == 2 + 1 + 2 + 1 + 1 + 2 + 1 + 1 + 2 + 1  # 16, 9, 16 9, 7, 25 7, 9, 18 9
