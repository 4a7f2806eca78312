import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t3s_ray import config, data, models
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
    with pytest.raises(DataError, match=r"data.source: .* is a folder: name its files, or a glob of them"):
        data.load_prompts(DataConfig(source=str(tmp_path)))


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


# ------------------------------------------------------------------ every file shape, through datasets

ROWS = [{"id": "a", "prompt": "1+1?", "answer": "2"}, {"id": "b", "prompt": "2+2?", "answer": "4"},
        {"id": "c", "prompt": "3+3?", "answer": "6"}]


def write_shape(path, rows):
    """``rows`` as a file of the shape its suffix says."""
    import csv

    table = pa.Table.from_pylist(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".arrow":  # the Arrow IPC stream format (what `datasets` itself writes)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ".arrow"])
def test_every_local_file_shape_gives_the_same_rows(tmp_path, suffix):
    path = write_shape(tmp_path / f"prompts{suffix}", ROWS)
    assert data.load_prompts(DataConfig(source=str(path))) == ROWS
    assert data.load_prompts(DataConfig(source=str(path), limit=2)) == ROWS[:2]


def test_globs_and_lists_of_files_read_as_one_dataset_in_order(tmp_path):
    for i, row in enumerate(ROWS):
        write_shape(tmp_path / f"part-{i}.parquet", [row])
    assert data.load_prompts(DataConfig(source=str(tmp_path / "part-*.parquet"))) == ROWS
    listed = [str(tmp_path / "part-2.parquet"), str(tmp_path / "part-[01].parquet")]  # the order listed
    assert data.load_prompts(DataConfig(source="parquet", data_files=listed)) == [ROWS[2], ROWS[0], ROWS[1]]
    write_shape(tmp_path / "more.jsonl", [{"id": "a", "prompt": "again", "answer": "1"}])
    with pytest.raises(DataError, match=r"data.data_files: .*nothing-\*.jsonl matches no file"):
        data.load_prompts(DataConfig(source="json", data_files=[str(tmp_path / "nothing-*.jsonl")]))
    with pytest.raises(DataError, match=r"the files mix formats \(json, parquet\)"):
        data.load_prompts(DataConfig(source="parquet", data_files=[str(tmp_path / "part-0.parquet"),
                                                                   str(tmp_path / "more.jsonl")]))
    with pytest.raises(DataError, match=r"data.source is 'csv' but data.data_files are parquet files"):
        data.load_prompts(DataConfig(source="csv", data_files=str(tmp_path / "part-0.parquet")))
    # Two files, one id twice: the duplicate is named across them.
    with pytest.raises(DataError, match=r"json \(.*more.jsonl, .*x.jsonl\): duplicate id\(s\) in column 'id': 'a' at "
                                        r"rows \[0, 1\]"):
        data.load_prompts(DataConfig(source="json", data_files=[str(tmp_path / "more.jsonl"),
                                                                str(write_shape(tmp_path / "x.jsonl", ROWS))]))


def test_today_s_errors_hold_for_every_shape(tmp_path):
    p = tmp_path / "mixed.jsonl"  # an answer column of numbers and text reads as text, as json.loads did
    p.write_text('{"id": 1, "prompt": "a", "answer": 2}\n\n{"id": 2, "prompt": "b", "answer": "x"}\n')
    assert [r["answer"] for r in data.load_prompts(DataConfig(source=str(p)))] == ["2", "x"]
    p.write_text('{"id": 1, "prompt": "a", "answer": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:2: expected a JSON object per line, got list"):
        data.load_prompts(DataConfig(source=str(p)))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "prompt": "a"},\n {"id": 2 "prompt": "b"}]')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON \(Expecting ',' delimiter at line 2\)"):
        data.load_prompts(DataConfig(source=str(bad)))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk.parquet: not readable as parquet"):
        data.load_prompts(DataConfig(source=str(junk)))
    csv = write_shape(tmp_path / "q.csv", [{"qid": "1", "question": "a"}])
    with pytest.raises(DataError, match=r"q.csv: missing column\(s\) 'id', 'prompt', 'answer'; columns present: qid, "
                                        r"question"):
        data.load_prompts(DataConfig(source=str(csv)))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a.txt: unsupported dataset file type \(use .jsonl, .json, .parquet, .csv or "
                                        r".arrow\)"):
        data.load_prompts(DataConfig(source=str(tmp_path / "a.txt")))


def test_limit_reads_a_bounded_number_of_rows_of_a_large_parquet_file(tmp_path, monkeypatch):
    """``limit: 200`` on a 100,000-row file (one row group, as ``pq.write_table`` writes it): the rows
    the parquet reader hands over are counted where it hands them over."""
    from datasets.packaged_modules.parquet import parquet as reader

    n = 100_000
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(n)], "prompt": [f"{i} + 1?" for i in range(n)],
                             "answer": [str(i + 1) for i in range(n)]}), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    handed_over = []
    original = reader.Parquet._generate_tables

    def counting(self, *args, **kwargs):
        for key, table in original(self, *args, **kwargs):
            handed_over.append(table.num_rows)
            yield key, table

    monkeypatch.setattr(reader.Parquet, "_generate_tables", counting)
    rows = data.load_prompts(DataConfig(source=str(path), limit=200))
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(200)]
    assert sum(handed_over) <= 2 * 200, handed_over  # a batch of 200 and at most one read ahead
    handed_over.clear()
    assert len(data.load_prompts(DataConfig(source=str(path), limit=5000))) == 5000
    assert sum(handed_over) <= 5000 + 2 * data.PARQUET_BATCH_ROWS, sum(handed_over)


class FakeHub:
    """``datasets.load_dataset`` for hub ids, offline: records each call and returns the rows the
    call asks for (a split slice, or a stream)."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, path, name=None, **kwargs):
        import datasets

        self.calls.append({"path": path, "name": name, **kwargs})
        if kwargs.get("streaming"):
            return datasets.Dataset.from_list(self.rows).to_iterable_dataset()
        split = kwargs["split"]
        stop = int(split.split("[:")[1].rstrip("]")) if "[:" in split else None
        return datasets.Dataset.from_list(self.rows[:stop])


def test_a_hub_dataset_gets_its_revision_subset_files_and_limit_up_to_the_call(monkeypatch):
    import datasets

    hub = FakeHub([{"id": str(i), "problem": f"q{i}", "solution": str(i)} for i in range(50)])
    monkeypatch.setattr(datasets, "load_dataset", hub)
    cfg = DataConfig(source="open-r1/OpenR1-Math-220k", subset="default", revision="abc123", limit=5,
                     data_files="data/train-0000*.parquet", prompt_field="problem", answer_field="solution")
    rows = data.load_prompts(cfg)
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert hub.calls == [{"path": "open-r1/OpenR1-Math-220k", "name": "default", "split": "train[:5]",
                          "revision": "abc123", "data_files": "data/train-0000*.parquet"}]
    rows = data.load_prompts(dataclasses.replace(cfg, streaming=True, limit=3))
    assert [r["id"] for r in rows] == ["0", "1", "2"] and hub.calls[-1]["streaming"] is True
    assert hub.calls[-1]["split"] == "train"  # a stream is cut by take(), not sliced
    data.load_prompts(dataclasses.replace(cfg, limit=None))
    assert hub.calls[-1]["split"] == "train"

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load dataset 'org/x' \(subset 'main'\) at revision 'v2' "
                                        r"\(split 'train'\): ConnectionError: offline"):
        data.load_prompts(DataConfig(source="org/x", subset="main", revision="v2"))


def test_data_files_need_a_format_or_a_hub_id():
    from t3s_ray.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="data.data_files needs a format name"):
        from_dict({"data": {"data_files": ["a.jsonl"]}})
    with pytest.raises(ConfigError, match="data.data_files must name at least one file"):
        from_dict({"data": {"source": "json", "data_files": []}})


# ------------------------------------------------------------------ conversations


def test_sharegpt_and_openai_conversations_split_into_prompt_and_trace():
    share = data.Conversation("conversations")
    prompt, response, reasoning = share.split(
        [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "1+1?"},
         {"from": "gpt", "value": "<think>one and one</think>2"}], "x")
    assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    assert (response, reasoning) == ("<think>one and one</think>2", None)  # a think block stays as written
    openai = data.Conversation("messages")
    turns = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A."},
             {"role": "user", "content": "b?"},
             {"role": "assistant", "content": "B.", "reasoning_content": "think about b", "tool_calls": None}]
    prompt, response, reasoning = openai.split(json.dumps(turns), "x")  # JSON text is read too
    assert prompt == [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A."},
                      {"role": "user", "content": "b?"}]
    assert (response, reasoning) == ("B.", "think about b")  # the last assistant turn is the trace
    assert openai.split(turns[:1], "x") == ([{"role": "user", "content": "a?"}], None, None)
    own = data.Conversation("c", role_key="speaker", content_key="text", roles={"Q": "user", "A": "assistant"},
                            reasoning_key="why")
    assert own.split([{"speaker": "Q", "text": "q"}, {"speaker": "A", "text": "a", "why": "w"}], "x") == \
        ([{"role": "user", "content": "q"}], "a", "w")
    with pytest.raises(DataError, match=r"rows.jsonl: row 3 \(id 9\): role 'bot' in column 'c' is none of"):
        own.split([{"speaker": "bot", "text": "q"}], "rows.jsonl: row 3 (id 9)")
    with pytest.raises(DataError, match=r"x: a message of column 'c' lacks its role \('role' or 'from'\) or its text "
                                        r"\('content' or 'value'\); it has: say"):
        data.Conversation("c").split([{"say": "hi"}], "x")
    with pytest.raises(DataError, match=r"x: column 'c' must hold a list of messages, got int"):
        data.Conversation("c").split(3, "x")


# ------------------------------------------------------------------ chat templates of one's own

# Qwen3's switch in small: with enable_thinking false, an empty think block opens each assistant turn.
THINKING_SWITCH = ("{%- set off = enable_thinking is defined and not enable_thinking -%}"
                   "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
                   "{%- if m['role'] == 'assistant' and off -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
                   "{{- m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
                   "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
                   "{%- if off -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}")


def test_a_template_string_or_file_and_its_kwargs_reach_every_rendering(tmp_path):
    from t3s_ray.generate import GenerationSpec, prepare_requests

    tok = models.load_tokenizer("builtin:tiny-llama")
    off = {"enable_thinking": False}
    text = data.render_prompt(tok, "2+3?", chat_template=THINKING_SWITCH, chat_template_kwargs=off)
    assert text == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert data.render_prompt(tok, "2+3?", chat_template=THINKING_SWITCH).endswith("assistant\n")
    template = tmp_path / "switch.jinja"
    template.write_text(THINKING_SWITCH)
    assert data.render_prompt(tok, "2+3?", chat_template=str(template), chat_template_kwargs=off) == text
    # The training pair: the generation prompt (with its empty think block) is context, not target.
    pair = data.tokenize_pair(tok, "2+3?", "5", chat_template=str(template), chat_template_kwargs=off)
    assert response_text(tok, pair) == "5<|im_end|>\n"
    assert tok.decode(pair.input_ids).startswith(text)
    # Traces, the probe and the evaluation render through GenerationSpec.
    spec = GenerationSpec.for_engine(config.EngineConfig(max_model_len=256), "builtin:tiny-llama",
                                     chat_template=THINKING_SWITCH, chat_template_kwargs=off)
    requests, errors = prepare_requests([{"id": "a", "prompt": "2+3?"}], spec, tok)
    assert not errors and requests[0]["prompt_text"] == text
    # A file that is not there is refused when the config loads; one removed later is a DataError.
    with pytest.raises(config.ConfigError, match=r"traces.chat_template 'nope.jinja' is neither true/false, a "
                                                r"template file that exists, nor template text"):
        config.from_dict({"traces": {"chat_template": "nope.jinja"}})
    template.unlink()
    with pytest.raises(DataError, match=r"traces.chat_template: cannot read the template file .*switch.jinja"):
        data.render_prompt(tok, "q", chat_template=str(template))


def test_an_endpoint_gets_the_template_kwargs_only_when_set():
    from t3s_ray.engines.openai import OpenAIRequester

    common = dict(base_url="http://x/v1", model="m", api_key=None, temperature=0.6, top_p=1.0, topk_logprobs=0,
                  threads=1, qps=0, max_retries=0, timeout_s=1, backoff_s=0, request_logprobs=False, send_seed=False)
    row = {"messages": json.dumps([{"role": "user", "content": "q"}]), "max_tokens": 4}
    assert "chat_template_kwargs" not in OpenAIRequester(**common).body(row)
    body = OpenAIRequester(**common, chat_template_kwargs={"enable_thinking": False}).body(row)
    assert body["chat_template_kwargs"] == {"enable_thinking": False}


def test_a_benchmark_reads_its_hub_revision_and_only_the_problems_evaluated(monkeypatch):
    import datasets

    from t3s_ray.config import BenchmarkConfig
    from t3s_ray.evaluate import benchmark_rows

    hub = FakeHub([{"id": str(i), "problem": f"q{i}", "answer": str(i)} for i in range(30)])
    monkeypatch.setattr(datasets, "load_dataset", hub)
    bench = BenchmarkConfig(name="aime", source="org/aime", split="train", revision="r1")
    assert [r["id"] for r in benchmark_rows(bench, limit=4)] == ["0", "1", "2", "3"]
    assert hub.calls == [{"path": "org/aime", "name": None, "split": "train[:4]", "revision": "r1",
                          "data_files": None}]
