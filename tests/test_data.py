import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t3s_ray import data, models
from t3s_ray.config import DataConfig
from t3s_ray.data import DataError


def jsonl(tmp_path, rows, name="prompts.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("steps", [1, 3])
def test_arith_is_deterministic_and_splits_are_disjoint(steps):
    a = data.arith_rows("train", 300, seed=3, steps=steps)
    assert a == data.arith_rows("train", 300, seed=3, steps=steps)
    assert a != data.arith_rows("train", 300, seed=4, steps=steps)
    test = data.arith_rows("test", 300, seed=3, steps=steps)
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in test}
    assert len({r["id"] for r in a}) == 300
    # The gold answer is right: recompute it from the sentences, one per step.
    for row in a[:50]:
        words = row["prompt"].split()
        total, actions = int(words[2]), 0
        for i, w in enumerate(words):
            if w == "gets":
                total, actions = total + int(words[i + 1]), actions + 1
            if w == "away":
                total, actions = total - int(words[i + 1]), actions + 1
            assert total >= 0
        assert actions == steps and str(total) == row["answer"]
        assert row["solution"].endswith(f"The answer is {total}.")


def test_load_prompts_takes_the_arith_steps_from_the_config():
    rows = data.load_prompts(DataConfig(builtin_size=5, builtin_steps=2, builtin_seed=1))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in data.arith_rows("train", 5, seed=1, steps=2)]
    assert all(r["prompt"].count(" more ") + r["prompt"].count(" away ") == 2 for r in rows)


def test_load_prompts_from_jsonl_with_column_mapping(tmp_path):
    p = jsonl(tmp_path, [{"qid": 7, "question": "1+1?", "gold": 2}, {"qid": 8, "question": "2+2?", "gold": 4}])
    cfg = DataConfig(source=str(p), id_field="qid", prompt_field="question", answer_field="gold",
                     prompt_suffix=" Think.")
    rows = data.load_prompts(cfg)
    assert rows == [{"id": "7", "prompt": "1+1? Think.", "answer": "2"}, {"id": "8", "prompt": "2+2? Think.", "answer": "4"}]


def test_load_prompts_parquet_and_chat_messages(tmp_path):
    p = tmp_path / "p.parquet"
    msgs = [{"role": "user", "content": "hi"}]
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": msgs, "answer": "x"}]), p)
    rows = data.load_prompts(DataConfig(source=str(p), prompt_suffix="!"))
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi!"}]


def test_missing_column_names_column_and_file(tmp_path):
    p = jsonl(tmp_path, [{"id": 1, "question": "q"}])
    with pytest.raises(DataError) as e:
        data.load_prompts(DataConfig(source=str(p)))
    msg = str(e.value)
    assert "prompts.jsonl" in msg and "'prompt'" in msg and "'answer'" in msg and "question" in msg


def test_empty_prompts_name_the_rows(tmp_path):
    p = jsonl(tmp_path, [{"id": "a", "prompt": "ok", "answer": 1}, {"id": "b", "prompt": "  ", "answer": 1},
                         {"id": "c", "prompt": None, "answer": 1}])
    with pytest.raises(DataError, match=r"empty prompt in column 'prompt' at row 1 \(id b\), row 2 \(id c\)"):
        data.load_prompts(DataConfig(source=str(p)))


def test_duplicate_ids_name_the_rows(tmp_path):
    p = jsonl(tmp_path, [{"id": "a", "prompt": "x", "answer": 1}, {"id": "b", "prompt": "y", "answer": 1},
                         {"id": "a", "prompt": "z", "answer": 1}])
    with pytest.raises(DataError, match=r"duplicate id\(s\) in column 'id': 'a' at rows \[0, 2\]"):
        data.load_prompts(DataConfig(source=str(p)))


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1, "prompt": "a", "answer": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_prompts(DataConfig(source=str(p)))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        data.load_prompts(DataConfig(source=str(tmp_path / "none.jsonl")))


def response_text(tok, pair):
    return tok.decode([i for i, m in zip(pair.input_ids, pair.response_mask) if m])


def test_response_mask_chatml_template():
    tok = models.load_tokenizer("builtin:tiny-llama")
    pair = data.tokenize_pair(tok, "What is 2+3?", "2 + 3 = 5. The answer is 5.", system_prompt="Be brief.")
    assert response_text(tok, pair) == "2 + 3 = 5. The answer is 5.<|im_end|>\n"
    prompt = tok.decode([i for i, m in zip(pair.input_ids, pair.response_mask) if not m])
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    # The mask is a single contiguous run at the end.
    first = pair.response_mask.index(True)
    assert all(pair.response_mask[first:])


def test_response_mask_qwen3_style_template_rewrites_turns():
    tok = models.load_tokenizer("builtin:tiny-qwen3")
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>old reasoning</think>b"},
              {"role": "user", "content": "c"}]
    pair = data.tokenize_pair(tok, prompt, "<think>add them</think>The answer is 5.")
    # The template rewrote the response into its own think block and dropped the earlier reasoning.
    assert response_text(tok, pair) == "<think>\nadd them\n</think>\n\nThe answer is 5.<|im_end|>\n"
    assert "old reasoning" not in tok.decode(pair.input_ids)
    # A response without reasoning gets the template's empty think block as targets too.
    plain = data.tokenize_pair(tok, "q", "5")
    assert response_text(tok, plain) == "<think>\n\n</think>\n\n5<|im_end|>\n"


def test_response_mask_without_chat_template():
    tok = models.load_tokenizer("builtin:tiny-llama")
    pair = data.tokenize_pair(tok, "Q: 2+3? A:", " 5", chat_template=False)
    assert response_text(tok, pair) == " 5<|im_end|>"
    assert not pair.response_mask[0]
