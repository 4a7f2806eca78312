"""Generation on Ray Data, and generate-and-verify: shared by traces, the training probe and evaluation.

Prompts are rendered with the model's chat template on the driver, checked (empty or longer than
``max_model_len`` -> an error record, never a crash), expanded into one request per sample with its
own seed, and sharded over engine actors by Ray Data:

* ``hf``: ``map_batches`` over an actor pool running transformers ``generate`` with left padding;
* ``vllm``: ``ray.data.llm`` engine actors (``t3s_ray.vllm_backend``).

Both backends return, per sample, the text, the generated token ids and the log-probabilities of the
sampled tokens (and with ``topk_logprobs: k`` the engine's top-k alternatives), plus ``error`` when
that sample failed. Results stream back to the driver as they finish.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .data import render_prompt
from .verify import get_verifier


@dataclass
class GenerationSpec:
    """Everything generation needs; built from a config section by the calling stage."""

    model_ref: str
    backend: str = "hf"
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int = 0
    topk_logprobs: int = 0
    chat_template: bool = True
    system_prompt: str | None = None
    concurrency: int = 1
    batch_size: int = 16
    max_model_len: int = 4096
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    num_gpus_per_actor: float = 0.0
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    # Masked-diffusion models (dLLM students) are sampled by iterative unmasking instead of token by
    # token; see t3s_ray/t3s/diffusion.py. hf backend only.
    sampler: str = "ar"              # "ar" or "diffusion"
    diffusion_steps: int = 0         # total denoising steps per answer (0: one per token)
    diffusion_block_length: int = 32
    mask_token: str = ""             # empty: the tokenizer's own mask token


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """A per-sample seed that does not depend on how requests are batched or sharded."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prepare_requests(rows: list[dict[str, Any]], spec: GenerationSpec, tokenizer
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Render and check prompts; return (one request per sample, error records for bad prompts)."""
    requests, errors = [], []
    for row in rows:
        prompt = row.get("prompt")
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            errors.append({"id": row["id"], "reason": "empty prompt", "retryable": False})
            continue
        try:
            text = render_prompt(tokenizer, prompt, system_prompt=spec.system_prompt, chat_template=spec.chat_template)
        except Exception as e:  # a malformed message list; keep the run going
            errors.append({"id": row["id"], "reason": f"cannot render prompt: {e}", "retryable": False})
            continue
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens >= spec.max_model_len:
            errors.append({"id": row["id"], "retryable": False,
                           "reason": f"prompt too long: {n_tokens} tokens, max_model_len is {spec.max_model_len}"})
            continue
        max_tokens = min(spec.max_tokens, spec.max_model_len - n_tokens)
        for k in range(spec.n):
            requests.append({"id": row["id"], "sample_index": k, "prompt_text": text, "prompt_tokens": n_tokens,
                             "seed": sample_seed(spec.seed, row["id"], k), "max_tokens": max_tokens})
    return requests, errors


# --------------------------------------------------------------------------------------------
# The Hugging Face backend
# --------------------------------------------------------------------------------------------


class HFGenerator:
    """A Ray Data actor: transformers ``generate`` with left padding on a batch of requests.

    Also used directly (without Ray) as the bare-loop baseline of ``bench/traces_throughput.py``.
    """

    def __init__(self, model_ref: str, temperature: float, top_p: float, topk_logprobs: int, dtype: str = "auto",
                 trust_remote_code: bool = False, revision: str | None = None, device: str | None = None,
                 sampler: str = "ar", diffusion_steps: int = 0, diffusion_block_length: int = 32,
                 mask_token: str = ""):
        import torch

        from .models import load_model, load_tokenizer, mask_token_id

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto" and self.device == "cpu":
            dtype = "float32"  # bf16 matmuls are emulated on most CPUs: ~10x slower than fp32
        self.tokenizer = load_tokenizer(model_ref, revision=revision, trust_remote_code=trust_remote_code)
        model = load_model(model_ref, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                           device=self.device).eval()
        self.__dict__.update(vars(HFGenerator.from_model(model, self.tokenizer, temperature, top_p, topk_logprobs)))
        if sampler == "diffusion":
            if topk_logprobs:
                raise ValueError("top-k logprobs are not available from the diffusion sampler")
            self.diffusion = {"mask_id": mask_token_id(self.tokenizer, mask_token, model_ref), "steps": diffusion_steps,
                              "block_length": diffusion_block_length}

    @classmethod
    def from_model(cls, model, tokenizer, temperature: float, top_p: float, topk_logprobs: int = 0) -> "HFGenerator":
        """Wrap a model already in memory (a training worker measuring its own train accuracy)."""
        self = cls.__new__(cls)
        self.device = next(model.parameters()).device
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer.padding_side = "left"
        self.temperature, self.top_p, self.topk = temperature, top_p, topk_logprobs
        self.diffusion = None  # set by __init__ for a masked-diffusion model
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # none on masked LMs
        eos = gen_eos if gen_eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        return self

    def _generate(self, prompts: list[str], max_tokens: int, seed: int) -> list[dict[str, Any]]:
        import torch

        if self.diffusion:
            return self._diffuse(prompts, max_tokens, seed)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        do_sample = self.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=do_sample,
                temperature=self.temperature if do_sample else None, top_p=self.top_p if do_sample else None,
                top_k=0 if do_sample else None, return_dict_in_generate=True, output_logits=True,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids))
        gen = out.sequences[:, enc["input_ids"].shape[1]:]
        # Log-probabilities under the model's own distribution (raw logits), as vLLM reports them.
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [B, steps, V]
        results = []
        for b in range(gen.shape[0]):
            ids = gen[b].tolist()
            length = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), None)
            finish = "stop" if length is not None else "length"
            length = length or len(ids)
            ids = ids[:length]
            lp = logprobs[b, :length]
            res = self._result(ids, lp.gather(-1, torch.tensor(ids, device=lp.device)[:, None])[:, 0].tolist(), finish)
            if self.topk:
                top = lp.topk(self.topk, dim=-1)
                res["topk_ids"] = top.indices.tolist()
                res["topk_logprobs"] = top.values.tolist()
            results.append(res)
        return results

    def _diffuse(self, prompts: list[str], max_tokens: int, seed: int) -> list[dict[str, Any]]:
        import torch

        from .t3s.diffusion import diffusion_generate

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outs = diffusion_generate(
            self.model, ids, max_tokens, mask_id=self.diffusion["mask_id"], pad_id=self.tokenizer.pad_token_id,
            eos_ids=self.eos_ids, steps=self.diffusion["steps"], block_length=self.diffusion["block_length"],
            temperature=self.temperature, top_p=self.top_p, generator=torch.Generator().manual_seed(seed))
        return [self._result(o["token_ids"], o["logprobs"], o["finish_reason"]) for o in outs]

    def _result(self, ids: list[int], logprobs: list[float], finish: str) -> dict[str, Any]:
        return {"response": self.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                "logprobs": logprobs, "finish_reason": finish, "error": None}

    def generate_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate for a list of requests; a failing batch is retried row by row to isolate errors."""
        if not rows:
            return []
        max_tokens = max(int(r["max_tokens"]) for r in rows)
        try:
            outs = self._generate([r["prompt_text"] for r in rows], max_tokens, int(rows[0]["seed"]))
        except Exception:
            outs = []
            for r in rows:
                try:
                    outs.extend(self._generate([r["prompt_text"]], int(r["max_tokens"]), int(r["seed"])))
                except Exception as e:
                    outs.append({"response": "", "token_ids": [], "logprobs": [], "finish_reason": "error",
                                 "error": f"{type(e).__name__}: {e}"})
        merged = []
        for r, o in zip(rows, outs):
            cap = int(r["max_tokens"])
            if len(o["token_ids"]) > cap:  # the batch ran to the longest cap; honour each row's own
                o = dict(o, token_ids=o["token_ids"][:cap], logprobs=o["logprobs"][:cap], finish_reason="length",
                         response=self.tokenizer.decode(o["token_ids"][:cap], skip_special_tokens=True),
                         **({"topk_ids": o["topk_ids"][:cap], "topk_logprobs": o["topk_logprobs"][:cap]}
                            if "topk_ids" in o else {}))
            merged.append({**r, **o})
        return merged

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = list(batch)
        rows = [{k: _plain(batch[k][i]) for k in keys} for i in range(len(batch[keys[0]]))]
        out = self.generate_rows(rows)
        return {k: [o.get(k) for o in out] for k in out[0]} if out else {}


def _plain(value: Any) -> Any:
    """Ray Data hands list columns back as numpy arrays; the driver wants plain Python values."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


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
    """Stream generated samples (one dict per request) back from the engine actors as they finish."""
    import ray.data

    from .models import resolve

    if not requests:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    actors = actor_plan(len(requests), spec.concurrency, spec.batch_size)
    # One block per engine batch, so that finished batches stream back instead of waiting for all.
    ds = ray.data.from_items(requests, override_num_blocks=-(-len(requests) // spec.batch_size))
    if spec.backend == "hf":
        ds = ds.map_batches(
            HFGenerator, batch_size=spec.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=spec.num_gpus_per_actor,
            num_cpus=1 if not spec.num_gpus_per_actor else None, batch_format="numpy",
            fn_constructor_kwargs={"model_ref": spec.model_ref, "temperature": spec.temperature, "top_p": spec.top_p,
                                   "topk_logprobs": spec.topk_logprobs, "dtype": spec.dtype,
                                   "trust_remote_code": spec.trust_remote_code, "revision": spec.revision,
                                   "sampler": spec.sampler, "diffusion_steps": spec.diffusion_steps,
                                   "diffusion_block_length": spec.diffusion_block_length,
                                   "mask_token": spec.mask_token})
    elif spec.sampler == "diffusion":
        raise ValueError("masked-diffusion models are sampled by the hf backend only (vLLM does not serve them)")
    elif spec.backend == "vllm":
        from .vllm_backend import vllm_generate

        ds = vllm_generate(ds, model_path=resolve(spec.model_ref), temperature=spec.temperature, top_p=spec.top_p,
                           topk_logprobs=spec.topk_logprobs, concurrency=actors, batch_size=spec.batch_size,
                           max_model_len=spec.max_model_len, engine_kwargs=spec.engine_kwargs,
                           num_gpus_per_actor=spec.num_gpus_per_actor, trust_remote_code=spec.trust_remote_code,
                           dtype=spec.dtype)
    else:
        raise ValueError(f"unknown generation backend {spec.backend!r} (use 'hf' or 'vllm')")
    for row in ds.iter_rows():
        yield {k: _plain(v) for k, v in row.items()}


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


def generate_and_verify(rows: list[dict[str, Any]], spec: GenerationSpec, verifier: str,
                        label: str = "generate") -> Iterator[tuple[str, list[dict[str, Any]] | None, dict | None]]:
    """Generate ``spec.n`` samples per prompt row and verify each against the row's ``answer``.

    Yields one ``(prompt_id, samples, error)`` per prompt as soon as all its samples are back:
    ``samples`` are the sample dicts with ``correct`` and ``extracted_answer`` added (sorted by
    sample index), or None with ``error`` when the prompt could not be generated at all. Every input
    row yields exactly once.
    """
    from .models import load_tokenizer

    check = get_verifier(verifier)
    tokenizer = load_tokenizer(spec.model_ref, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
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
        if len(bucket) < spec.n:
            continue
        samples = sorted(pending.pop(sample["id"]), key=lambda s: s["sample_index"])
        ok = [s for s in samples if not s.get("error")]
        gold = by_id[sample["id"]].get("answer")
        for s in samples:
            verdict = check(s["response"], gold) if not s.get("error") else None
            s["correct"] = bool(verdict and verdict.correct)
            s["extracted_answer"] = verdict.extracted if verdict else None
            tokens += len(s["token_ids"])
        finished += 1
        progress.update(finished, f", {tokens} tokens, {tokens / max(1e-9, time.time() - progress.start):.1f} tok/s")
        if not ok:
            yield sample["id"], None, {"id": sample["id"], "retryable": True,
                                       "reason": f"generation failed: {samples[0].get('error')}"}
        else:
            yield sample["id"], samples, None
    if pending:  # an engine lost rows without reporting them: never drop a prompt silently
        for pid, samples in pending.items():
            yield pid, None, {"id": pid, "retryable": True,
                              "reason": f"only {len(samples)} of {spec.n} samples came back from the engine"}
    progress.update(finished, f", {tokens} tokens", force=True)
