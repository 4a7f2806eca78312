"""Prompt datasets and tokenisation of (prompt, response) pairs with response masks.

Rows are plain dicts ``{"id": str, "prompt": str | list[message], "answer": str | None, ...}``.
Sources: ``builtin:arith`` (offline arithmetic word problems), local ``.jsonl`` / ``.json`` /
``.parquet`` files, or a Hugging Face dataset id. Bad input (a missing column, an empty prompt, a
duplicate id, an unreadable line) raises ``DataError`` naming the file and the rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .config import DataConfig
from .errors import DataError

ARITH_SOURCE = "builtin:arith"
LAB_SOURCE = "builtin:lab"  # the imitation-shock lab's problems (t3s_ray/lab.py)


# --------------------------------------------------------------------------------------------
# The offline arithmetic benchmark
# --------------------------------------------------------------------------------------------

_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Eva", "Ken", "Zoe"]
_ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards"]


def _arith_problem(rng: random.Random, steps: int, max_value: int) -> tuple[str, int, str]:
    """One word problem with ``steps`` additions/subtractions (the total never goes negative),
    its answer, and a worked solution ending in "The answer is N." (a reference trace)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, max_value)
    sentences = [f"{name} has {total} {item}."]
    work = [f"{name} starts with {total} {item}."]
    for _ in range(steps):
        if total > 1 and rng.random() < 0.4:
            n = rng.randint(1, total - 1)
            work.append(f"After giving away {n}: {total} - {n} = {total - n}.")
            total -= n
            sentences.append(f"{name} gives away {n} {item}.")
        else:
            n = rng.randint(1, max_value)
            work.append(f"After getting {n} more: {total} + {n} = {total + n}.")
            total += n
            sentences.append(f"{name} gets {n} more {item}.")
    sentences.append(f"How many {item} does {name} have now?")
    work.append(f"The answer is {total}.")
    return " ".join(sentences), total, " ".join(work)


def _arith_split_of(text: str) -> str:
    """Split by a hash of the problem text, so train and test are disjoint whatever their sizes."""
    return "test" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 4 == 0 else "train"


def arith_rows(split: str, size: int, seed: int = 0, steps: int = 1, max_value: int = 20) -> list[dict[str, Any]]:
    """``size`` distinct problems of one split of ``builtin:arith`` (deterministic for a seed)."""
    if split not in ("train", "test"):
        raise DataError(f"{ARITH_SOURCE}: split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"arith-{seed}-{steps}-{max_value}")
    rows, seen = [], set()
    attempts = 0
    while len(rows) < size:
        attempts += 1
        if attempts > 200 * size + 10_000:
            raise DataError(f"{ARITH_SOURCE}: cannot draw {size} distinct {split} problems "
                            f"with steps={steps}, max_value={max_value}")
        text, answer, solution = _arith_problem(rng, steps, max_value)
        if text in seen or _arith_split_of(text) != split:
            continue
        seen.add(text)
        rows.append({"id": f"arith-{split}-{len(rows):05d}", "prompt": text, "answer": str(answer),
                     "solution": solution})
    return rows


# --------------------------------------------------------------------------------------------
# Reading and validating prompt datasets
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_records(source: str, split: str = "train", subset: str | None = None) -> list[dict[str, Any]]:
    """Raw rows of a local file or a hub dataset (no column mapping yet)."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"dataset file not found: {source}")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            return data
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        raise DataError(f"{path}: unsupported dataset file type (use .jsonl, .json or .parquet)")
    import datasets

    try:
        ds = datasets.load_dataset(source, subset, split=split)
    except Exception as e:  # the hub client raises many types; name the dataset either way
        raise DataError(f"could not load dataset '{source}' (split {split!r}): {type(e).__name__}: {e}") from None
    return [dict(r) for r in ds]


def _listing(items: Iterable[Any], limit: int = 10) -> str:
    items = list(items)
    head = ", ".join(str(i) for i in items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _is_empty_prompt(prompt: Any) -> bool:
    if prompt is None:
        return True
    if isinstance(prompt, str):
        return not prompt.strip()
    if isinstance(prompt, list):
        return not prompt or not any(str(m.get("content", "")).strip() for m in prompt if isinstance(m, dict))
    return False


def normalize_rows(records: list[dict[str, Any]], *, source: str, id_field: str | None, prompt_field: str,
                   answer_field: str | None, extra_fields: dict[str, str] | None = None,
                   on_empty: str = "raise") -> list[dict[str, Any]]:
    """Map columns to ``id`` / ``prompt`` / ``answer`` (+ extras) and check the rows.

    ``on_empty="keep"`` passes empty prompts through (the trace stage records them as errors and
    goes on); the default raises. Missing columns and duplicate ids always raise.
    """
    extra_fields = extra_fields or {}
    if records:
        columns = set().union(*(r.keys() for r in records[:100]))
        wanted = [c for c in [id_field, prompt_field, answer_field, *extra_fields.values()] if c]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DataError(f"{source}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                            f"columns present: {', '.join(sorted(map(str, columns)))}")
    rows, empty, bad_type = [], [], []
    ids: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        rid = str(rec.get(id_field)) if id_field and rec.get(id_field) is not None else str(i)
        prompt = rec.get(prompt_field)
        if _is_empty_prompt(prompt):
            empty.append(f"row {i} (id {rid})")
        elif not isinstance(prompt, (str, list)):
            bad_type.append(f"row {i} (id {rid}): {type(prompt).__name__}")
        ids.setdefault(rid, []).append(i)
        row = {"id": rid, "prompt": prompt,
               "answer": None if not answer_field or rec.get(answer_field) is None else str(rec.get(answer_field))}
        for name, column in extra_fields.items():
            row[name] = rec.get(column)
        rows.append(row)
    if empty and on_empty == "raise":
        raise DataError(f"{source}: empty prompt in column '{prompt_field}' at {_listing(empty)}")
    if bad_type:
        raise DataError(f"{source}: prompt column '{prompt_field}' must hold text or chat messages: {_listing(bad_type)}")
    dups = {rid: rows_ for rid, rows_ in ids.items() if len(rows_) > 1}
    if dups:
        raise DataError(f"{source}: duplicate id(s) in column '{id_field}': "
                        + _listing(f"{rid!r} at rows {r}" for rid, r in dups.items()))
    return rows


def load_prompts(cfg: DataConfig, split: str | None = None, extra_fields: dict[str, str] | None = None,
                 on_empty: str = "raise") -> list[dict[str, Any]]:
    """The prompt rows a config names, checked, with ``data.prompt_suffix`` applied and ``limit`` taken."""
    split = split or cfg.split
    if cfg.source in (ARITH_SOURCE, LAB_SOURCE):
        if cfg.source == ARITH_SOURCE:
            rows = arith_rows(split, cfg.limit or cfg.builtin_size, seed=cfg.builtin_seed, steps=cfg.builtin_steps)
        else:
            from .lab import lab_rows

            rows = lab_rows(split, cfg.limit or cfg.builtin_size, seed=cfg.builtin_seed,
                            insert_prob=cfg.lab_insert_prob, phrases=cfg.lab_phrases)
        unknown = [c for c in (extra_fields or {}).values() if c != "solution"]
        if unknown:
            raise DataError(f"{cfg.source} has no column(s) {', '.join(unknown)} (it has: id, prompt, answer, solution)")
        for row in rows:
            solution = row.pop("solution")
            for name in extra_fields or {}:
                row[name] = solution
    else:
        records = read_records(cfg.source, split, cfg.subset)
        rows = normalize_rows(records, source=cfg.source, id_field=cfg.id_field, prompt_field=cfg.prompt_field,
                              answer_field=cfg.answer_field, extra_fields=extra_fields, on_empty=on_empty)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if cfg.prompt_suffix:
        for row in rows:
            if _is_empty_prompt(row["prompt"]):
                continue
            if isinstance(row["prompt"], str):
                row["prompt"] = row["prompt"] + cfg.prompt_suffix
            else:
                msgs = [dict(m) for m in row["prompt"]]
                last_user = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
                msgs[last_user]["content"] = msgs[last_user]["content"] + cfg.prompt_suffix
                row["prompt"] = msgs
    return rows


# --------------------------------------------------------------------------------------------
# Chat rendering and tokenisation with response masks
# --------------------------------------------------------------------------------------------


def to_messages(prompt: str | list[dict[str, str]], system_prompt: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def render_prompt(tokenizer, prompt: str | list[dict[str, str]], *, system_prompt: str | None = None,
                  chat_template: bool = True) -> str:
    """The text a model is asked to continue: the chat template's generation prompt, or the raw prompt."""
    if chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(to_messages(prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    if isinstance(prompt, list):
        return "\n".join(m["content"] for m in prompt)
    return prompt


@dataclass
class TokenizedPair:
    """Token ids of a full (prompt, response) conversation and which of them are response targets."""

    input_ids: list[int]
    response_mask: list[bool]

    @property
    def num_response_tokens(self) -> int:
        return sum(self.response_mask)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_pair(tokenizer, prompt: str | list[dict[str, str]], response: str, *, system_prompt: str | None = None,
                  chat_template: bool = True) -> TokenizedPair:
    """Tokenise prompt + response as the student's template renders them, marking response tokens.

    The mask comes from the rendered text, not from tokenising the pieces separately: the response
    starts where the full conversation's text departs from the generation prompt. This stays right
    for templates that rewrite turns (Qwen3 moves reasoning into ``<think>`` blocks and drops it from
    earlier turns), and for tokens that merge across the boundary (counted as response tokens).
    """
    if chat_template and tokenizer.chat_template:
        msgs = to_messages(prompt, system_prompt)
        prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}],
                                                  tokenize=False)
    else:
        prompt_text = render_prompt(tokenizer, prompt, chat_template=False)
        full_text = prompt_text + response + (tokenizer.eos_token or "")
    boundary = _common_prefix_len(prompt_text, full_text)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [end > boundary for _, end in enc["offset_mapping"]]
    if mask and mask[0]:
        mask[0] = False  # the first token has no context to be predicted from
    return TokenizedPair(input_ids=list(enc["input_ids"]), response_mask=mask)


def trace_prompt(trace: dict[str, Any]):
    """A stored trace's prompt: text, or the message list it was stored as (JSON)."""
    return json.loads(trace["prompt"]) if trace.get("prompt_format") == "messages" else trace["prompt"]


def tokenize_traces(traces: list[dict[str, Any]], tokenizer, *, system_prompt: str | None, chat_template: bool,
                    max_seq_len: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenise kept traces into training examples; too-long or empty ones are skipped and counted.

    Here rather than in ``train.py`` so that the worker's callers without Ray (``bench/gpu_check.py`` on a
    machine with only torch and transformers) need not import the traces stage (pyarrow).
    """
    import numpy as np

    examples, too_long, empty = [], [], []
    for trace in traces:
        pair = tokenize_pair(tokenizer, trace_prompt(trace), trace["response"], system_prompt=system_prompt,
                             chat_template=chat_template)
        tag = f"{trace['id']}#{trace['sample_index']}"
        if len(pair.input_ids) > max_seq_len:
            too_long.append(f"{tag} ({len(pair.input_ids)} tokens)")
            continue
        if not pair.num_response_tokens:
            empty.append(tag)
            continue
        examples.append({"example_id": len(examples), "trace": tag, "prompt_id": trace["id"],
                         "input_ids": np.asarray(pair.input_ids, dtype=np.int64),
                         "target_mask": np.asarray(pair.response_mask, dtype=bool)})
    skipped = {"too_long": too_long, "no_response_tokens": empty}
    if too_long:
        print(f"[train] skipped {len(too_long)} traces longer than data.max_seq_len={max_seq_len}: "
              f"{', '.join(too_long[:5])}{' ...' if len(too_long) > 5 else ''}", file=sys.stderr, flush=True)
    return examples, skipped


def token_classes(tokens: list[str], source: str, phrases=None) -> list[str]:
    """A class per response token (the tokenizer's token strings) of a trace of ``source``'s data: the
    lab's own classes (``lab.token_classes``: style, wrapper, operand, result, borrow-fix, ...;
    ``phrases``: the inserted ones, default the lab's) for its problems, else digit / punctuation /
    word / special. The report's and the probe diagnostics' anchor statistics are per class."""
    if source == LAB_SOURCE:
        from .lab import PHRASES
        from .lab import token_classes as lab_classes

        return lab_classes(tokens, phrases or PHRASES)
    out = []
    for t in tokens:
        text = t.lstrip("Ġ▁#").strip()
        if t.startswith(("<", "[")) and t.endswith((">", "]")):
            out.append("special")
        elif text.isdigit():
            out.append("digit")
        elif not text or not any(ch.isalnum() for ch in text):
            out.append("punctuation/space")
        else:
            out.append("word")
    return out
