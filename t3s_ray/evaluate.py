"""Stage 3: benchmark evaluation of a model ref or a training checkpoint folder.

    t3s eval CONFIG [--model REF] [--set ...]        python jobs/eval.py --config CONFIG [--model REF]

For each benchmark of ``eval.benchmarks`` (presets in ``t3s_ray/benchmarks/`` or YAML files): load
its problems, render them with the benchmark's template, sample k answers per problem through the
same generate-and-verify function as the trace stage and the training probe (Ray Data, ``hf`` or
``vllm`` actors), and score avg@k and unbiased pass@k. A model behind an OpenAI-compatible server (an
API teacher, an SGLang server) is the endpoint ref ``openai:NAME[@BASE_URL]`` (``models.endpoint_ref``),
requested from ``eval.endpoint`` by the ``openai`` engine (its reasoning joined in front of the answer
as for traces) and scored the same way. Writes, under ``run_dir/eval/<label>/``:

* ``scores.json``  per benchmark: avg@k, pass@k, problems n, samples, errors, generated tokens;
  plus the mean over benchmarks;
* ``samples.jsonl`` one line per sample: benchmark, prompt id, sample index, response, extracted
  answer, gold answer, verdict;
* a printed table.

Finished benchmarks are kept: rerunning the same evaluation only runs the benchmarks it lacks. The
folder's ``settings.json`` records the sampling settings and a fingerprint of the model's weights; a
rerun with other ones (or after the model was retrained in place) is refused, naming what changed,
instead of returning scores of something else: evaluate under another ``--label`` or ``--restart eval``.
A benchmark whose definition changed is refused the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from .config import BenchmarkConfig, ConfigError, EndpointConfig, EngineConfig, EvalConfig, RunConfig, load_benchmark
from .data import ARITH_SOURCE, LAB_SOURCE, DataError, arith_rows, chat_options, normalize_rows, read_records
from .models import ENDPOINT_PREFIX, endpoint_ref
from .runfolder import EvalFolder, RunLayout, changed_keys, claim, flatten, read_json, read_jsonl, stage_settings
from .stats import format_paired, format_table, mean_ci, paired_difference  # the tables: importable from here
from .verify import LETTERS, get_verifier, score_counts

SERVED_DTYPE = "served"  # an endpoint's model's dtype in the evaluation's settings: the server's business


# --------------------------------------------------------------------------------------------
# Benchmarks: definitions -> prompt rows with gold answers
# --------------------------------------------------------------------------------------------


def resolve_benchmarks(ev: EvalConfig) -> list[BenchmarkConfig]:
    """The benchmarks a config lists, with ``eval.sources`` applied; names must be unique."""
    benches = [load_benchmark(entry) for entry in ev.benchmarks]
    names = [b.name for b in benches]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"eval.benchmarks: benchmark name(s) {', '.join(dups)} listed more than once")
    unknown = sorted(set(ev.sources) - set(names))
    if unknown:
        raise ConfigError(f"eval.sources: {', '.join(unknown)} is not among eval.benchmarks ({', '.join(names)})")
    for b in benches:
        if b.name in ev.sources:
            b.source = ev.sources[b.name]
    return benches


def _shuffled_choices(options: list[str], problem_id: str) -> tuple[list[str], str]:
    """Options in an order fixed by the problem id (the correct one is ``options[0]``), and its letter."""
    order = list(range(len(options)))
    random.Random(hashlib.sha256(problem_id.encode()).hexdigest()).shuffle(order)
    return [options[i] for i in order], LETTERS[order.index(0)]


def bench_verifier(bench: BenchmarkConfig):
    """The benchmark's verifier; a ``choice`` benchmark's reads exactly its declared options (the
    ``choice_fields``, or ``num_choices`` letters; A-D when it declares neither)."""
    return get_verifier(bench.verifier, choices=len(bench.choice_fields) or bench.num_choices)


def benchmark_rows(bench: BenchmarkConfig, limit: int | None = None) -> list[dict[str, Any]]:
    """The benchmark's problems as prompt rows ``{id, prompt, answer}``, rendered with its template."""
    if bench.source in (ARITH_SOURCE, LAB_SOURCE):
        n = min(limit or bench.size, bench.size)
        if bench.source == ARITH_SOURCE:
            rows = arith_rows(bench.split, n, steps=bench.steps)
        else:
            from .lab import lab_rows

            rows = lab_rows(bench.split, n)
        for row in rows:
            row.pop("solution")
    else:
        where = f"benchmark '{bench.name}' ({bench.source})"
        records = read_records(bench.source, bench.split, bench.subset, revision=bench.revision, limit=limit)
        extra = {f"choice_{i}": col for i, col in enumerate(bench.choice_fields)}
        rows = normalize_rows(records, source=where, id_field=bench.id_field, prompt_field=bench.prompt_field,
                              answer_field=None if bench.choice_fields else bench.answer_field, extra_fields=extra)
        if not bench.choice_fields:
            missing = [r["id"] for r in rows if r["answer"] is None or not str(r["answer"]).strip()]
            if missing:
                raise DataError(f"{where}: no gold answer in column '{bench.answer_field}' for id(s) "
                                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if limit is not None:
        rows = rows[:limit]
    for row in rows:
        choices = ""
        if bench.choice_fields:
            options = [str(row.pop(f"choice_{i}")).strip() for i in range(len(bench.choice_fields))]
            shown, row["answer"] = _shuffled_choices(options, row["id"])
            choices = "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(shown))
        if not isinstance(row["prompt"], str):
            raise DataError(f"benchmark '{bench.name}': prompt column '{bench.prompt_field}' must hold text "
                            f"(row id {row['id']})")
        row["prompt"] = bench.prompt_template.replace("{prompt}", row["prompt"]).replace("{choices}", choices)
    return rows


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def default_model(cfg: RunConfig) -> tuple[str, str]:
    """(model ref, label): the run's trained student when it exists, else the configured student."""
    trained = RunLayout(cfg.run_dir).train.model
    if (trained / "config.json").exists():
        return str(trained.resolve()), "final"
    return cfg.student.ref, "base"


def model_and_label(cfg: RunConfig, model_ref: str | None, label: str | None) -> tuple[str, str]:
    """The model ``t3s eval`` evaluates (default: ``eval.endpoint``'s model under ``eval.engine.backend:
    openai``, else ``default_model``) and its results folder's label."""
    if model_ref is None and cfg.eval.engine.backend == "openai":
        model_ref = ENDPOINT_PREFIX + cfg.eval.endpoint.model
    if model_ref is None:
        model_ref, default_label = default_model(cfg)
        label = label or default_label
    return model_ref, label or label_of(model_ref)


def label_of(model_ref: str) -> str:
    """A folder-safe label for a model ref (an endpoint ref without its URL: ``openai_NAME``)."""
    served = endpoint_ref(model_ref)
    if served:
        name = ENDPOINT_PREFIX + served[0]
    else:
        name = Path(model_ref).name if Path(model_ref).exists() else model_ref
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """What one evaluation samples: the model (an endpoint ref without its URL: the URL is how the
    server is reached, not what it serves), the engine, and for an endpoint ref the server and key."""

    model_ref: str
    engine: EngineConfig
    diffusion: bool = False
    endpoint: EndpointConfig | None = None
    api_key: Any = None


def evaluated(cfg: RunConfig, model_ref: str, endpoint_section: str = "eval") -> Evaluated:
    """How ``model_ref`` is evaluated: an endpoint ref (``openai:NAME[@BASE_URL]``) by the ``openai``
    engine on ``{endpoint_section}.endpoint`` (``eval``, or ``traces`` for ``t3s run``'s API teacher)
    with the model NAME and the ref's base URL; any other model by ``eval.engine`` (``hf`` for a
    masked-diffusion model, which vLLM does not serve). Checked on the driver, before Ray starts."""
    engine = cfg.engine("eval")
    served = endpoint_ref(model_ref)
    if served:
        from .engines.openai import api_key

        name, url = served
        endpoint = dataclasses.replace(getattr(cfg, endpoint_section).endpoint, model=name,
                                       **({"base_url": url} if url else {}))
        return Evaluated(ENDPOINT_PREFIX + name, dataclasses.replace(engine, backend="openai", engine_kwargs={}),
                         endpoint=endpoint, api_key=api_key(endpoint, f"{endpoint_section}.endpoint"))
    if engine.backend == "openai":
        raise ConfigError(f"eval.engine.backend is openai, which evaluates a served model (openai:NAME, "
                          f"eval.endpoint); {model_ref} is a model to load: evaluate it with eval.engine.backend "
                          "hf or vllm")
    if is_diffusion_model(cfg, model_ref):
        return Evaluated(model_ref, dataclasses.replace(engine, backend="hf", engine_kwargs={}), diffusion=True)
    return Evaluated(model_ref, engine)


def check_local_backend(cfg: RunConfig, command: str) -> None:
    """``t3s run`` and ``t3s sweep`` evaluate the models they train: refuse ``eval.engine.backend:
    openai`` before any stage runs (it evaluates one served model, under ``t3s eval``)."""
    if cfg.eval.engine.backend == "openai":
        raise ConfigError(f"eval.engine.backend is openai, but `t3s {command}` evaluates the models it trains: "
                          "set hf or vllm (openai evaluates one served model under `t3s eval --model openai:NAME`; "
                          "an API teacher's row of `t3s run` is requested from traces.endpoint)")


def is_diffusion_model(cfg: RunConfig, model_ref: str) -> bool:
    """A masked-diffusion model: a diffusion LM's config (``*ForMaskedLM``, LLaDA, LLaDA2), or the
    ``kind: dllm`` student (its base ref or a checkpoint of this run) whose config may not say so."""
    from .models import declares_masked_lm, resolve

    if declares_masked_lm(model_ref):
        return True
    if cfg.student.kind != "dllm" or model_ref in (cfg.teacher.ref, cfg.student.selector_ref):
        return False
    return model_ref == cfg.student.ref or Path(resolve(model_ref)).resolve().is_relative_to(cfg.run_dir.resolve())


def evaluate(cfg: RunConfig, model_ref: str | None = None, label: str | None = None,
             out_dir: str | Path | None = None, quiet: bool = False, endpoint_section: str = "eval") -> dict[str, Any]:
    """Evaluate one model on every configured benchmark; returns (and writes) the scores. An endpoint
    ref is requested from ``{endpoint_section}.endpoint`` (see ``evaluated``).

    Call inside a Ray session (``ray_session``); ``run_eval`` is the stage entry point that opens one.
    """
    from .generate import GenerationSpec, generate_and_verify, generated_tokens

    model_ref, label = model_and_label(cfg, model_ref, label)
    ev = cfg.eval
    how = evaluated(cfg, model_ref, endpoint_section)
    model_ref, engine, diffusion = how.model_ref, how.engine, how.diffusion
    # The teacher (``compare: teacher``) loads with its own settings; every other model is the student's.
    who = cfg.teacher if model_ref == cfg.teacher.ref and model_ref != cfg.student.ref else cfg.student
    folder = EvalFolder(Path(out_dir)) if out_dir else RunLayout(cfg.run_dir).eval(label)
    out = folder.path
    benches = resolve_benchmarks(ev)
    claim(out, "eval", stage_settings("eval", cfg, model_ref, SERVED_DTYPE if how.endpoint else who.dtype),
          new_folder="another --label (or a new `name`)")
    scores_path, samples_path = folder.scores, folder.samples
    previous = read_json(scores_path, "evaluation's scores") if scores_path.exists() else {}
    done = previous.get("benchmarks", {})
    results: dict[str, Any] = {}
    for bench in benches:
        definition = json.loads(json.dumps(vars(bench), default=str))  # as it reads back
        if bench.name in done and "definition" in done[bench.name]:
            changed = changed_keys(flatten("", done[bench.name]["definition"]), flatten("", definition))
            if changed:
                raise ConfigError(f"{out}: benchmark '{bench.name}' was scored with another definition "
                                  f"({', '.join(changed)} changed); evaluate under another --label, or rerun "
                                  f"with --restart eval")
            results[bench.name] = done[bench.name]
            continue
        _drop_samples(samples_path, bench.name)  # a crashed attempt's lines, if any
        sampling = bench.sampling(cfg.sampling("eval"))
        k = sampling.samples
        if any(p > k for p in ev.pass_k):
            raise ConfigError(f"eval.pass_k {ev.pass_k}: benchmark '{bench.name}' draws only {k} samples per problem")
        rows = benchmark_rows(bench, ev.limit)
        engine_here = dataclasses.replace(engine, concurrency=max(1, min(engine.concurrency, len(rows))))
        spec = GenerationSpec(who.with_weights(model_ref), engine_here, sampling, system_prompt=bench.system_prompt,
                              sampler="diffusion" if diffusion else "ar", diffusion_steps=ev.diffusion_steps,
                              diffusion_block_length=ev.diffusion_block_length,
                              diffusion_threshold=ev.diffusion_threshold,
                              diffusion_steps_per_block=ev.diffusion_steps_per_block, mask_token=cfg.student.mask_token,
                              endpoint=dataclasses.asdict(how.endpoint) if how.endpoint else None,
                              api_key=how.api_key, **chat_options(cfg.traces, evaluation=True))
        start = time.time()
        counts, errors, tokens, per_problem, timeouts = [], [], 0, {}, 0
        answers = {r["id"]: r["answer"] for r in rows}
        lines = []
        for pid, samples, err in generate_and_verify(rows, spec, bench_verifier(bench), label=f"eval {bench.name}"):
            if samples is None:
                errors.append(err)
                counts.append((k, 0))  # a problem that could not be answered is scored wrong, and listed
                per_problem[pid] = 0.0
                continue
            counts.append((len(samples), sum(s["correct"] for s in samples)))
            per_problem[pid] = counts[-1][1] / counts[-1][0]
            timeouts += sum(s["verify_timed_out"] for s in samples)
            for s in samples:
                tokens += generated_tokens(s)
                lines.append({"benchmark": bench.name, "id": pid, "sample_index": s["sample_index"],
                              "response": s["response"], "extracted_answer": s["extracted_answer"],
                              "answer": answers[pid], "correct": s["correct"], "tokens": generated_tokens(s),
                              "finish_reason": s.get("finish_reason")})
        lines.sort(key=lambda x: (x["id"], x["sample_index"]))
        with open(samples_path, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        seconds = time.time() - start
        spread = mean_ci(list(per_problem.values()))
        results[bench.name] = {**score_counts(counts, ev.pass_k), "avg@k_stderr": spread["stderr"],
                               "avg@k_ci95": spread["ci95"], "k": k, "n": len(counts), "samples": len(lines),
                               "errors": len(errors), "error_list": errors[:50], "tokens": tokens,
                               "seconds": round(seconds, 1), "verifier": bench.verifier, "verify_timeouts": timeouts,
                               "definition": definition,
                               "per_problem": dict(sorted(per_problem.items()))}
        _write_scores(scores_path, model_ref, label, results)
    scores = _write_scores(scores_path, model_ref, label, results)
    if not quiet:
        print(format_table({label: scores}, [b.name for b in benches]))
        print(f"[eval] scores: {scores_path}\n[eval] samples: {samples_path}", file=sys.stderr, flush=True)
    return scores


def _drop_samples(path: Path, bench_name: str) -> None:
    if not path.exists():
        return
    kept = [line for line, record in read_jsonl(path) if record["benchmark"] != bench_name]
    path.write_text("".join(kept))


def _write_scores(path: Path, model_ref: str, label: str, results: dict[str, Any]) -> dict[str, Any]:
    metrics = [m for m in next(iter(results.values()), {}) if m == "avg@k" or m.startswith("pass@")]
    mean = {m: sum(r[m] for r in results.values()) / len(results) for m in metrics}
    scores = {"model": model_ref, "label": label, "benchmarks": results, "mean": mean}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(scores, indent=2) + "\n")
    tmp.replace(path)
    return scores


def paired_table(scores_by_label: dict[str, dict[str, Any]], bench_names: list[str],
                 against: tuple[str, ...] = ("sft", "base"), seed: int = 0) -> tuple[dict[str, Any], str]:
    """Each model against ``against`` on the same problems: the avg@k difference, its paired-bootstrap
    95 % CI and a sign-flip p-value, per benchmark. Returns (the numbers, ``format_paired`` of them)."""
    out: dict[str, Any] = {}
    refs = [r for r in against if r in scores_by_label]
    for label, scores in scores_by_label.items():
        for ref in refs:
            if ref == label:
                continue
            for n in bench_names:
                a, b = scores["benchmarks"].get(n, {}), scores_by_label[ref]["benchmarks"].get(n, {})
                if "per_problem" in a and "per_problem" in b:
                    d = paired_difference(a["per_problem"], b["per_problem"], seed=seed)
                    out.setdefault(label, {}).setdefault(f"vs_{ref}", {})[n] = d
    return out, format_paired(out)


def score_rows(scores_by_label: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The scores as table rows for a tracker: one per model and benchmark (avg@k, its standard error
    and 95 % CI over problems, pass@k, problems, samples, errors)."""
    rows = []
    for label, scores in scores_by_label.items():
        for bench, b in scores["benchmarks"].items():
            ci = b.get("avg@k_ci95") or [None, None]
            rows.append({"model": label, "benchmark": bench, "avg@k": b["avg@k"], "stderr": b.get("avg@k_stderr"),
                         "ci95_low": ci[0], "ci95_high": ci[1],
                         **{m: v for m, v in b.items() if m.startswith("pass@")},
                         "n": b.get("n"), "samples": b.get("samples"), "errors": b.get("errors")})
    return rows


def paired_rows(paired: dict[str, Any]) -> list[dict[str, Any]]:
    """``paired_table``'s numbers as table rows: model, reference, benchmark, difference, CI, p."""
    return [{"model": label, "reference": ref[3:], "benchmark": bench, "diff": d["diff"], "ci95_low": d["ci95"][0],
             "ci95_high": d["ci95"][1], "p": d["p"], "n": d["n"], "wins": d["wins"], "losses": d["losses"]}
            for label, refs in paired.items() for ref, benches in refs.items() for bench, d in benches.items()]


def score_summary(scores_by_label: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The scores as final values: ``MODEL/BENCH/avg@k`` (and pass@k), ``MODEL/mean/avg@k``."""
    out = {}
    for label, scores in scores_by_label.items():
        for bench, b in scores["benchmarks"].items():
            out.update({f"{label}/{bench}/{m}": v for m, v in b.items() if m == "avg@k" or m.startswith("pass@")})
        out.update({f"{label}/mean/{m}": v for m, v in scores.get("mean", {}).items()})
    return out


def run_eval(cfg: RunConfig, model_ref: str | None = None, label: str | None = None) -> dict[str, Any]:
    """The ``t3s eval`` stage: evaluate ``model_ref`` (default: the run's trained student, else
    ``student.ref``) on every configured benchmark inside a Ray session; the scores go to the trackers
    as the run ``NAME/eval/LABEL``."""
    from .cluster import ray_session
    from .models import check_local_weights
    from .tracking import open_run, tracking_spec

    resolve_benchmarks(cfg.eval)  # config problems first, before Ray starts
    model_ref, label = model_and_label(cfg, model_ref, label)
    evaluated(cfg, model_ref)  # a served model's key, a local model under backend openai
    if not model_ref.startswith(ENDPOINT_PREFIX):
        check_local_weights(model_ref)
    with ray_session(cfg.ray):
        scores = evaluate(cfg, model_ref, label)
    label = scores["label"]
    with open_run(tracking_spec(cfg, f"eval/{label}", RunLayout(cfg.run_dir).eval(label).path,
                                tags={"model": scores["model"]})) as run:
        run.log_table("scores", score_rows({label: scores}))
        run.log_summary(score_summary({label: scores}))
    return scores
