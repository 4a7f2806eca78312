"""The imitation-shock lab (t3s_ray/lab.py): the task, the students' skill, the oracle teacher's
insertions, the token classes, the model builder, the probe diagnostics, and a short pipeline run."""

import json
import math
import random

import pytest

from t3s_ray import lab
from t3s_ray.config import ConfigError, DataConfig, from_dict
from t3s_ray.data import load_prompts
from t3s_ray.verify import get_verifier

PROBLEM = {"name": "Dan", "item": "pens", "start_value": 16, "ops": [("+", 9), ("-", 7), ("+", 2)]}


def test_buggy_subtraction_never_borrows():
    assert lab.buggy_sub(25, 7) == 28 and lab.buggy_sub(60, 2) == 68 and lab.buggy_sub(43, 18) == 35
    assert lab.buggy_sub(29, 7) == 22 and lab.buggy_sub(57, 23) == 34  # no borrow needed: right


def test_formats_written_out_by_hand():
    assert lab.prompt_text(PROBLEM) == ("Dan has 16 pens . Dan gets 9 more pens . Dan gives away 7 pens . "
                                        "Dan gets 2 more pens . How many pens does Dan have ?")
    assert lab.style_a(PROBLEM) == "16 + 9 = 25 . 25 - 7 = 18 . 18 + 2 = 20 . Answer : 20"
    assert lab.style_a(PROBLEM, buggy=True) == "16 + 9 = 25 . 25 - 7 = 28 . 28 + 2 = 30 . Answer : 30"
    # q = 0: the oracle is the student's format with correct arithmetic; q = 1: a phrase at each of the
    # 4 boundaries (3 steps + Answer), and removing them gives the plain answer back.
    assert lab.teacher_solution(PROBLEM, 0.0) == lab.style_a(PROBLEM)
    full = lab.teacher_solution(PROBLEM, 1.0, phrases=("Hmm ,",))
    assert full == "Hmm , 16 + 9 = 25 . Hmm , 25 - 7 = 18 . Hmm , 18 + 2 = 20 . Hmm , Answer : 20"
    check = get_verifier("math")
    assert check(full, "20").correct and check(lab.style_a(PROBLEM), "20").correct
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


@pytest.mark.parametrize("skill", ["pair", "uniform:0.45", "never"])
def test_skill_borrows_with_its_probability_per_digit(skill):
    # 21 - b borrows for every b in 2..9 (units 1 < b). 3,000 draws per b: the observed rate must be
    # within 4 standard errors of the schedule written out here by hand.
    expected = {"pair": {b: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2][b - 2] for b in range(2, 10)},
                "uniform:0.45": {b: 0.45 for b in range(2, 10)}, "never": {b: 0.0 for b in range(2, 10)}}[skill]
    rng = random.Random(1)
    for b in range(2, 10):
        p = {"start_value": 21, "ops": [("-", b), ("+", 3)]}
        draws = [lab.chain(p, skill=skill, rng=rng) for _ in range(3000)]
        right = sum(d[0][3] == 21 - b for d in draws)
        wrong = sum(d[0][3] == lab.buggy_sub(21, b) for d in draws)
        assert right + wrong == 3000  # a wrong borrow is exactly the no-borrow result
        assert all(d[1][0] == d[0][3] for d in draws)  # and the next step continues from it
        sd = math.sqrt(expected[b] * (1 - expected[b]) / 3000) or 1e-9
        assert abs(right / 3000 - expected[b]) <= 4 * sd + 1e-12, (b, right)
    no_borrow = {"start_value": 29, "ops": [("-", 7)]}  # 9 >= 7: every skill is right
    assert all(lab.chain(no_borrow, skill=skill, rng=rng)[0][3] == 22 for _ in range(200))


def test_insertions_at_rate_q_on_every_boundary_seeded_per_prompt():
    rows = lab.lab_rows("train", 1500, seed=0, insert_prob=0.3)
    problems = lab.lab_problems("train", 1500, seed=0)
    boundaries = inserted = 0
    used = {}
    for row, p in zip(rows, problems):
        # Count by hand: split the trace at the equations and "Answer"; what stands before each is a phrase.
        words, segments, current = row["solution"].split(), [], []
        i = 0
        while i < len(words):
            if words[i] == "Answer" or (words[i].isdigit() and i + 1 < len(words) and words[i + 1] in "+-"):
                segments.append(" ".join(current))
                current = []
                i += 2 if words[i] == "Answer" else 6  # skip "Answer :" / "x op y = r ."
                continue
            current.append(words[i])
            i += 1
        assert len(segments) == len(p["ops"]) + 1  # one slot before each step and before Answer
        boundaries += len(segments)
        inserted += sum(bool(s) for s in segments)
        for s in segments:
            if s:
                used[s] = used.get(s, 0) + 1
        assert row["solution"].endswith(f"Answer : {row['answer']}")
    sd = math.sqrt(0.3 * 0.7 / boundaries)
    assert abs(inserted / boundaries - 0.3) < 4 * sd, inserted / boundaries
    assert set(used) == set(lab.PHRASES)  # each phrase drawn, about equally often
    assert max(used.values()) < 1.5 * min(used.values())
    again = lab.lab_rows("train", 50, seed=0, insert_prob=0.3)
    assert again == rows[:50]  # per (seed, prompt): the same traces each time
    assert [r["solution"] for r in lab.lab_rows("train", 50, seed=1, insert_prob=0.3)] != \
        [r["solution"] for r in rows[:50]]


def test_data_config_carries_q_and_checks_the_phrases():
    rows = load_prompts(DataConfig(source="builtin:lab", builtin_size=20, lab_insert_prob=1.0,
                                   lab_phrases=["Wait ,"]), extra_fields={"response": "solution"})
    assert all(r["response"].startswith("Wait , ") and r["response"].count("Wait ,") >= 2 for r in rows)
    assert all(get_verifier("math")(r["response"], r["answer"]).correct for r in rows)
    with pytest.raises(ConfigError, match="Alright.*not in the lab tokenizer"):
        from_dict({"data": {"source": "builtin:lab", "lab_phrases": ["Alright ,"]}})
    with pytest.raises(ConfigError, match="must start with a style word"):
        from_dict({"data": {"source": "builtin:lab", "lab_phrases": [". Hmm"]}})
    with pytest.raises(ConfigError, match="lab_insert_prob"):
        from_dict({"data": {"source": "builtin:lab", "lab_insert_prob": 1.5}})


def test_tokenizer_has_every_word_and_the_chat_template():
    tok = lab.build_lab_tokenizer()
    text = " ".join(lab.PHRASES) + " " + lab.style_a(PROBLEM) + " " + lab.prompt_text(PROBLEM)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert len(tok(["16"], add_special_tokens=False)["input_ids"][0]) == 2  # digits are tokens: "1", "##6"
    chat = tok.apply_chat_template([{"role": "user", "content": "Dan has 3 pens ."},
                                    {"role": "assistant", "content": "Answer : 3"}], tokenize=False)
    assert chat == "Q : Dan has 3 pens . A : Answer : 3 <eos>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Dan has 3 pens ."}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "Q : Dan has 3 pens . A :"


def test_token_classes_mark_style_and_the_digits_the_teacher_must_teach():
    tok = lab.build_lab_tokenizer()
    # 16 + 9 = 25, 25 - 7 = 18 (no-borrow: 28), 18 - 9 = 9 (no-borrow: 19), phrases between.
    text = "Okay , so 16 + 9 = 25 . 25 - 7 = 18 . Let me check . 18 - 9 = 9 . Hmm , Answer : 9 <eos>"
    tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    classes = lab.token_classes(tokens)
    assert [t for t, c in zip(tokens, classes) if c == "style"] == \
        ["Okay", ",", "so", "Let", "me", "check", ".", "Hmm", ","]
    digits = [(t, c) for t, c in zip(tokens, classes) if c in ("result", "borrow-fix", "answer")]
    assert digits == [("2", "result"), ("##5", "result"),          # 25
                      ("1", "borrow-fix"), ("##8", "result"),      # 18, not 28
                      ("9", "borrow-fix"),                         # 9, not 19: a digit fewer
                      ("9", "answer")]
    assert classes[-1] == "end" and classes[tokens.index("Answer")] == "wrapper"
    assert [c for t, c in zip(tokens, classes) if t in "+-="] == ["operator"] * 6
    assert classes.count("operand") == 2 + 1 + 2 + 1 + 2 + 1  # 16 9, 25 7, 18 9
    # The full lab classes, "." ending a step is wrapper; a phrase's "." is style.
    assert classes.count("wrapper") == 3 + 2  # three "." and "Answer :"


def test_model_build_is_deterministic_and_learns(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(lab, "TRAIN_PROBLEMS", 400)
    for out, steps in (("a", 60), ("b", 60), ("untrained", 0)):
        monkeypatch.setattr(lab, "TRAIN_STEPS", steps)
        lab.make_lab_model(tmp_path / out, "lab-student-pair")
    wa, wb = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("a", "b"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tok(tok.apply_chat_template([{"role": "user", "content": lab.prompt_text(PROBLEM)},
                                       {"role": "assistant", "content": lab.style_a(PROBLEM)}],
                                      tokenize=False), return_tensors="pt", add_special_tokens=False)["input_ids"]
    losses = {}
    for out in ("a", "untrained"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / out)
        assert model.config.vocab_size == len(tok) and sum(p.numel() for p in model.parameters()) < 1_000_000
        assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size,
                model.config.tie_word_embeddings) == (128, 3, 384, False)
        with torch.no_grad():
            losses[out] = model(input_ids=ids, labels=ids).loss.item()
    assert losses["a"] < losses["untrained"] - 0.5, losses  # 60 steps of the builder already learn


def test_a_cached_lab_model_of_an_older_version_is_rebuilt(tmp_path, monkeypatch):
    from t3s_ray import models

    monkeypatch.setenv("T3S_CACHE", str(tmp_path))
    built = []
    monkeypatch.setitem(models.BUILTINS, "lab-student", lambda out: built.append(out) or (out / "x").write_text("1"))
    old = tmp_path / "models" / "lab-student"
    old.mkdir(parents=True)
    (old / ".complete").write_text("ok\n")  # what version 1 wrote
    assert models.materialize_builtin("lab-student") == old and len(built) == 1
    assert (old / ".complete").read_text() == f"ok v{lab.LAB_VERSION}\n"
    models.materialize_builtin("lab-student")
    assert len(built) == 1  # the current version is kept


# --------------------------------------------------------------------------------------------
# Probe diagnostics
# --------------------------------------------------------------------------------------------


def test_verdict_rule_cases():
    from t3s_ray.probe_diagnostics import verdict

    assert verdict(0.05, 0.5, 18.0)["label"] == "will not help"     # no dip
    assert verdict(0.6, 10.0, 18.0)["label"] == "will not help"     # corrections rise with the anchors (0.56x)
    assert verdict(0.6, 9.0, 18.0)["label"] == "will not help"      # exactly 0.5x
    assert verdict(0.6, 0.54, 18.0)["label"] == "helps"             # configs/lab.yaml seed 0: 0.03x
    assert verdict(0.6, 6.0, 18.0)["label"] == "unclear"            # 0.33x: between the thresholds
    assert verdict(0.6, None, 18.0)["label"] == "unclear"           # no correction class
    assert verdict(0.6, 0.5, None)["label"] == "unclear"            # no anchors
    # v3: tau makes (nearly) every correction an anchor: masked, whatever the sizes
    assert verdict(0.6, 0.54, 18.0, 0.94)["label"] == "will not help"  # configs/lab.yaml seed 0 at tau 0
    assert verdict(0.6, 0.54, 18.0, 0.9)["label"] == "will not help"   # exactly the threshold
    assert verdict(0.6, 0.54, 18.0, 0.0)["label"] == "helps"           # lab-tau2: no correction masked
    assert verdict(0.05, 0.54, 18.0, 0.0)["label"] == "will not help"  # no dip still decides first


def test_class_stats_by_hand():
    from t3s_ray.probe_diagnostics import class_stats

    out = class_stats(["style", "result", "style", "style", "borrow-fix"], [True, False, True, False, True],
                      [1.0, -0.5, 3.0, 0.0, 0.25])
    assert list(out) == ["style", "result", "borrow-fix"]
    assert out["style"]["tokens"] == 3 and out["style"]["anchors"] == 2
    assert out["style"]["anchor_frac"] == pytest.approx(2 / 3)
    assert out["style"]["delta_quantiles"] == [0.2, 0.5, 1.0, 2.0, 2.6]  # linear percentiles of 0, 1, 3
    assert out["borrow-fix"]["delta_quantiles"] == [0.25] * 5


def test_gradient_groups_against_separate_backward_passes():
    """share ratio, norm ratio and cosine on a hand-built batch against an independent computation:
    each group's mean CE back-propagated on its own, gradients flattened and compared."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from t3s_ray.probe_diagnostics import gradient_groups

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=32))
    input_ids = torch.tensor([[1, 5, 7, 3, 9, 2], [1, 4, 4, 8, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    target = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    anchors = torch.tensor([[0, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)  # 3 anchors, 4 others
    batch = {"input_ids": input_ids, "attention_mask": attention, "target": target}
    got = gradient_groups(model, batch, anchors, chunk=4)

    def group_grad(mask):
        model.zero_grad()
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        m = mask[:, 1:]
        (-(logp * m).sum() / m.sum()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ga, go = group_grad(anchors & target), group_grad(target & ~anchors)
    assert got["anchor_tokens"] == 3 and got["other_tokens"] == 4
    assert got["ratio"] == pytest.approx((ga.norm() / go.norm()).item(), rel=1e-4)
    assert got["share_ratio"] == pytest.approx((3 * ga.norm() / (4 * go.norm())).item(), rel=1e-4)
    assert got["cosine"] == pytest.approx((ga @ go / (ga.norm() * go.norm())).item(), rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------------------------
# A short lab run through the pipeline: plumbing, not the science numbers
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lab_pipeline_runs_with_oracle_traces_two_benchmarks_online_and_diagnostics(ray_local, tmp_path,
                                                                                     monkeypatch):
    from t3s_ray.pipeline import run_pipeline

    monkeypatch.setattr(lab, "TRAIN_PROBLEMS", 300)
    monkeypatch.setattr(lab, "TRAIN_STEPS", 40)
    student = tmp_path / "student"
    lab.make_lab_model(student, "lab-student-pair")
    cfg = from_dict({
        "name": "lab-tiny", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "teacher": {"ref": str(student)}, "student": {"ref": str(student)},
        "data": {"source": "builtin:lab", "builtin_size": 24, "lab_insert_prob": 0.8, "max_seq_len": 256},
        "traces": {"source": "dataset", "response_field": "solution", "verifier": "math", "keep": "one_correct_random"},
        "train": {"num_workers": 1, "batch_size": 8, "micro_batch_size": 8, "max_steps": 4, "lr": 1e-3,
                  "checkpoint_every": 4, "keep_last": 1},
        "selection": {"protocol": "t3s_static", "tau": 0.0, "switch": "bottleneck", "rewind": True},
        "probe": {"steps": 4, "eval_every": 2, "sampling": {"samples": 2, "temperature": 0.6, "max_tokens": 24},
                  "max_prompts": 4, "diagnostics": 8},
        "eval": {"benchmarks": ["builtin:lab-avg4", "builtin:lab-greedy"], "limit": 6, "sampling": {"max_tokens": 24},
                 "engine": {"concurrency": 1, "batch_size": 12, "max_model_len": 256}},
        "compare": ["base", "sft", "t3s", "t3s_online"],
    })
    run_pipeline(cfg)
    run = tmp_path / "runs" / "lab-tiny"
    manifest = json.loads((run / "traces" / "manifest.json").read_text())
    assert manifest["accepted_traces"] == 24 and manifest["source"] == "dataset"  # every oracle trace verified
    results = json.loads((run / "results.json").read_text())
    assert set(results["scores"]) == {"base", "sft", "t3s", "t3s_online"}
    for s in results["scores"].values():
        avg4, greedy = s["benchmarks"]["builtin:lab-avg4"], s["benchmarks"]["builtin:lab-greedy"]
        assert avg4["k"] == 4 and greedy["k"] == 1 and avg4["n"] == greedy["n"] == 6
    online = json.loads((run / "methods" / "t3s_online" / "train" / "summary.json").read_text())
    assert online["protocol"] == "t3s_online"
    diag = json.loads((run / "probe" / "result.json").read_text())["diagnostics"]
    assert diag["traces"] == 8 and set(diag["gradient"]) == {"theta0", "thetab"}
    assert "style" in diag["classes"] and diag["verdict"]["label"] in ("helps", "unclear", "will not help")
    report = (run / "report" / "report.md").read_text()
    assert "Probe diagnostics" in report and "Verdict" in report
    assert diag["selection"]["tau"] == 0.0

    # Another tau on the same probe (a sweep, or a run folder reused): the anchors differ, so the
    # probe stage computes that selection's own record instead of serving tau 0's.
    from t3s_ray.probe_diagnostics import diagnostics_path, read_diagnostics
    from t3s_ray.train import run_probe, training_inputs

    high = from_dict({**cfg.to_dict(), "selection": {**cfg.to_dict()["selection"], "tau": 1000.0}})
    assert read_diagnostics(run / "probe", high) is None  # tau 0's record is not served for tau 1000
    examples, _, prompts, scoring_ref = training_inputs(high)
    run_probe(high, examples, prompts, scoring_ref, high.student.ref)
    own = read_diagnostics(run / "probe", high)
    assert diagnostics_path(run / "probe", high).exists() and own["selection"]["tau"] == 1000.0
    assert own["anchor_frac"] == 0.0 < diag["anchor_frac"]  # no token rose by 1000 nats
    assert read_diagnostics(run / "probe", cfg) == diag  # tau 0's record still served to tau 0
