"""Stage 1: teacher traces. Sample, verify, keep, and write resumable parquet shards.

Output folder ``<output_dir>/<name>/traces/``::

    samples/part-00000.parquet  every sample of every finished prompt (with ``correct``, ``kept``)
    traces/part-00000.parquet   the kept traces (what training reads)
    errors.jsonl                prompts that could not be generated: id, reason, retryable
    manifest.json               config hash, counts, teacher, accept rate, tokens/s, no-correct ids

Resuming: a prompt is finished once its samples are in a ``samples/`` shard (or it has a final,
non-retryable error). A rerun of the same command skips finished prompts; a run killed mid-way
loses at most the shard being assembled, which the rerun regenerates. Shards are written to a
temporary name and renamed, ``traces/`` before ``samples/``, so a shard counts only when whole.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .cluster import ray_session
from .config import ConfigError, RunConfig
from .data import Conversation, DataError, chat_options, load_prompts
from .generate import GenerationSpec, generate_and_verify, generated_tokens
from .runfolder import (  # noqa: F401  (the trace readers' old home)
    RunLayout,
    TracesFolder,
    checked_manifest,
    claim,
    drop_torn_tail,
    load_traces,
    read_jsonl,
    read_shard,
    read_shards,
    shard_counts,
    stage_settings,
    traces_folder,
)
from .verify import get_verifier

# The schema of the kept-trace shards; README "Trace format" documents it.
TRACE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("sample_index", pa.int32()),
    ("prompt", pa.string()),          # the original prompt: text, or JSON of the chat messages
    ("prompt_format", pa.string()),   # "text" or "messages"
    ("prompt_text", pa.string()),     # the prompt as rendered for the teacher
    ("answer", pa.string()),
    ("response", pa.string()),
    ("token_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float16()))),
    ("finish_reason", pa.string()),
    ("correct", pa.bool_()),
    ("verified", pa.bool_()),
    ("extracted_answer", pa.string()),
    ("teacher", pa.string()),
])
SAMPLE_SCHEMA = TRACE_SCHEMA.append(pa.field("kept", pa.bool_())).append(pa.field("error", pa.string()))


def traces_dir(cfg: RunConfig) -> Path:
    return RunLayout(cfg.run_dir).traces.path


def generation_spec(cfg: RunConfig) -> GenerationSpec:
    t = cfg.traces
    endpoint, api_key = None, None
    if t.engine.backend == "openai":
        endpoint, api_key = dataclasses.asdict(t.endpoint), endpoint_key(cfg)
    return GenerationSpec(cfg.teacher, cfg.engine("traces"), cfg.sampling("traces"), topk_logprobs=t.topk_logprobs,
                          logprobs=True, system_prompt=cfg.data.system_prompt, endpoint=endpoint, api_key=api_key,
                          **chat_options(t))


def endpoint_key(cfg: RunConfig):
    """The API key of ``traces.endpoint`` (``engines.openai.api_key``): None without one, a Secret
    whose repr hides it."""
    from .engines.openai import api_key

    return api_key(cfg.traces.endpoint, "traces.endpoint")


def teacher_name(cfg: RunConfig) -> str:
    """Who wrote the traces, for the trace rows and the manifest."""
    t = cfg.traces
    if t.source == "dataset":
        return f"dataset:{cfg.data.source}"
    return f"openai:{t.endpoint.model}" if t.engine.backend == "openai" else cfg.teacher.ref


def choose_kept(samples: list[dict[str, Any]], policy: str, seed: int, prompt_id: str) -> set[int]:
    """Sample indices kept by the policy. ``one_correct_random`` draws with a per-prompt seed."""
    if policy == "all":
        return {s["sample_index"] for s in samples if not s.get("error")}
    correct = [s["sample_index"] for s in samples if s["correct"]]
    if policy == "all_correct":
        return set(correct)
    if policy == "one_correct_random":
        return {random.Random(f"{seed}/{prompt_id}").choice(correct)} if correct else set()
    raise ValueError(f"unknown keep policy {policy!r}")


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


class ShardWriter:
    """Buffers finished prompts and writes them as numbered shard pairs."""

    def __init__(self, out: Path, start_index: int):
        self.out, self.index = out, start_index
        self.samples: list[dict[str, Any]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.samples.extend(rows)

    def flush(self) -> None:
        if not self.samples:
            return
        name = f"part-{self.index:05d}.parquet"
        samples = pa.Table.from_pylist(self.samples, schema=SAMPLE_SCHEMA)
        kept = samples.filter(pa.compute.field("kept")).select(TRACE_SCHEMA.names)
        folder = TracesFolder(self.out)
        _write_atomic(kept, folder.kept / name)
        _write_atomic(samples, folder.samples / name)  # the shard counts from here on
        self.index += 1
        self.samples = []


def _finished_state(out: Path) -> tuple[set[str], set[str], int]:
    """(ids with samples written, ids with final errors, next shard index); removes half-written shards."""
    # A shard counts once both halves exist (kept traces first, then samples: ShardWriter.flush). A
    # kept half without its samples is a half-written pair; samples without their kept half lost it
    # (deleted by hand?): either way the pair goes and its prompts are done again.
    folder = TracesFolder(out)
    kept = {p.name for p in folder.kept.glob("part-*.parquet")}
    for lost in sorted(folder.samples.glob("part-*.parquet")):
        if lost.name not in kept:
            print(f"[traces] {lost.name} has no traces/ twin: its prompts will be generated again", file=sys.stderr,
                  flush=True)
            lost.unlink()
    sample_parts = sorted(folder.samples.glob("part-*.parquet"))
    written = {p.name for p in sample_parts}
    for stale in folder.kept.glob("part-*.parquet"):
        if stale.name not in written:
            stale.unlink()
    for tmp in out.glob("*/.part-*.tmp"):
        tmp.unlink()
    drop_torn_tail(folder.errors)  # the rerun appends to it
    done: set[str] = set()
    for p in sample_parts:
        done.update(read_shard(p, columns=["id"]).column("id").to_pylist())
    final_errors = {e["id"] for e in _read_errors(out) if not e.get("retryable")}
    next_index = 1 + max((int(p.stem.split("-")[1]) for p in sample_parts), default=-1)
    return done, final_errors, next_index


def _read_errors(out: Path) -> list[dict[str, Any]]:
    path = TracesFolder(out).errors
    if not path.exists():
        return []
    return [record for _, record in read_jsonl(path)]


def _sample_record(sample: dict[str, Any], row: dict[str, Any], teacher: str, verified: bool) -> dict[str, Any]:
    prompt = row["prompt"]
    return {
        "id": row["id"], "sample_index": sample["sample_index"],
        "prompt": prompt if isinstance(prompt, str) else json.dumps(prompt),
        "prompt_format": "text" if isinstance(prompt, str) else "messages",
        "prompt_text": sample.get("prompt_text", ""), "answer": row.get("answer"),
        "response": sample["response"], "token_ids": sample.get("token_ids") or [],
        "logprobs": sample.get("logprobs") or [], "topk_ids": sample.get("topk_ids"),
        "topk_logprobs": sample.get("topk_logprobs"), "finish_reason": sample.get("finish_reason"),
        "correct": bool(sample["correct"]), "verified": verified, "extracted_answer": sample.get("extracted_answer"),
        "teacher": teacher, "kept": False, "error": sample.get("error"),
    }


def conversation(cfg: RunConfig) -> Conversation | None:
    """How ``traces.messages_field``'s conversations read (None without one)."""
    t = cfg.traces
    if not t.messages_field:
        return None
    return Conversation(t.messages_field, role_key=t.message_role_key, content_key=t.message_content_key,
                        roles=t.message_roles, reasoning_key=t.reasoning_field)


IMPORT_BATCH = 64  # imported traces verified per batch (one round trip to the math verifier's process)


def _imported_samples(rows: list[dict[str, Any]], cfg: RunConfig):
    """``traces.source: dataset``: the dataset's own traces, verified where a gold answer exists. With
    ``traces.reasoning_field`` (or a conversation's reasoning) the thinking goes first, as
    ``<think>\n...\n</think>\n\n`` (the answer is verified on the whole trace, as a generated one would
    be)."""
    from .engines.openai import join_reasoning

    t = cfg.traces
    check = get_verifier(t.verifier)
    for start in range(0, len(rows), IMPORT_BATCH):
        chunk, traces = rows[start:start + IMPORT_BATCH], {}
        for row in chunk:
            response = row.get("response")
            if isinstance(response, str) and response.strip():
                reasoning = row.get("reasoning")
                traces[row["id"]] = join_reasoning(reasoning if isinstance(reasoning, str) else None, response)
        golden = [row for row in chunk if row["id"] in traces and row.get("answer") is not None]
        verdicts = dict(zip((row["id"] for row in golden),
                            check.batch([(traces[row["id"]], row["answer"]) for row in golden])))
        for row in chunk:
            if row["id"] not in traces:
                where = (f"no assistant turn with text in column '{t.messages_field}'" if t.messages_field
                         else f"empty trace in column '{t.response_field}'")
                yield row["id"], None, {"id": row["id"], "reason": where, "retryable": False}
                continue
            verdict = verdicts.get(row["id"])
            yield row["id"], [{"sample_index": 0, "response": traces[row["id"]], "token_ids": [], "logprobs": [],
                               "finish_reason": "imported", "error": None,
                               "correct": verdict.correct if verdict else True,
                               "extracted_answer": verdict.extracted if verdict else None,
                               "verify_timed_out": bool(verdict and verdict.timed_out),
                               "verified": verdict is not None}], None


def run_traces(cfg: RunConfig, flush_every: int | None = None) -> dict[str, Any]:
    """Generate (or import), verify and write the teacher traces of a config. Returns the manifest."""
    out = traces_dir(cfg)
    t = cfg.traces
    if t.source == "generate":
        check_teacher(cfg)
    claim(out, "traces", stage_settings("traces", cfg))  # other settings than the folder's are refused, not mixed in
    extra = None
    if t.source == "dataset" and not t.messages_field:
        extra = {"response": t.response_field, **({"reasoning": t.reasoning_field} if t.reasoning_field else {})}
    rows = load_prompts(cfg.data, extra_fields=extra, on_empty="keep", conversation=conversation(cfg))
    done, final_errors, next_index = _finished_state(out)
    pending = [r for r in rows if r["id"] not in done and r["id"] not in final_errors]
    print(f"[traces] {len(rows)} prompts: {len(done)} already finished, {len(final_errors)} with final errors, "
          f"{len(pending)} to {'import' if t.source == 'dataset' else 'generate'} -> {out}", file=sys.stderr, flush=True)
    by_id = {r["id"]: r for r in rows}
    writer = ShardWriter(out, next_index)
    flush_every = flush_every or max(t.engine.batch_size * t.engine.concurrency // max(1, t.sampling.samples), 8)
    started = time.time()
    run_stats = {"prompts": 0, "samples": 0, "tokens": 0, "errors": 0, "verify_timeouts": 0}
    in_buffer = 0
    errors_file = open(TracesFolder(out).errors, "a")
    teacher = teacher_name(cfg)

    def handle(results) -> None:
        nonlocal in_buffer
        for prompt_id, samples, error in results:
            if error is not None:
                errors_file.write(json.dumps({**error, "time": time.time()}) + "\n")
                errors_file.flush()
                run_stats["errors"] += 1
                continue
            verified = t.verifier != "none" and by_id[prompt_id].get("answer") is not None
            records = [_sample_record(s, by_id[prompt_id], teacher, s.get("verified", verified)) for s in samples]
            kept = choose_kept(samples, t.keep, t.sampling.seed, prompt_id)
            for rec in records:
                rec["kept"] = rec["sample_index"] in kept
            writer.add(records)
            run_stats["prompts"] += 1
            run_stats["samples"] += len(records)
            run_stats["tokens"] += sum(generated_tokens(r) for r in records)
            run_stats["verify_timeouts"] += sum(bool(s.get("verify_timed_out")) for s in samples)
            in_buffer += 1
            if in_buffer >= flush_every:
                writer.flush()
                in_buffer = 0

    try:
        if t.source == "dataset":
            handle(_imported_samples(pending, cfg))
        elif pending:
            with ray_session(cfg.ray):
                handle(generate_and_verify(pending, generation_spec(cfg), t.verifier, label="traces"))
        writer.flush()
    finally:
        errors_file.close()
    elapsed = time.time() - started
    manifest = write_manifest(cfg, out, run_stats, elapsed, len(rows))
    print_summary(manifest)
    if rows and not manifest["prompts_finished"]:
        raise DataError(f"traces: none of the {len(rows)} prompts finished{_commonest_error(out)}; every error is "
                        f"in {TracesFolder(out).errors}")
    return manifest


def _commonest_error(out: Path) -> str:
    reasons = Counter(str(e.get("reason") or e.get("error")).splitlines()[0][:300] for e in _read_errors(out)
                      if e.get("reason") or e.get("error"))
    if not reasons:
        return ""
    reason, n = reasons.most_common(1)[0]
    return f" ({n} times: {reason})"


def check_teacher(cfg: RunConfig) -> None:
    """Refuse, before any work, a teacher that cannot generate the traces asked for: a local folder
    without weights, a masked LM
    (a diffusion denoiser) under a backend that samples causal LMs, or ``traces.engine.max_model_len``
    beyond the teacher's context (vLLM refuses it inside its engine actor; HF would run past the
    positions the model was trained on). An endpoint's model is the server's business."""
    from .models import check_local_weights, context_length, declares_masked_lm

    engine, ref = cfg.traces.engine, cfg.teacher.ref
    if engine.backend == "openai":
        return
    check_local_weights(ref)
    if declares_masked_lm(ref):
        raise ConfigError(f"teacher.ref {ref} is a masked LM (a diffusion denoiser); "
                          f"{cfg.written_as('traces.engine.backend')} {engine.backend} samples causal LMs token by "
                          "token: use an autoregressive teacher")
    context = context_length(ref, revision=cfg.teacher.revision, trust_remote_code=cfg.teacher.trust_remote_code)
    if context is not None and engine.max_model_len > context:
        raise ConfigError(f"{cfg.written_as('traces.engine.max_model_len')} {engine.max_model_len} is longer than the "
                          f"context of teacher.ref {ref} ({context} positions in its config): lower it to at most "
                          f"{context}")


def write_manifest(cfg: RunConfig, out: Path, run_stats: dict[str, Any], elapsed: float, n_rows: int) -> dict[str, Any]:
    """Counts over everything written so far (all runs of this folder), plus this run's speed."""
    samples = read_shards(TracesFolder(out).samples, columns=["id", "correct", "kept", "token_ids", "logprobs"])
    ids, n_samples, n_correct, n_kept, tokens, no_correct = set(), 0, 0, 0, 0, []
    if samples is not None:
        per_id: dict[str, bool] = {}
        for rec in samples.to_pylist():
            ids.add(rec["id"])
            n_samples += 1
            n_correct += bool(rec["correct"])
            n_kept += bool(rec["kept"])
            tokens += generated_tokens(rec)
            per_id[rec["id"]] = per_id.get(rec["id"], False) or bool(rec["correct"])
        no_correct = sorted(pid for pid, ok in per_id.items() if not ok)
    errors = _read_errors(out)
    latest_error = {}
    for e in errors:
        latest_error[e["id"]] = e
    open_errors = [e for pid, e in sorted(latest_error.items()) if pid not in ids]
    manifest = {
        "config_hash": cfg.hash("teacher", "data", "traces"),
        "shards": shard_counts(out),
        "teacher": teacher_name(cfg),
        "backend": cfg.traces.engine.backend if cfg.traces.source == "generate" else "dataset",
        "source": cfg.traces.source,
        "prompts_total": n_rows,
        "prompts_finished": len(ids),
        "samples": n_samples,
        "correct_samples": n_correct,
        "accepted_traces": n_kept,
        "accept_rate": n_correct / n_samples if n_samples else 0.0,
        "prompts_without_correct": len(no_correct),
        "prompt_ids_without_correct": no_correct,
        "errors": len(open_errors),
        "error_ids": [e["id"] for e in open_errors],
        "generated_tokens": tokens,
        "this_run": {**run_stats, "seconds": round(elapsed, 2),
                     "tokens_per_s": round(run_stats["tokens"] / elapsed, 2) if elapsed > 0 else 0.0},
    }
    TracesFolder(out).manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def print_summary(m: dict[str, Any]) -> None:
    rows = [
        ("prompts", f"{m['prompts_finished']} / {m['prompts_total']}"),
        ("samples", m["samples"]),
        ("accepted traces", m["accepted_traces"]),
        ("accept rate (correct samples)", f"{m['accept_rate']:.1%}"),
        ("prompts without a correct sample", m["prompts_without_correct"]),
        ("errors (see errors.jsonl)", m["errors"]),
        ("generated tokens", m["generated_tokens"]),
        ("this run: tokens/s", m["this_run"]["tokens_per_s"]),
    ]
    if m["this_run"].get("verify_timeouts"):  # scored wrong: a pathological answer, or a verifier too slow
        rows.append(("this run: answers past the verifier's deadline (scored wrong)", m["this_run"]["verify_timeouts"]))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
