"""Prompt datasets and tokenisation of (prompt, response) pairs with response masks.

Rows are plain dicts ``{"id": str, "prompt": str | list[message], "answer": str | None, ...}``.
Sources: ``builtin:arith`` (offline arithmetic word problems), local ``.jsonl`` / ``.json`` /
``.parquet`` / ``.csv`` / ``.arrow`` files (one, a glob, or a list), or a Hugging Face dataset id,
all but the builtins read with ``datasets.load_dataset`` (``read_records``). A row's prompt is a
column, or the turns of a conversation column before its last assistant turn (``Conversation``).
Bad input (a missing column, an empty prompt, a duplicate id, an unreadable line) raises
``DataError`` naming the file and the rows.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import glob
import hashlib
import json
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

from .config import DataConfig, TracesConfig, is_template_text
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


# A local file's format (its suffix, after a compression suffix) -> the ``datasets`` builder that reads it.
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_GLOB = re.compile(r"[*?\[]")
# Rows a streamed parquet file is read in (its row groups otherwise: a whole file written by
# ``pq.write_table`` is one group of up to a million rows, all decoded before the first row is seen).
PARQUET_BATCH_ROWS = 1024


def file_format(path: str | Path) -> str | None:
    """The ``datasets`` builder of a local file by its suffix (``x.jsonl.gz``: json), or None."""
    name = str(path).lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return FILE_FORMATS.get(Path(name).suffix)


def _expand(patterns: list[str], key: str) -> list[Path]:
    """Local files of a list of paths and globs, in the order given (a glob's matches by name)."""
    files: list[Path] = []
    for pattern in patterns:
        if _GLOB.search(pattern):
            found = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                raise DataError(f"{key}: {pattern} matches no file")
            files += found
        else:
            path = Path(pattern).expanduser()
            if path.is_dir():
                raise DataError(f"{key}: {pattern} is a folder: name its files, or a glob of them "
                                f"({Path(pattern) / '*.parquet'})")
            if not path.is_file():
                raise DataError(f"dataset file not found: {pattern}" + (f" ({key})" if key != "data.source" else ""))
            files.append(path)
    return files


def local_files(source: str, data_files: str | list[str] | None = None) -> tuple[str, list[Path]] | None:
    """``(builder, files)`` when the dataset is local files, None for a hub dataset id.

    Local: ``source`` a file path or a glob (``data/part-*.parquet``), or ``source`` a format name
    (``json``, ``parquet``, ``csv``, ``arrow``) with ``data_files``. A hub id with ``data_files``
    reads those files of its repository (the hub's business)."""
    if data_files:
        if source not in set(FILE_FORMATS.values()):
            return None  # files inside a hub repository
        patterns, key = _as_list(data_files), "data.data_files"
    else:
        path = Path(source).expanduser()
        if not (file_format(source) or _GLOB.search(source) or path.exists()):
            return None
        patterns, key = [source], "data.source"
    files = _expand(patterns, key)
    formats = {file_format(p) for p in files}
    unknown = [p for p in files if file_format(p) is None]
    if unknown:
        raise DataError(f"{unknown[0]}: unsupported dataset file type (use .jsonl, .json, .parquet, .csv or .arrow)")
    if len(formats) > 1:
        raise DataError(f"{key}: the files mix formats ({', '.join(sorted(formats))}): read one format at a time")
    builder = formats.pop()
    if data_files and builder != source:
        raise DataError(f"data.source is {source!r} but data.data_files are {builder} files ({files[0].name})")
    return builder, files


def _bad_json_row(files: list[Path]) -> str | None:
    """Where a JSON file first fails to parse as rows (``path:line: ...``): ``datasets`` reports only
    an offset into its read block, which names no file and no line."""
    for path in files:
        if file_format(path) != "json" or path.suffix.lower() not in (".json", ".jsonl"):
            continue  # a compressed file: the reader's own message has to do
        text = path.read_text(errors="replace")
        if path.suffix.lower() == ".json" and text.lstrip().startswith(("[", "{")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                return f"{path}: not valid JSON ({e.msg} at line {e.lineno})"
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                return f"{path}: expected a JSON list of objects"
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{lineno}: not valid JSON ({e.msg})"
            if not isinstance(row, dict):
                return f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
    return None


def _json_rows(files: list[Path], limit: int | None) -> list[dict[str, Any]]:
    """The rows of JSON files (checked by ``_bad_json_row``) as ``json`` reads them, the first ``limit``."""
    rows: list[dict[str, Any]] = []
    for path in files:
        text = path.read_text()
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            rows += json.loads(text)
        else:
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
        if limit is not None and len(rows) >= limit:
            break
    return rows[:limit] if limit is not None else rows


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets`` logs a failed file read as an error before raising it: the raised error becomes
    this module's one-line ``DataError``, so the log line would only repeat it as noise."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _take(ds, limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` rows (all without one) of a streamed dataset, read in batches (decoding
    a batch of columns is ~8x faster than row by row: 1 s for 200k rows)."""
    rows: list[dict[str, Any]] = []
    batches = (ds.take(limit) if limit is not None else ds).iter(batch_size=PARQUET_BATCH_ROWS)
    for batch in batches:
        rows += [dict(zip(batch, values)) for values in zip(*batch.values())]
    # A stream left part-read holds a pyarrow scanner (reference cycles keep it past this function):
    # destroyed at interpreter exit, after Arrow's thread pool, it aborted the process now and then
    # ("terminate called without an active exception", exit 134). Finish it here.
    del batches, ds
    gc.collect()
    return rows


def read_records(source: str, split: str = "train", subset: str | None = None, *,
                 data_files: str | list[str] | None = None, revision: str | None = None,
                 limit: int | None = None, streaming: bool = False) -> list[dict[str, Any]]:
    """Raw rows of local files or a hub dataset (no column mapping yet), through
    ``datasets.load_dataset``; at most ``limit`` of them, cut before any other row becomes a Python
    object.

    Local files (``local_files``) are always streamed: no copy goes to the ``datasets`` cache, and
    ``limit`` stops the reading (a parquet file is read :data:`PARQUET_BATCH_ROWS` rows at a time).
    A hub dataset is downloaded into the cache and ``limit`` is a split slice (``train[:200]``:
    only those rows are read out of the memory-mapped table); with ``streaming`` nothing is cached
    and only the files the first ``limit`` rows need are fetched."""
    import datasets

    local = local_files(source, data_files)
    if local is not None:
        builder, files = local
        options = {"batch_size": min(limit or PARQUET_BATCH_ROWS, PARQUET_BATCH_ROWS)} if builder == "parquet" else {}
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                           streaming=True, **options)
                return _take(ds, limit)
        except Exception as e:  # pyarrow, pandas and datasets raise many types; name the file either way
            where = _bad_json_row(files) if builder == "json" else None
            if builder == "json" and where is None and all(p.suffix.lower() in (".json", ".jsonl") for p in files):
                # Rows json.loads reads that datasets does not (a blank line in a file whose column
                # changes type: its mixed-type path parses each line, blank ones too).
                return _json_rows(files, limit)
            named = files[0] if len(files) == 1 else f"{files[0]} (one of {len(files)} files)"
            raise DataError(where or f"{named}: not readable as {builder} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    what = f"dataset '{source}'" + (f" (subset {subset!r})" if subset else "") + \
        (f" at revision {revision!r}" if revision else "")
    try:
        with _quiet_datasets():
            if streaming:
                ds = datasets.load_dataset(source, subset, split=split, revision=revision, data_files=data_files,
                                           streaming=True)
                return _take(ds, limit)
            sliced = f"{split}[:{limit}]" if limit is not None else split
            return [dict(r) for r in datasets.load_dataset(source, subset, split=sliced, revision=revision,
                                                           data_files=data_files)]
    except Exception as e:  # the hub client raises many types; name the dataset either way
        raise DataError(f"could not load {what} (split {split!r}): {type(e).__name__}: {e}") from None


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


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


# A conversation dataset's role names -> chat roles: ShareGPT's ``human`` / ``gpt``, OpenAI's own.
DEFAULT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# Where an assistant message keeps its reasoning apart from its answer: DeepSeek's API and vLLM's parser.
REASONING_KEYS = ("reasoning_content", "reasoning")


@dataclass(frozen=True)
class Conversation:
    """How a column of conversations (lists of messages) reads as prompt and trace: the last
    assistant turn is the trace (its reasoning, when the message keeps it apart, goes first), the
    turns before it the prompt. ``None`` keys are found: ``role`` or ``from``, ``content`` or
    ``value``, :data:`REASONING_KEYS`; ``roles`` maps the dataset's role names to chat roles
    (default :data:`DEFAULT_ROLES`)."""

    field: str
    role_key: str | None = None
    content_key: str | None = None
    roles: dict[str, str] | None = None
    reasoning_key: str | None = None

    def split(self, messages: Any, where: str) -> tuple[list[dict[str, str]], str | None, str | None]:
        """``(prompt messages, response, reasoning)`` of one row's conversation; response None when
        it has no assistant turn."""
        if isinstance(messages, str):  # some datasets keep the conversation as JSON text
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                pass
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: column '{self.field}' must hold a list of messages, got "
                            f"{type(messages).__name__}")
        roles = self.roles or DEFAULT_ROLES
        turns = []
        for m in messages:
            present = {k for k, v in m.items() if v is not None}
            role_key = self.role_key or ("role" if "role" in present else "from")
            content_key = self.content_key or ("content" if "content" in present else "value")
            if role_key not in present or content_key not in m:
                roles_in = f"'{self.role_key}'" if self.role_key else "'role' or 'from'"
                texts_in = f"'{self.content_key}'" if self.content_key else "'content' or 'value'"
                raise DataError(f"{where}: a message of column '{self.field}' lacks its role ({roles_in}) or its "
                                f"text ({texts_in}); it has: {', '.join(sorted(present))} (set "
                                "traces.message_role_key / traces.message_content_key)")
            role = roles.get(str(m[role_key]))
            if role is None:
                raise DataError(f"{where}: role {m[role_key]!r} in column '{self.field}' is none of "
                                f"{', '.join(sorted(roles))}; map it with traces.message_roles")
            turns.append((role, m.get(content_key), m))
        last = max((i for i, (role, _, _) in enumerate(turns) if role == "assistant"), default=None)
        if last is None:
            return [{"role": r, "content": c or ""} for r, c, _ in turns], None, None
        _, response, message = turns[last]
        keys = [self.reasoning_key] if self.reasoning_key else REASONING_KEYS
        reasoning = next((message[k] for k in keys if isinstance(message.get(k), str) and message[k].strip()), None)
        return [{"role": r, "content": c or ""} for r, c, _ in turns[:last]], response, reasoning


def normalize_rows(records: list[dict[str, Any]], *, source: str, id_field: str | None, prompt_field: str,
                   answer_field: str | None, extra_fields: dict[str, str] | None = None,
                   on_empty: str = "raise", conversation: Conversation | None = None) -> list[dict[str, Any]]:
    """Map columns to ``id`` / ``prompt`` / ``answer`` (+ extras) and check the rows.

    ``on_empty="keep"`` passes empty prompts through (the trace stage records them as errors and
    goes on); the default raises. Missing columns and duplicate ids always raise. With a
    ``conversation``, the prompt, ``response`` and ``reasoning`` come from its column
    (:meth:`Conversation.split`) and ``prompt_field`` is not read.
    """
    extra_fields = extra_fields or {}
    prompt_column = conversation.field if conversation else prompt_field
    if records:
        columns = set().union(*(r.keys() for r in records[:100]))
        wanted = [c for c in [id_field, prompt_column, answer_field, *extra_fields.values()] if c]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DataError(f"{source}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                            f"columns present: {', '.join(sorted(map(str, columns)))}")
    rows, empty, bad_type = [], [], []
    ids: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        rid = str(rec.get(id_field)) if id_field and rec.get(id_field) is not None else str(i)
        if conversation:
            prompt, response, reasoning = conversation.split(rec.get(conversation.field), f"{source}: row {i} (id {rid})")
        else:
            prompt = rec.get(prompt_field)
        if isinstance(prompt, list):  # columnar formats give every message every key of any: drop the empty ones
            prompt = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in prompt]
        if _is_empty_prompt(prompt):
            empty.append(f"row {i} (id {rid})")
        elif not isinstance(prompt, (str, list)):
            bad_type.append(f"row {i} (id {rid}): {type(prompt).__name__}")
        ids.setdefault(rid, []).append(i)
        row = {"id": rid, "prompt": prompt,
               "answer": None if not answer_field or rec.get(answer_field) is None else str(rec.get(answer_field))}
        for name, column in extra_fields.items():
            row[name] = rec.get(column)
        if conversation:
            row["response"], row["reasoning"] = response, reasoning
        rows.append(row)
    if empty and on_empty == "raise":
        raise DataError(f"{source}: empty prompt in column '{prompt_column}' at {_listing(empty)}")
    if bad_type:
        raise DataError(f"{source}: prompt column '{prompt_field}' must hold text or chat messages: {_listing(bad_type)}")
    dups = {rid: rows_ for rid, rows_ in ids.items() if len(rows_) > 1}
    if dups:
        raise DataError(f"{source}: duplicate id(s) in column '{id_field}': "
                        + _listing(f"{rid!r} at rows {r}" for rid, r in dups.items()))
    return rows


def load_prompts(cfg: DataConfig, split: str | None = None, extra_fields: dict[str, str] | None = None,
                 on_empty: str = "raise", conversation: Conversation | None = None) -> list[dict[str, Any]]:
    """The prompt rows a config names, checked, with ``data.prompt_suffix`` applied: the first
    ``limit`` rows, cut before the others are read (``read_records``)."""
    split = split or cfg.split
    if cfg.source in (ARITH_SOURCE, LAB_SOURCE):
        if cfg.source == ARITH_SOURCE:
            rows = arith_rows(split, cfg.limit or cfg.builtin_size, seed=cfg.builtin_seed, steps=cfg.builtin_steps)
        else:
            from .lab import lab_rows

            rows = lab_rows(split, cfg.limit or cfg.builtin_size, seed=cfg.builtin_seed,
                            insert_prob=cfg.lab_insert_prob, phrases=cfg.lab_phrases)
        unknown = [c for c in [*(extra_fields or {}).values(), *([conversation.field] if conversation else [])]
                   if c != "solution"]
        if unknown:
            raise DataError(f"{cfg.source} has no column(s) {', '.join(unknown)} (it has: id, prompt, answer, solution)")
        for row in rows:
            solution = row.pop("solution")
            for name in extra_fields or {}:
                row[name] = solution
    else:
        records = read_records(cfg.source, split, cfg.subset, data_files=cfg.data_files, revision=cfg.revision,
                               limit=cfg.limit, streaming=cfg.streaming)
        where = cfg.source if not cfg.data_files else f"{cfg.source} ({_listing(_as_list(cfg.data_files), 3)})"
        rows = normalize_rows(records, source=where, id_field=cfg.id_field, prompt_field=cfg.prompt_field,
                              answer_field=cfg.answer_field, extra_fields=extra_fields, on_empty=on_empty,
                              conversation=conversation)
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
                last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
                if last_user is not None:
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


ChatTemplate = Union[bool, str]  # traces.chat_template: the model's own (True), none (False), or a template


def template_text(chat_template: ChatTemplate) -> ChatTemplate:
    """``traces.chat_template`` as rendering takes it: a bool, or the template text (a file's
    contents; read once per file and version)."""
    if isinstance(chat_template, bool) or is_template_text(chat_template):
        return chat_template
    path = Path(chat_template).expanduser()
    try:
        return _read_template(str(path), path.stat().st_mtime_ns)
    except OSError as e:
        raise DataError(f"traces.chat_template: cannot read the template file {path}: {e.strerror}") from None


@functools.lru_cache(maxsize=8)
def _read_template(path: str, mtime_ns: int) -> str:
    return Path(path).read_text()


def _apply_template(tokenizer, messages: list[dict[str, str]], chat_template: ChatTemplate,
                    chat_template_kwargs: dict[str, Any] | None, **options: Any) -> str:
    """The one place prompts meet a chat template: the model's own or ``chat_template``'s text,
    with ``chat_template_kwargs`` (Qwen3's ``enable_thinking``) as template variables."""
    template = template_text(chat_template)
    own = {"chat_template": template} if isinstance(template, str) else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, **own, **options, **(chat_template_kwargs or {}))


def uses_template(tokenizer, chat_template: ChatTemplate) -> bool:
    """Whether prompts are rendered with a chat template: one given, or the model's own when it has one."""
    return isinstance(chat_template, str) or bool(chat_template and tokenizer.chat_template)


def chat_options(traces: TracesConfig, evaluation: bool = False) -> dict[str, Any]:
    """``chat_template`` / ``chat_template_kwargs`` for ``render_prompt``, ``tokenize_pair``,
    ``tokenize_traces`` and ``GenerationSpec``, from ``traces.*``: as set for the teacher's traces, the
    student's training pairs and the probe's sampling of train prompts; for an evaluation (of any model)
    each model's own template unless ``traces.chat_template`` names one (``false`` stays a training
    choice), with the same variables."""
    template = traces.chat_template
    if evaluation and not isinstance(template, str):
        template = True
    return {"chat_template": template, "chat_template_kwargs": traces.chat_template_kwargs}


def render_prompt(tokenizer, prompt: str | list[dict[str, str]], *, system_prompt: str | None = None,
                  chat_template: ChatTemplate = True, chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The text a model is asked to continue: the chat template's generation prompt, or the raw prompt."""
    if uses_template(tokenizer, chat_template):
        return _apply_template(tokenizer, to_messages(prompt, system_prompt), chat_template, chat_template_kwargs,
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
                  chat_template: ChatTemplate = True,
                  chat_template_kwargs: dict[str, Any] | None = None) -> TokenizedPair:
    """Tokenise prompt + response as the student's template renders them, marking response tokens.

    The mask comes from the rendered text, not from tokenising the pieces separately: the response
    starts where the full conversation's text departs from the generation prompt. This stays right
    for templates that rewrite turns (Qwen3 moves reasoning into ``<think>`` blocks and drops it from
    earlier turns), and for tokens that merge across the boundary (counted as response tokens).
    """
    if uses_template(tokenizer, chat_template):
        msgs = to_messages(prompt, system_prompt)
        prompt_text = _apply_template(tokenizer, msgs, chat_template, chat_template_kwargs, add_generation_prompt=True)
        full_text = _apply_template(tokenizer, msgs + [{"role": "assistant", "content": response}], chat_template,
                                    chat_template_kwargs)
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


def tokenize_traces(traces: list[dict[str, Any]], tokenizer, *, system_prompt: str | None, chat_template: ChatTemplate,
                    max_seq_len: int, chat_template_kwargs: dict[str, Any] | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenise kept traces into training examples; too-long or empty ones are skipped and counted.

    Here rather than in ``train.py`` so that the worker's callers without Ray (``bench/gpu_check.py`` on a
    machine with only torch and transformers) need not import the traces stage (pyarrow).
    """
    import numpy as np

    examples, too_long, empty = [], [], []
    for trace in traces:
        pair = tokenize_pair(tokenizer, trace_prompt(trace), trace["response"], system_prompt=system_prompt,
                             chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)
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
