"""Generation on Ray Data, and generate-and-verify: shared by traces, the training probe and evaluation.

Prompts are rendered with the model's chat template on the driver, checked (empty or longer than
``max_model_len`` -> an error record, never a crash), expanded into one request per sample with its
own seed, and sharded over engine actors by Ray Data:

* ``hf``: ``map_batches`` over an actor pool running transformers ``generate`` with left padding
  (``t3s_ray.engines.hf``);
* ``vllm``: ``ray.data.llm`` engine actors (``t3s_ray.engines.vllm``);
* ``openai``: requests to an OpenAI-compatible server (``t3s_ray.engines.openai``; traces only):
  prompts go as chat messages, rendered by the server.

``t3s_ray.engines`` picks the engine from the spec's ``engine.backend``.

Every stage that samples builds its spec from its resolved sections, ``RunConfig.engine(stage)`` and
``RunConfig.sampling(stage)``, so traces, the static probe, evaluation and sweep trials choose
backends, GPUs and engine options the same way. After a stage, the engines' placement groups are
removed and their resources awaited (``run_requests``), so that a training started next in the same
driver finds its CPUs and GPUs.

The engines return, per sample, the text, the generated token ids and the log-probabilities of the
sampled tokens (``hf``: only when the spec asks, ``logprobs=True``; and with ``topk_logprobs: k`` the
engine's top-k alternatives), plus ``error`` when that sample failed. Results stream back to the
driver as they finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .config import EngineConfig, ModelConfig, SamplingConfig
from .data import render_prompt
from .engines import generate_dataset
from .engines.rows import plain
from .verify import Verifier, get_verifier


@dataclass(init=False)
class GenerationSpec:
    """Everything generation needs: the model, the engine it runs on and how it samples (a stage's
    resolved sections: ``RunConfig.engine(stage)``, ``RunConfig.sampling(stage)``), and what the stage
    adds. Each stage builds one in a line::

        GenerationSpec(cfg.teacher, cfg.engine("traces"), cfg.sampling("traces"), topk_logprobs=...)

    The engines read their settings from ``engine`` and ``sampling`` (``t3s_ray/engines/``). The flat
    keywords and attributes of before (``model_ref``, ``backend``, ``n``, ``max_tokens``, ...) still
    build and read a spec, each on its part (``_FLAT``)."""

    model: ModelConfig
    engine: EngineConfig
    sampling: SamplingConfig
    topk_logprobs: int = 0
    # Whether the stage uses the sampled tokens' log-probabilities (the traces keep them; evaluation
    # and the probe only verify answers). The hf engine records them only when asked (or with
    # topk_logprobs > 0); vllm and openai return theirs as they come (openai: endpoint.request_logprobs).
    logprobs: bool = False
    chat_template: bool | str = True              # traces.chat_template: the model's own, none, or a template
    chat_template_kwargs: dict[str, Any] | None = None  # template variables (Qwen3's enable_thinking)
    system_prompt: str | None = None
    # Masked-diffusion models (dLLM students) are sampled by iterative unmasking instead of token by
    # token; see t3s_ray/t3s/diffusion.py. hf backend only.
    sampler: str = "ar"              # "ar" or "diffusion"
    diffusion_steps: int = 0         # total denoising steps per answer (0: one per token)
    diffusion_block_length: int = 32
    diffusion_threshold: float | None = None      # LLaDA2's block sampler (None: 0.95)
    diffusion_steps_per_block: int | None = None  # LLaDA2's block sampler (None: the block length)
    mask_token: str = ""             # empty: the tokenizer's own mask token
    endpoint: dict[str, Any] | None = None   # backend "openai": traces.endpoint as a dict
    api_key: Any = None                      # backend "openai": an engines.openai.Secret

    def __init__(self, model: ModelConfig | None = None, engine: EngineConfig | None = None,
                 sampling: SamplingConfig | None = None, **keywords: Any):
        parts = {"model": model or ModelConfig(ref=""), "engine": engine or EngineConfig(),
                 "sampling": sampling or SamplingConfig()}
        flat = {k: keywords.pop(k) for k in list(keywords) if k in _FLAT}
        for part in parts:
            changes = {_FLAT[k][1]: v for k, v in flat.items() if _FLAT[k][0] == part}
            parts[part] = dataclasses.replace(parts[part], **changes) if changes else parts[part]
        self.model, self.engine, self.sampling = parts["model"], parts["engine"], parts["sampling"]
        for f in dataclasses.fields(self)[3:]:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, keywords.pop(f.name, default))
        if keywords:
            raise TypeError(f"GenerationSpec got unexpected keywords {sorted(keywords)}")

    def __getattr__(self, name: str) -> Any:
        if name not in _FLAT:
            raise AttributeError(f"'GenerationSpec' object has no attribute {name!r}")
        part, key = _FLAT[name]
        return getattr(getattr(self, part), key)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FLAT:  # it would hide the part's value from the engines, which read the parts
            raise AttributeError(f"set spec.{'.'.join(_FLAT[name])}, not spec.{name}")
        super().__setattr__(name, value)

    @classmethod
    def for_engine(cls, engine: EngineConfig, model_ref: str, **keywords: Any) -> "GenerationSpec":
        """A spec on ``engine`` with flat keywords for the rest (the constructor of before)."""
        return cls(ModelConfig(ref=model_ref), engine, **keywords)


# The spec's flat keywords of before -> (its part, the key there).
_FLAT: dict[str, tuple[str, str]] = {
    "model_ref": ("model", "ref"), "n": ("sampling", "samples"),
    **{f.name: ("model", f.name) for f in dataclasses.fields(ModelConfig) if f.name != "ref"},
    **{f.name: ("engine", f.name) for f in dataclasses.fields(EngineConfig)},
    **{f.name: ("sampling", f.name) for f in dataclasses.fields(SamplingConfig) if f.name != "samples"},
}


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """A per-sample seed that does not depend on how requests are batched or sharded."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def generated_tokens(sample: dict[str, Any]) -> int:
    """Tokens a sample generated: its token ids, or (an endpoint returns text) its log-probabilities."""
    return len(sample.get("token_ids") or []) or len(sample.get("logprobs") or [])


def chat_messages(prompt: str | list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The prompt as chat messages (an OpenAI request's ``messages``), the system prompt first."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prepare_requests(rows: list[dict[str, Any]], spec: GenerationSpec, tokenizer
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Render and check prompts; return (one request per sample, error records for bad prompts).

    For the ``openai`` backend (``tokenizer`` None) the prompt travels as chat messages and the
    server renders and checks it."""
    import json

    requests, errors = [], []
    for row in rows:
        prompt = row.get("prompt")
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            errors.append({"id": row["id"], "reason": "empty prompt", "retryable": False})
            continue
        if spec.engine.backend == "openai":
            messages = json.dumps(chat_messages(prompt, spec.system_prompt))
            for k in range(spec.sampling.samples):
                requests.append({"id": row["id"], "sample_index": k, "prompt_text": messages, "messages": messages,
                                 "prompt_tokens": 0, "seed": sample_seed(spec.sampling.seed, row["id"], k),
                                 "max_tokens": spec.sampling.max_tokens})
            continue
        try:
            text = render_prompt(tokenizer, prompt, system_prompt=spec.system_prompt, chat_template=spec.chat_template,
                                 chat_template_kwargs=spec.chat_template_kwargs)
        except Exception as e:  # a malformed message list; keep the run going
            errors.append({"id": row["id"], "reason": f"cannot render prompt: {e}", "retryable": False})
            continue
        # verbose=False: a prompt beyond the tokenizer's model_max_length is this check's to report
        # (as a counted skip), not a transformers warning.
        n_tokens = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if n_tokens >= spec.engine.max_model_len:
            errors.append({"id": row["id"], "retryable": False,
                           "reason": f"prompt too long: {n_tokens} tokens, max_model_len is {spec.engine.max_model_len}"})
            continue
        max_tokens = min(spec.sampling.max_tokens, spec.engine.max_model_len - n_tokens)
        seeded = spec.engine.backend != "vllm" or spec.engine.seed_requests  # a None seed: the vLLM request goes unseeded
        for k in range(spec.sampling.samples):
            requests.append({"id": row["id"], "sample_index": k, "prompt_text": text, "prompt_tokens": n_tokens,
                             "seed": sample_seed(spec.sampling.seed, row["id"], k) if seeded else None,
                             "max_tokens": max_tokens})
    return requests, errors


# --------------------------------------------------------------------------------------------
# Running requests through Ray Data
# --------------------------------------------------------------------------------------------


def actor_plan(n_requests: int, concurrency: int, batch_size: int) -> int:
    """Engine actors for ``n_requests``: no more than there are batches, since each actor loads the
    model (on 2 cores a second actor loading SmolLM2 beside the one generating the probe's single
    batch cost ~14 s per probe evaluation). Batches keep their configured size: splitting 6 rows
    into two batches of 3 on two actors measured slower there than one batch of 6 on one."""
    return max(1, min(concurrency, -(-n_requests // batch_size)))


def run_requests(requests: list[dict[str, Any]], spec: GenerationSpec) -> Iterator[dict[str, Any]]:
    """Stream generated samples (one dict per request) back from the engine actors as they finish.

    When the stream ends (or is abandoned), the placement groups the engines were given are removed
    and the CPUs and GPUs the stage held are awaited: ray.data.llm creates a placement group per
    multi-GPU engine and never removes it (ray-project/ray#64035)."""
    import ray

    if not requests:
        return
    before = ray.available_resources()
    placement_groups: list = []
    try:
        yield from _stream(requests, spec, placement_groups)
    finally:
        # vLLM engines take seconds to exit after their last batch; HF actors are gone at once.
        release_generation_resources(placement_groups, before, wait_s=30.0 if spec.engine.backend == "vllm" else 0.0)


def release_generation_resources(placement_groups: list, before: dict[str, float], wait_s: float = 30.0) -> None:
    """Remove the engines' placement groups; wait (at most ``wait_s``) until the CPUs and GPUs that
    were free before the stage are free again (its actors take a moment to exit)."""
    import ray

    for pg in placement_groups:
        try:
            ray.util.remove_placement_group(pg)
        except Exception:  # already removed, or the cluster is going away
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        now = ray.available_resources()
        if all(now.get(r, 0.0) >= before.get(r, 0.0) - 1e-6 for r in ("CPU", "GPU")):
            return
        time.sleep(0.2)


def _stream(requests: list[dict[str, Any]], spec: GenerationSpec, placement_groups: list) -> Iterator[dict[str, Any]]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    actors = actor_plan(len(requests), spec.engine.concurrency, spec.engine.batch_size)
    # One block per engine batch, so that finished batches stream back instead of waiting for all.
    ds = ray.data.from_items(requests, override_num_blocks=-(-len(requests) // spec.engine.batch_size))
    ds = generate_dataset(ds, spec, actors, placement_groups)
    for row in ds.iter_rows():
        yield {k: plain(v) for k, v in row.items()}


class Progress:
    """Prints a progress line at most every ``every`` seconds (and on ``done``)."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.time()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= self.every:
            self.last = now
            print(f"[{self.label}] {done}/{self.total} prompts{extra} ({now - self.start:.0f}s)", file=sys.stderr,
                  flush=True)


def generate_and_verify(rows: list[dict[str, Any]], spec: GenerationSpec, verifier: str | Verifier,
                        label: str = "generate") -> Iterator[tuple[str, list[dict[str, Any]] | None, dict | None]]:
    """Generate ``spec.sampling.samples`` samples per prompt row and verify each against the row's ``answer``
    (``verifier``: a name, or a ``Verifier`` such as a choice verifier of more options).

    Yields one ``(prompt_id, samples, error)`` per prompt as soon as all its samples are back:
    ``samples`` are the sample dicts with ``correct``, ``extracted_answer`` and ``verify_timed_out``
    added (sorted by sample index; a prompt's samples are verified in one batch), or None with
    ``error`` when the prompt could not be generated at all. Every input row yields exactly once.
    """
    from .models import load_tokenizer

    check = get_verifier(verifier) if isinstance(verifier, str) else verifier
    tokenizer = None if spec.engine.backend == "openai" else load_tokenizer(
        spec.model.ref, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code)
    requests, errors = prepare_requests(rows, spec, tokenizer)
    for err in errors:
        yield err["id"], None, err
    by_id = {r["id"]: r for r in rows}
    pending: dict[str, list[dict[str, Any]]] = {}
    progress = Progress(label, len(rows) - len(errors))
    finished, tokens = 0, 0
    for sample in run_requests(requests, spec):
        bucket = pending.setdefault(sample["id"], [])
        bucket.append(sample)
        if len(bucket) < spec.sampling.samples:
            continue
        samples = sorted(pending.pop(sample["id"]), key=lambda s: s["sample_index"])
        ok = [s for s in samples if not s.get("error")]
        gold = by_id[sample["id"]].get("answer")
        verdicts = iter(check.batch([(s["response"], gold) for s in ok]))
        for s in samples:
            verdict = next(verdicts) if not s.get("error") else None
            s["correct"] = bool(verdict and verdict.correct)
            s["extracted_answer"] = verdict.extracted if verdict else None
            s["verify_timed_out"] = bool(verdict and verdict.timed_out)
            tokens += generated_tokens(s)
        finished += 1
        progress.update(finished, f", {tokens} tokens, {tokens / max(1e-9, time.time() - progress.start):.1f} tok/s")
        # A sample that failed for a passing reason (an endpoint that went away) fails its prompt, so
        # that a rerun draws all its samples again (same seeds) instead of keeping it one short.
        passing = [s for s in samples if s.get("error") and s.get("retryable") is True]
        if passing or not ok:
            failed = passing or samples
            yield sample["id"], None, {"id": sample["id"], "retryable": any(s.get("retryable", True) for s in failed),
                                       "reason": f"generation failed: {failed[0].get('error')}"}
        else:
            yield sample["id"], samples, None
    if pending:  # an engine lost rows without reporting them: never drop a prompt silently
        for pid, samples in pending.items():
            yield pid, None, {"id": pid, "retryable": True,
                              "reason": f"only {len(samples)} of {spec.sampling.samples} samples came back from the engine"}
    progress.update(finished, f", {tokens} tokens", force=True)
