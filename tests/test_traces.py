"""Stage 1 end to end on a builtin tiny model through Ray Data (hf backend, 2 engine actors)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from t3s_ray import config
from t3s_ray.traces import SAMPLE_SCHEMA, TRACE_SCHEMA, choose_kept, load_traces, read_shards, run_traces

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **sections) -> Path:
    data = {
        "name": "tiny", "output_dir": str(tmp_path / "runs"),
        "ray": {"num_cpus": 2},
        "teacher": {"ref": "builtin:tiny-llama"},
        "student": {"ref": "builtin:tiny-llama"},
        "data": {"source": "builtin:arith", "builtin_size": 10},
        "traces": {"backend": "hf", "concurrency": 2, "batch_size": 4, "samples_per_prompt": 2, "max_tokens": 6,
                   "max_model_len": 256, "keep": "all", "verifier": "math"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sample_ids(run_dir: Path) -> list[str]:
    return read_shards(run_dir / "traces" / "samples", columns=["id"]).column("id").to_pylist()


def test_hf_traces_end_to_end(ray_local, tmp_path):
    cfg = config.load(tiny_config(tmp_path, traces={"topk_logprobs": 3}))
    manifest = run_traces(cfg)
    out = cfg.run_dir / "traces"
    assert manifest["prompts_finished"] == 10 and manifest["samples"] == 20
    assert manifest["accepted_traces"] == 20  # keep: all
    assert json.loads((out / "manifest.json").read_text())["generated_tokens"] == manifest["generated_tokens"] > 0
    traces = load_traces(cfg.run_dir)
    assert len(traces) == 20
    assert pq.read_schema(next((out / "traces").glob("*.parquet"))).names == TRACE_SCHEMA.names
    assert pq.read_schema(next((out / "samples").glob("*.parquet"))).names == SAMPLE_SCHEMA.names
    for tr in traces:
        assert 1 <= len(tr["token_ids"]) <= 6 and len(tr["logprobs"]) == len(tr["token_ids"])
        assert all(lp <= 0 for lp in tr["logprobs"])
        assert len(tr["topk_ids"]) == len(tr["token_ids"]) and all(len(k) == 3 for k in tr["topk_ids"])
        # The sampled token's log-prob never beats the top-1 alternative.
        assert all(lp <= top[0] + 1e-3 for lp, top in zip(tr["logprobs"], tr["topk_logprobs"]))
        assert tr["prompt_text"].startswith("<|im_start|>user\n") and tr["teacher"] == "builtin:tiny-llama"
    # Rerunning the same command finds everything finished and generates nothing.
    again = run_traces(cfg)
    assert again["this_run"]["prompts"] == 0 and again["samples"] == 20
    ids = sample_ids(cfg.run_dir)
    assert len(ids) == 20 and all(ids.count(i) == 2 for i in set(ids))


def test_actor_plan_starts_no_idle_actor():
    from t3s_ray.generate import actor_plan

    assert actor_plan(6, 2, 8) == 1     # one batch: one actor (a second would only load the model)
    assert actor_plan(78, 2, 8) == 2    # enough batches: the configured concurrency
    assert actor_plan(1, 4, 8) == 1
    assert actor_plan(10, 2, 5) == 2
    assert actor_plan(17, 4, 8) == 3    # three batches, three actors


def test_keep_policies():
    samples = [{"sample_index": i, "correct": c, "error": None} for i, c in enumerate([False, True, True, False])]
    assert choose_kept(samples, "all", 0, "p") == {0, 1, 2, 3}
    assert choose_kept(samples, "all_correct", 0, "p") == {1, 2}
    picks = {next(iter(choose_kept(samples, "one_correct_random", seed, "p"))) for seed in range(20)}
    assert picks == {1, 2}  # one correct trace, chosen with the seed
    assert choose_kept(samples, "one_correct_random", 3, "p") == choose_kept(samples, "one_correct_random", 3, "p")
    assert choose_kept([{"sample_index": 0, "correct": False}], "one_correct_random", 0, "p") == set()


def test_no_correct_prompts_are_counted_and_listed(ray_local, tmp_path):
    # A random tiny model answers nothing right: every prompt is listed, none silently dropped.
    cfg = config.load(tiny_config(tmp_path, traces={"keep": "one_correct_random"}, data={"builtin_size": 4}))
    m = run_traces(cfg)
    assert m["accepted_traces"] == 0 and m["prompts_finished"] == 4
    assert m["prompts_without_correct"] == 4 and len(m["prompt_ids_without_correct"]) == 4


def test_bad_rows_are_recorded_not_fatal(ray_local, tmp_path):
    rows = [
        {"id": "ok-1", "prompt": "Tom has 2 apples. How many?", "answer": "2"},
        {"id": "empty", "prompt": "   ", "answer": "1"},
        {"id": "too-long", "prompt": "apples " * 400, "answer": "1"},
        {"id": "bad-messages", "prompt": [{"role": "user"}], "answer": "1"},
        {"id": "ok-2", "prompt": [{"role": "user", "content": "Ana has 3 coins."}], "answer": "3"},
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(tiny_config(tmp_path, data={"source": str(src)}))
    m = run_traces(cfg)
    errors = {e["id"]: e["reason"] for e in map(json.loads, (cfg.run_dir / "traces" / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"empty", "too-long", "bad-messages"}
    assert errors["empty"] == "empty prompt"
    assert "prompt too long" in errors["too-long"] and "max_model_len is 256" in errors["too-long"]
    assert m["errors"] == 3 and sorted(m["error_ids"]) == ["bad-messages", "empty", "too-long"]
    assert sorted(set(sample_ids(cfg.run_dir))) == ["ok-1", "ok-2"]
    # Final errors are not retried, nor written twice, on a rerun.
    run_traces(cfg)
    assert len((cfg.run_dir / "traces" / "errors.jsonl").read_text().splitlines()) == 3


def test_import_traces_from_dataset(tmp_path):
    rows = [{"id": "a", "prompt": "1+1?", "answer": "2", "trace": "1+1=2. The answer is 2."},
            {"id": "b", "prompt": "2+2?", "answer": "4", "trace": "The answer is 5."},
            {"id": "c", "prompt": "3+3?", "answer": "6", "trace": ""}]
    src = tmp_path / "s1k.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(tiny_config(tmp_path, data={"source": str(src)},
                                  traces={"source": "dataset", "response_field": "trace", "keep": "all_correct"}))
    m = run_traces(cfg)
    assert m["samples"] == 2 and m["accepted_traces"] == 1 and m["error_ids"] == ["c"]
    (kept,) = load_traces(cfg.run_dir)
    assert kept["id"] == "a" and kept["verified"] and kept["teacher"].startswith("dataset:")


@pytest.mark.parametrize("shape", ["sharegpt-jsonl", "openai-parquet"])
def test_import_traces_from_conversations(tmp_path, shape):
    """OpenThoughts / Bespoke-Stratos (ShareGPT ``conversations`` with ``from`` / ``value``) and
    Mixture-of-Thoughts (OpenAI ``messages``, here with a ``reasoning_content``), as they come: the last
    assistant turn is the trace, its reasoning joined in front, verified against the gold answer."""
    import pyarrow as pa

    from t3s_ray.data import tokenize_traces
    from t3s_ray.models import load_tokenizer

    if shape == "sharegpt-jsonl":
        def conv(q, a):
            return [{"from": "system", "value": "Think first."}, {"from": "human", "value": q},
                    {"from": "gpt", "value": a}]
        rows = [{"id": "a", "answer": "42", "conversations": conv("17 + 25?", "<think>17 + 25 = 42</think>\\boxed{42}")},
                {"id": "b", "answer": "5", "conversations": conv("9 - 4?", "\\boxed{6}")},
                {"id": "c", "answer": "1", "conversations": conv("0 + 1?", "")}]
        src = tmp_path / "stratos.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        field, want_a = "conversations", "<think>17 + 25 = 42</think>\\boxed{42}"
    else:
        def conv(q, a, why):
            return [{"role": "user", "content": q}, {"role": "assistant", "content": a, "reasoning_content": why}]
        rows = [{"id": "a", "answer": "42", "messages": conv("17 + 25?", "\\boxed{42}", "17 + 25 = 42")},
                {"id": "b", "answer": "5", "messages": conv("9 - 4?", "\\boxed{6}", "9 - 4 = 6?")},
                {"id": "c", "answer": "1", "messages": [{"role": "user", "content": "0 + 1?"}]}]
        src = tmp_path / "mot.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src)  # messages: a list of structs, every key in every message
        field, want_a = "messages", "<think>\n17 + 25 = 42\n</think>\n\n\\boxed{42}"
    cfg = config.load(tiny_config(tmp_path, student={"ref": "builtin:tiny-qwen3"}, data={"source": str(src)},
                                  traces={"source": "dataset", "messages_field": field, "keep": "all_correct"}))
    m = run_traces(cfg)
    assert m["samples"] == 2 and m["accepted_traces"] == 1 and m["error_ids"] == ["c"]
    (kept,) = load_traces(cfg.run_dir)
    assert kept["id"] == "a" and kept["verified"] and kept["response"] == want_a
    assert kept["prompt_format"] == "messages"
    prompt = json.loads(kept["prompt"])
    assert prompt[-1] == {"role": "user", "content": "17 + 25?"} and all(m["role"] != "assistant" for m in prompt)
    errors = [json.loads(line) for line in (cfg.run_dir / "traces" / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["id"] == "c" and f"no assistant turn with text in column '{field}'" in errors[0]["reason"]
    # Trained on as a generated trace would be: the conversation's turns are context, the answer the target.
    (example,), _ = tokenize_traces([kept], load_tokenizer("builtin:tiny-qwen3"), system_prompt=None,
                                    chat_template=True, max_seq_len=512)
    tok = load_tokenizer("builtin:tiny-qwen3")
    target = tok.decode([t for t, keep in zip(example["input_ids"], example["target_mask"]) if keep])
    assert target == "<think>\n17 + 25 = 42\n</think>\n\n\\boxed{42}<|im_end|>\n"


def test_an_imported_trace_that_hangs_the_math_verifier_is_counted_not_waited_for(tmp_path, monkeypatch):
    from t3s_ray import verify

    monkeypatch.setattr(verify, "MATH_TIMEOUT_S", 1.0)
    rows = [{"id": "a", "prompt": "1+1?", "answer": "2", "trace": "The answer is 2."},
            {"id": "b", "prompt": "huge?", "answer": "1", "trace": "\\boxed{9^{9^{9^{9}}}}"}]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(tiny_config(tmp_path, data={"source": str(src)},
                                  traces={"source": "dataset", "response_field": "trace", "keep": "all"}))
    m = run_traces(cfg)
    assert m["this_run"]["verify_timeouts"] == 1 and m["correct_samples"] == 1 and m["accepted_traces"] == 2
    assert {t["id"]: t["correct"] for t in load_traces(cfg.run_dir)} == {"a": True, "b": False}


def test_s1k_style_import_joins_thinking_and_attempt_and_trains_on_both(tmp_path):
    """The columns of simplescaling/s1K-1.1 (as configs/qwen3-8b-s1k200.yaml reads them), in a local
    parquet file: R1's thinking trajectory and attempt become one trace in Qwen3's thinking layout,
    verified against the gold solution; under a Qwen3-style template the training response covers
    both the thinking and the attempt."""
    import pyarrow as pa

    from t3s_ray.models import load_tokenizer
    from t3s_ray.train import tokenize_traces

    rows = {"question": ["What is 17 + 25?", "What is 3 * 14?", "What is 9 - 4?"],
            "solution": ["$17 + 25 = \\boxed{42}$", "The product is $42$.", "\\boxed{5}"],
            "deepseek_thinking_trajectory": ["Okay, 17 + 25: 17 + 20 = 37, then 37 + 5 = 42.",
                                             "3 * 14 = 3 * 10 + 3 * 4 = 30 + 12 = 42.", "9 - 4 is 6? No, 5."],
            "deepseek_attempt": ["**Answer:** \\boxed{42}", "The answer is \\boxed{42}.", "\\boxed{6}"],
            "gemini_attempt": ["x", "y", "z"]}
    src = tmp_path / "s1k.parquet"
    pq.write_table(pa.table(rows), src)
    cfg = config.load(tiny_config(
        tmp_path, student={"ref": "builtin:tiny-qwen3"},
        data={"source": str(src), "id_field": None, "prompt_field": "question", "answer_field": "solution"},
        traces={"source": "dataset", "response_field": "deepseek_attempt",
                "reasoning_field": "deepseek_thinking_trajectory", "keep": "all_correct", "verifier": "math"}))
    m = run_traces(cfg)
    assert m["samples"] == 3 and m["accepted_traces"] == 2 and m["backend"] == "dataset"
    kept = load_traces(cfg.run_dir)
    assert [t["id"] for t in kept] == ["0", "1"]  # the third attempt answers 6, gold is 5
    assert kept[0]["response"] == ("<think>\nOkay, 17 + 25: 17 + 20 = 37, then 37 + 5 = 42.\n</think>\n\n"
                                   "**Answer:** \\boxed{42}")
    tok = load_tokenizer("builtin:tiny-qwen3")
    examples, _ = tokenize_traces(kept, tok, system_prompt=None, chat_template=True, max_seq_len=512)
    for ex, trace in zip(examples, kept):
        response = tok.decode([t for t, m in zip(ex["input_ids"], ex["target_mask"]) if m])
        thinking, attempt = trace["response"].split("</think>")
        assert thinking.removeprefix("<think>").strip() in response and attempt.strip() in response
        assert "What is" not in response  # the prompt is context, not target


@pytest.mark.slow
def test_killed_run_resumes_with_every_prompt_exactly_once(ray_local, tmp_path):
    # 64 prompts, 16 tokens each, killed at the first written part: with 16 prompts of 6 tokens the whole
    # run once finished between two polls (0.2 s apart), so the kill landed after the end.
    n = 64
    cfg_path = tiny_config(tmp_path, data={"builtin_size": n},
                           traces={"concurrency": 1, "batch_size": 2, "max_tokens": 16})
    script = ("import sys; from t3s_ray import config; from t3s_ray.traces import run_traces; "
              f"run_traces(config.load({str(cfg_path)!r}), flush_every=2)")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    samples_dir = tmp_path / "runs" / "tiny" / "traces" / "samples"
    deadline = time.time() + 240
    while time.time() < deadline and not list(samples_dir.glob("part-*.parquet")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
    proc.wait()
    run_dir = tmp_path / "runs" / "tiny"
    before = sample_ids(run_dir)
    assert 0 < len(set(before)) < n, "kill was meant to land mid-run"
    m = run_traces(config.load(cfg_path))
    after = sample_ids(run_dir)
    assert m["prompts_finished"] == n
    assert sorted(set(after)) == sorted(f"arith-train-{i:05d}" for i in range(n))
    assert len(after) == n * 2  # every prompt's two samples exactly once
    assert len(load_traces(run_dir)) == n * 2


def test_cli_traces_reports_bad_config(tmp_path, capsys):
    from t3s_ray.cli import main

    assert main(["traces", str(tiny_config(tmp_path)), "--set", "traces.backend=tgi"]) == 2
    assert "traces.backend: expected one of 'vllm', 'hf'" in capsys.readouterr().err


def test_traces_are_read_in_one_order_whatever_order_the_shards_hold(tmp_path):
    """Ray Data writes shards as its actors finish, so the same traces land in other orders from run
    to run; training picks examples by position, so it must read them in one order."""
    cfg = config.load(tiny_config(tmp_path, data={"builtin_size": 24}, traces={
        "source": "dataset", "response_field": "solution", "samples_per_prompt": 1}))
    run_traces(cfg)
    folder = cfg.run_dir / "traces" / "traces"
    before = load_traces(cfg.run_dir)
    assert [(t["id"], t["sample_index"]) for t in before] == sorted((t["id"], t["sample_index"]) for t in before)
    shards = sorted(folder.glob("part-*.parquet"))
    assert len(shards) >= 2
    tables = [pq.read_table(p) for p in shards]
    for path, table in zip(shards, tables):  # the rows of each shard reversed
        pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), path)
    assert load_traces(cfg.run_dir) == before
