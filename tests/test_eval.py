"""Stage 3: scores against hand values, benchmark definitions, and real evaluations through Ray Data."""

import json
import math
from pathlib import Path

import pytest
import yaml

from t3s_ray import config
from t3s_ray.cli import main as cli_main
from t3s_ray.config import BENCHMARK_PRESETS, BenchmarkConfig, ConfigError, load_benchmark
from t3s_ray.data import DataError, arith_rows
from t3s_ray.evaluate import benchmark_rows, evaluate, format_paired, format_table, paired_table
from t3s_ray.verify import get_verifier, pass_at_k, score_counts

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ scores


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(16, 2, 15) == 1.0  # fewer wrong samples than k: some draw must be correct


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                naive = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(naive, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)


def test_score_counts_on_fixed_verdicts():
    # Three problems, four samples each: 1, 3 and 0 correct; a fourth problem failed to generate.
    counts = [(4, 1), (4, 3), (4, 0), (4, 0)]
    s = score_counts(counts, [1, 2])
    assert s["avg@k"] == pytest.approx((0.25 + 0.75 + 0 + 0) / 4)
    assert s["pass@1"] == pytest.approx(s["avg@k"])  # pass@1 is avg@k when every problem has k samples
    assert s["pass@2"] == pytest.approx((0.5 + (1 - 0 / 6) + 0 + 0) / 4)


def test_format_table_shows_percent_and_mean():
    scores = {"base": {"benchmarks": {"a": {"avg@k": 0.25}, "b": {"avg@k": 0.5}}, "mean": {"avg@k": 0.375}},
              "t3s": {"benchmarks": {"a": {"avg@k": 1.0}}, "mean": {"avg@k": 1.0}}}
    table = format_table(scores, ["a", "b"])
    base_line = next(line for line in table.splitlines() if line.startswith("base"))
    assert base_line.split()[1:] == ["25.0", "50.0", "37.5"]
    assert next(line for line in table.splitlines() if line.startswith("t3s")).split()[1:] == ["100.0", "-", "100.0"]


def test_table_shows_the_interval_and_the_paired_differences():
    ids = [f"p{i}" for i in range(100)]
    sft = {i: float(k < 50) for k, i in enumerate(ids)}          # 50 %
    t3s = {i: float(k < 60) for k, i in enumerate(ids)}          # 60 %: 10 problems better, none worse
    base = {i: float(k % 2 == 0) for k, i in enumerate(ids)}     # 50 %, other problems

    def entry(per):
        from t3s_ray.stats import mean_ci

        spread = mean_ci(list(per.values()))
        return {"benchmarks": {"lab": {"avg@k": spread["mean"], "avg@k_ci95": spread["ci95"], "per_problem": per}},
                "mean": {"avg@k": spread["mean"]}}

    scores = {"base": entry(base), "sft": entry(sft), "t3s": entry(t3s)}
    table = format_table(scores, ["lab"])
    half = 1.96 * (0.24 / 99) ** 0.5 * 100  # t3s: sd of a 60 % Bernoulli sample over 100 problems
    assert f"60.0 ± {half:.1f}" in next(line for line in table.splitlines() if line.startswith("t3s"))
    paired, text = paired_table(scores, ["lab"])
    d = paired["t3s"]["vs_sft"]["lab"]
    assert d["diff"] == pytest.approx(0.10) and (d["wins"], d["losses"]) == (10, 0) and d["p"] < 0.01
    assert paired["t3s"]["vs_base"]["lab"]["wins"] == 30 and "vs_sft" not in paired["sft"]
    assert any(line.split()[:4] == ["t3s", "-", "sft", "lab"] and "+10.0" in line for line in text.splitlines())
    assert format_paired(paired) == text


# ------------------------------------------------------------------ benchmark definitions


@pytest.mark.parametrize("name", list(BENCHMARK_PRESETS))
def test_every_preset_validates(name):
    bench = load_benchmark(name)
    assert bench.name == name and bench.source
    assert config.from_dict({"eval": {"benchmarks": [name]}}).eval.benchmarks == [name]


def test_unknown_benchmark_names_the_entry():
    with pytest.raises(ConfigError, match=r"eval.benchmarks\[1\] is 'aime2024', which is neither a preset"):
        config.from_dict({"eval": {"benchmarks": ["aime24", "aime2024"]}}, "x.yaml")


def test_bad_benchmark_file_names_key_and_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "source": "x.jsonl", "verfier": "math"}))
    with pytest.raises(ConfigError, match=r"unknown key 'verfier' in .*mine.yaml; did you mean 'verifier'"):
        load_benchmark(str(path))


def test_offline_benchmark_is_deterministic_and_disjoint_from_train():
    bench = load_benchmark("builtin:arith")
    rows = benchmark_rows(bench)
    assert len(rows) == bench.size and rows == benchmark_rows(bench)
    assert benchmark_rows(bench, limit=7) == rows[:7]
    train_prompts = {r["prompt"] for r in arith_rows("train", 2000)}
    assert not train_prompts & {r["prompt"] for r in rows}
    assert all(r["answer"].isdigit() for r in rows)
    # a multi-step variant (a benchmark YAML with `steps: 3`) draws other, longer problems
    hard = benchmark_rows(BenchmarkConfig(name="arith3", source="builtin:arith", size=20, steps=3))
    assert [r["prompt"] for r in hard] == [r["prompt"] for r in arith_rows("test", 20, steps=3)]
    assert not {r["prompt"] for r in hard} & {r["prompt"] for r in rows}


def test_missing_answer_column_names_column_and_file(tmp_path):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"id": i, "problem": f"{i}+1?", "solution": str(i + 1)}) + "\n" for i in range(3)))
    bench = BenchmarkConfig(name="mine", source=str(data), split="train")
    with pytest.raises(DataError, match=r"bench.jsonl.*missing column\(s\) 'answer'"):
        benchmark_rows(bench)


def test_choice_benchmark_shuffles_options_and_letters_the_gold(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"qid": f"q{i}", "q": f"Question {i}?", "right": f"yes{i}", "w1": f"no{i}a",
                                        "w2": f"no{i}b", "w3": f"no{i}c"}) + "\n" for i in range(12)))
    bench = BenchmarkConfig(name="mc", source=str(data), split="train", id_field="qid", prompt_field="q",
                            answer_field=None, choice_fields=["right", "w1", "w2", "w3"], verifier="choice",
                            prompt_template="{prompt}\n{choices}\nAnswer:")
    rows = benchmark_rows(bench)
    assert rows == benchmark_rows(bench)
    letters = set()
    for i, row in enumerate(rows):
        shown = {line[0]: line[3:] for line in row["prompt"].splitlines()[1:5]}
        assert shown[row["answer"]] == f"yes{i}"  # the gold letter points at the correct option
        assert sorted(shown.values()) == sorted([f"yes{i}", f"no{i}a", f"no{i}b", f"no{i}c"])
        letters.add(row["answer"])
    assert len(letters) > 1  # shuffled: the correct option is not always A


# ------------------------------------------------------------------ real evaluations


def _run_config(tmp_path, model="builtin:tiny-llama", **eval_section):
    return config.from_dict({
        "name": "ev", "output_dir": str(tmp_path / "runs"), "student": {"ref": model},
        "eval": {"benchmarks": ["builtin:arith"], "samples": 2, "max_tokens": 8, "concurrency": 2, "batch_size": 4,
                 "max_model_len": 512, "limit": 6, "pass_k": [1, 2], **eval_section}})


def _check_outputs(out: Path, scores: dict, problems: int, k: int) -> list[dict]:
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk == scores
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    b = scores["benchmarks"]["builtin:arith"]
    assert b["n"] == problems and b["samples"] == len(lines) == problems * k and b["errors"] == 0
    assert b["tokens"] == sum(line["tokens"] for line in lines) > 0
    assert sorted({(line["id"], line["sample_index"]) for line in lines}) == sorted(
        (r["id"], i) for r in arith_rows("test", problems) for i in range(k))
    # The verdicts in the file are the verifier's, and the scores are computed from them.
    check = get_verifier("math")
    for line in lines:
        assert line["correct"] == check(line["response"], line["answer"]).correct
    per_problem = {}
    for line in lines:
        per_problem.setdefault(line["id"], []).append(line["correct"])
    expected = score_counts([(len(v), sum(v)) for v in per_problem.values()], [1, 2])
    assert b["avg@k"] == pytest.approx(expected["avg@k"]) and b["pass@2"] == pytest.approx(expected["pass@2"])
    assert scores["mean"]["avg@k"] == pytest.approx(b["avg@k"])
    # Per-problem scores and the standard error over problems, computed here by hand.
    fractions = {pid: sum(v) / len(v) for pid, v in per_problem.items()}
    assert b["per_problem"] == pytest.approx(fractions)
    mean = sum(fractions.values()) / len(fractions)
    sd = (sum((x - mean) ** 2 for x in fractions.values()) / (len(fractions) - 1)) ** 0.5
    assert b["avg@k_stderr"] == pytest.approx(sd / len(fractions) ** 0.5)
    assert b["avg@k_ci95"] == pytest.approx([mean - 1.96 * b["avg@k_stderr"], mean + 1.96 * b["avg@k_stderr"]],
                                            abs=1e-3)
    return lines


def test_tiny_model_evaluation_writes_consistent_outputs_and_resumes(ray_local, tmp_path, capsys, monkeypatch):
    cfg = _run_config(tmp_path)
    scores = evaluate(cfg, "builtin:tiny-llama", label="tiny")
    out = cfg.run_dir / "eval" / "tiny"
    _check_outputs(out, scores, problems=6, k=2)
    assert "builtin:arith" in capsys.readouterr().out  # the printed table
    # Rerunning finds the benchmark finished: nothing is generated again.
    import t3s_ray.generate as generate

    def no_generation(*a, **k):
        raise AssertionError("a finished benchmark was evaluated again")

    monkeypatch.setattr(generate, "run_requests", no_generation)
    assert evaluate(cfg, "builtin:tiny-llama", label="tiny") == scores
    # Engine settings are how, not what: the same evaluation.
    assert evaluate(_run_config(tmp_path, concurrency=1, batch_size=2), "builtin:tiny-llama", label="tiny") == scores
    # A changed sampling setting is another evaluation: refused in this folder, never mixed or returned.
    with pytest.raises(config.ConfigError, match=r"eval.max_tokens \(8 -> 9\).*another --label.*--restart eval"):
        evaluate(_run_config(tmp_path, max_tokens=9), "builtin:tiny-llama", label="tiny")
    # Under another label it is evaluated (and here hits the patched generator).
    with pytest.raises(AssertionError, match="evaluated again"):
        evaluate(_run_config(tmp_path, max_tokens=9), "builtin:tiny-llama", label="tiny-9")


@pytest.mark.slow
def test_smollm2_on_the_offline_benchmark(ray_local, tmp_path):
    cfg = _run_config(tmp_path, model="builtin:smollm2-135m-instruct", max_tokens=64, limit=8)
    scores = evaluate(cfg)  # no trained model in this run: the student ref, labelled "base"
    lines = _check_outputs(cfg.run_dir / "eval" / "base", scores, problems=8, k=2)
    assert scores["model"] == "builtin:smollm2-135m-instruct" and scores["label"] == "base"
    assert any(line["extracted_answer"] for line in lines)  # a real model writes parseable answers


def test_cli_eval_reports_bad_input_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"eval": {"benchmarks": ["nope"]}}))
    assert cli_main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert "eval.benchmarks[0] is 'nope', which is neither a preset" in err and "Traceback" not in err


@pytest.mark.slow
def test_vllm_backend_evaluation(ray_local, tmp_path):
    cfg = _run_config(tmp_path, backend="vllm", concurrency=1, limit=3, max_tokens=6)
    scores = evaluate(cfg, "builtin:tiny-llama", label="vllm")
    _check_outputs(cfg.run_dir / "eval" / "vllm", scores, problems=3, k=2)


def test_dllm_student_is_evaluated_with_the_diffusion_sampler(ray_local, tmp_path):
    from t3s_ray.generate import GenerationSpec, prepare_requests
    from t3s_ray.models import load_model, load_tokenizer
    from t3s_ray.t3s.diffusion import diffusion_generate

    cfg = config.from_dict({
        "name": "ev", "output_dir": str(tmp_path / "runs"),
        "student": {"ref": "builtin:tiny-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"},
        # backend vllm is overridden: masked-diffusion models are sampled by the hf backend
        "eval": {"benchmarks": ["builtin:arith"], "samples": 1, "temperature": 0.0, "max_tokens": 6, "limit": 3,
                 "backend": "vllm", "concurrency": 1, "batch_size": 2, "max_model_len": 512,
                 "diffusion_steps": 3, "diffusion_block_length": 3}})
    scores = evaluate(cfg)
    b = scores["benchmarks"]["builtin:arith"]
    assert scores["model"] == "builtin:tiny-dllm" and b["n"] == 3 and b["errors"] == 0 and b["tokens"] > 0
    lines = [json.loads(x) for x in (cfg.run_dir / "eval" / "base" / "samples.jsonl").read_text().splitlines()]
    # Greedy diffusion is deterministic: the same prompts through the sampler directly give the same answers.
    tok = load_tokenizer("builtin:tiny-dllm")
    model = load_model("builtin:tiny-dllm", dtype="float32").eval()
    bench = load_benchmark("builtin:arith")
    spec = GenerationSpec(model_ref="builtin:tiny-dllm", system_prompt=bench.system_prompt, max_model_len=512,
                          max_tokens=6)
    requests, _ = prepare_requests(benchmark_rows(bench, 3), spec, tok)
    by_id = {line["id"]: line for line in lines}
    assert set(by_id) == {r["id"] for r in requests}
    for r in requests:
        ids = tok(r["prompt_text"], add_special_tokens=False)["input_ids"]
        want = diffusion_generate(model, [ids], 6, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id,
                                  eos_ids={tok.eos_token_id}, steps=3, block_length=3)[0]
        assert by_id[r["id"]]["tokens"] == len(want["token_ids"])
        assert by_id[r["id"]]["response"] == tok.decode(want["token_ids"], skip_special_tokens=True)


def test_which_models_are_sampled_by_diffusion(tmp_path):
    from t3s_ray.evaluate import is_diffusion_model

    def run_cfg(student):
        return config.from_dict({"name": "d", "output_dir": str(tmp_path / "runs"), "student": student,
                                 "teacher": {"ref": "builtin:tiny-qwen3"}})

    dllm = run_cfg({"ref": "some-org/remote-code-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"})
    ar = run_cfg({"ref": "builtin:tiny-llama"})
    checkpoint = dllm.run_dir / "methods" / "sft" / "train" / "model"  # a causal-LM-registered dLLM checkpoint
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["RemoteDllmForCausalLM"]}))
    assert is_diffusion_model(dllm, "some-org/remote-code-dllm")  # the student's own ref: by its kind
    assert is_diffusion_model(dllm, str(checkpoint))  # a checkpoint of this dLLM run
    assert not is_diffusion_model(dllm, "builtin:tiny-qwen3")  # its teacher
    assert not is_diffusion_model(dllm, "builtin:tiny-llama")  # its AR selector
    assert not is_diffusion_model(ar, str(checkpoint)) and not is_diffusion_model(ar, "builtin:tiny-llama")
    assert is_diffusion_model(ar, "builtin:tiny-dllm")  # a masked-LM architecture, whatever the run
