"""The ``hf`` engine: transformers ``generate`` with left padding, in a Ray Data actor pool.

Each actor loads the model once (:class:`HFGenerator`) and generates a batch of requests at a time,
recording each sampled token's log-probability step by step (:class:`SampledLogprobs`) instead of
every step's logits, and only when the stage uses them (``GenerationSpec.logprobs``: the traces
keep them; evaluation and the probe only verify answers). Masked-diffusion models (dLLM students)
are sampled here too, by iterative unmasking (``t3s_ray/t3s/diffusion.py``): LLaDA2 block by block
under a block-causal mask (``block_diffusion_generate``), the others by LLaDA's sampler
(``diffusion_generate``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .rows import batch_rows, rows_batch


class HFGenerator:
    """A Ray Data actor: transformers ``generate`` with left padding on a batch of requests.

    Also used directly (without Ray) as the bare-loop baseline of ``bench/traces_throughput.py``.
    """

    def __init__(self, model_ref: str, temperature: float, top_p: float, topk_logprobs: int, dtype: str = "auto",
                 trust_remote_code: bool = False, revision: str | None = None, device: str | None = None,
                 sampler: str = "ar", diffusion_steps: int = 0, diffusion_block_length: int = 32,
                 mask_token: str = "", diffusion_threshold: float | None = None,
                 diffusion_steps_per_block: int | None = None, logprobs: bool = True):
        import torch

        from ..models import load_model, load_tokenizer, mask_token_id

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto" and self.device == "cpu":
            dtype = "float32"  # bf16 matmuls are emulated on most CPUs: ~10x slower than fp32
        self.tokenizer = load_tokenizer(model_ref, revision=revision, trust_remote_code=trust_remote_code)
        model = load_model(model_ref, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                           device=self.device).eval()
        self.__dict__.update(vars(HFGenerator.from_model(model, self.tokenizer, temperature, top_p, topk_logprobs,
                                                         logprobs=logprobs)))
        if sampler == "diffusion":
            if topk_logprobs:
                raise ValueError("top-k logprobs are not available from the diffusion sampler")
            self.diffusion = {"mask_id": mask_token_id(self.tokenizer, mask_token, model_ref), "steps": diffusion_steps,
                              "block_length": diffusion_block_length, "threshold": diffusion_threshold,
                              "steps_per_block": diffusion_steps_per_block}

    @classmethod
    def from_model(cls, model, tokenizer, temperature: float, top_p: float, topk_logprobs: int = 0,
                   logprobs: bool = True) -> "HFGenerator":
        """Wrap a model already in memory (a training worker measuring its own train accuracy).
        ``logprobs``: record the sampled tokens' log-probabilities (with top-k > 0 they are always
        recorded); without, a sample's ``logprobs`` is empty and generation is plain ``generate``."""
        self = cls.__new__(cls)
        self.device = next(model.parameters()).device
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer.padding_side = "left"
        self.temperature, self.top_p, self.topk = temperature, top_p, topk_logprobs
        self.record_logprobs = bool(logprobs or topk_logprobs)
        self.diffusion = None  # set by __init__ for a masked-diffusion model
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # none on masked LMs
        eos = gen_eos if gen_eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        return self

    def _generate(self, prompts: list[str], max_tokens: int, seed: int) -> list[dict[str, Any]]:
        import torch

        if self.diffusion:
            return self._diffuse(prompts, max_tokens, seed)
        from transformers import LogitsProcessorList

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        do_sample = self.temperature > 0
        recorder = SampledLogprobs(self.topk) if self.record_logprobs else None
        with torch.inference_mode():
            sequences = self.model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=do_sample,
                temperature=self.temperature if do_sample else None, top_p=self.top_p if do_sample else None,
                top_k=0 if do_sample else None, logits_processor=LogitsProcessorList([recorder] if recorder else []),
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids))
            gen = sequences[:, enc["input_ids"].shape[1]:]
            logprobs, top_ids, top_lps = recorder.finish(gen) if recorder else (None, None, None)
        results = []
        for b in range(gen.shape[0]):
            ids = gen[b].tolist()
            length = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), None)
            finish = "stop" if length is not None else "length"
            length = length or len(ids)
            res = self._result(ids[:length], logprobs[b, :length].tolist() if recorder else [], finish)
            if self.topk:
                res["topk_ids"] = top_ids[b, :length].tolist()
                res["topk_logprobs"] = top_lps[b, :length].tolist()
            results.append(res)
        return results

    def _diffuse(self, prompts: list[str], max_tokens: int, seed: int) -> list[dict[str, Any]]:
        import torch

        from ..models import uses_block_diffusion
        from ..t3s.diffusion import block_diffusion_generate, diffusion_generate

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        d = self.diffusion
        if uses_block_diffusion(self.model):  # LLaDA2: block-causal threshold decoding, prefix cache
            outs = block_diffusion_generate(
                self.model, ids, max_tokens, mask_id=d["mask_id"], eos_ids=self.eos_ids, block_length=d["block_length"],
                steps_per_block=d.get("steps_per_block") or 0,
                threshold=0.95 if d.get("threshold") is None else d["threshold"], temperature=self.temperature,
                top_p=self.top_p, generator=torch.Generator().manual_seed(seed))
            return [self._result(o["token_ids"], o["logprobs"], o["finish_reason"]) for o in outs]
        # A CPU generator whatever the model's device: the sampler draws its uniforms where the
        # generator lives, so a seed gives the same draws on the CPU and on a GPU.
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
        return rows_batch(self.generate_rows(batch_rows(batch)))


class SampledLogprobs:
    """A logits processor that keeps, step by step, each row's log-probability of the token it then
    sampled (and the top-k), instead of every step's full-vocabulary logits.

    ``generate`` calls it with step t's logits before the sampling warpers (temperature, top-p):
    the model's own distribution, which is what vLLM reports by default. The token drawn from it
    is known one call later (the last column of ``input_ids``), so between calls it keeps step t's
    scores (the fp32 copy ``generate`` makes of the logits each step, which the warpers after it do
    not change in place) and their log-normaliser ``logsumexp`` (``[B]``): the log-probability is
    ``score[token] - logsumexp``, the same number ``log_softmax(...).gather(token)`` gives without
    writing a ``[B, V]`` log-softmax every step. Memory O(B·V) instead of O(B·steps·V) (at Qwen3's
    vocabulary, 0.6 MB a token, 10 GB for a 16k-token sample, with ``output_logits``).
    """

    def __init__(self, topk: int = 0):
        self.topk = topk
        self.previous = None       # step t's scores [B, V]
        self.normaliser = None     # their logsumexp [B]
        self.sampled: list = []
        self.top_ids: list = []
        self.top_lps: list = []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self._take(input_ids[:, -1])
        self.previous = scores
        self.normaliser = scores.float().logsumexp(-1)
        return scores

    def _take(self, tokens) -> None:
        scores, normaliser = self.previous, self.normaliser
        picked = scores.gather(-1, tokens[:, None].to(scores.device))[:, 0].float()
        self.sampled.append(picked - normaliser)
        if self.topk:
            top = scores.topk(self.topk, dim=-1)
            self.top_ids.append(top.indices)
            self.top_lps.append(top.values.float() - normaliser[:, None])
        self.previous = self.normaliser = None

    def finish(self, generated):
        """``[B, steps]`` log-probabilities of ``generated`` (and ``[B, steps, k]`` top-k ids / values)."""
        import torch

        if self.previous is not None:  # the last step's token is only in the output
            self._take(generated[:, -1])
        steps = generated.shape[1]
        if len(self.sampled) != steps:
            raise RuntimeError(f"recorded {len(self.sampled)} steps' log-probabilities for {steps} generated tokens")
        if not steps:
            empty = torch.zeros((generated.shape[0], 0))
            return empty, empty.long()[..., None], empty[..., None]
        logprobs = torch.stack(self.sampled, dim=1).cpu()
        if not self.topk:
            return logprobs, None, None
        return logprobs, torch.stack(self.top_ids, dim=1).cpu(), torch.stack(self.top_lps, dim=1).cpu()


def generate_dataset(ds, spec, actors: int, placement_groups: list):
    """``ds`` (one request per row) mapped by ``actors`` :class:`HFGenerator` actors on ``spec``'s model
    and sampling settings; lazy. (HF actors make no placement groups: ``placement_groups`` is unused.)"""
    import ray.data

    gpus = spec.engine.gpus_per_engine
    return ds.map_batches(
        HFGenerator, batch_size=spec.engine.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus, num_cpus=1 if not gpus else None, batch_format="numpy",
        fn_constructor_kwargs={"model_ref": spec.model.ref, "temperature": spec.sampling.temperature,
                               "top_p": spec.sampling.top_p, "topk_logprobs": spec.topk_logprobs,
                               "dtype": spec.model.dtype, "trust_remote_code": spec.model.trust_remote_code,
                               "revision": spec.model.revision, "sampler": spec.sampler,
                               "diffusion_steps": spec.diffusion_steps,
                               "diffusion_block_length": spec.diffusion_block_length,
                               "diffusion_threshold": spec.diffusion_threshold,
                               "diffusion_steps_per_block": spec.diffusion_steps_per_block,
                               "mask_token": spec.mask_token, "logprobs": spec.logprobs})
