"""HF generation keeps only the sampled tokens' log-probabilities (and top-k), step by step: checked
against an independent teacher-forced forward pass over what was generated."""

from __future__ import annotations

import torch

from t3s_ray.engines.hf import HFGenerator


def test_hf_logprobs_and_topk_match_a_teacher_forced_forward():
    gen = HFGenerator("builtin:tiny-llama", temperature=0.9, top_p=0.95, topk_logprobs=3, dtype="float32", device="cpu")
    prompts = ["What is 12 + 30?", "Tom has 3 apples."]  # different lengths: left padding in the batch
    rows = [{"id": str(i), "sample_index": 0, "prompt_text": p, "max_tokens": 12, "seed": 5} for i, p in enumerate(prompts)]
    outs = gen.generate_rows(rows)
    assert all(len(o["token_ids"]) > 0 for o in outs)
    for prompt, out in zip(prompts, outs):
        prompt_ids = gen.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + out["token_ids"]])
        with torch.no_grad():
            logprobs = gen.model(input_ids=ids).logits[0].float().log_softmax(-1)
        rows_of_generated = logprobs[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(out["token_ids"])]
        expected = rows_of_generated.gather(-1, torch.tensor(out["token_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out["logprobs"]), expected, atol=1e-4, rtol=0)
        top = rows_of_generated.topk(3, dim=-1)
        assert out["topk_ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(out["topk_logprobs"]), top.values, atol=1e-4, rtol=0)
        assert all(lp <= top_lp[0] + 1e-6 for lp, top_lp in zip(out["logprobs"], out["topk_logprobs"]))


def test_hf_generation_keeps_no_step_logits():
    """The recorder holds one step's [B, V] log-softmax at a time, and nothing after generation."""
    from transformers import LogitsProcessorList

    from t3s_ray.engines.hf import SampledLogprobs

    gen = HFGenerator("builtin:tiny-llama", temperature=0.0, top_p=1.0, topk_logprobs=0, dtype="float32", device="cpu")
    enc = gen.tokenizer(["Count: 1 2 3"], return_tensors="pt", add_special_tokens=False)
    recorder = SampledLogprobs()
    seen = []

    class Spy:
        def __call__(self, input_ids, scores):
            seen.append(recorder.previous is None or recorder.previous.shape == scores.shape)
            return scores

    with torch.no_grad():
        out = gen.model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 logits_processor=LogitsProcessorList([recorder, Spy()]),
                                 pad_token_id=gen.tokenizer.pad_token_id)
    generated = out[:, enc["input_ids"].shape[1]:]
    logprobs, _, _ = recorder.finish(generated)
    assert logprobs.shape == (1, 6) and all(seen) and recorder.previous is None
    assert all(t.dim() == 1 for t in recorder.sampled)  # one value per row and step, no vocabulary axis


def test_recorded_logprobs_are_those_of_every_steps_logits_and_plain_generation_draws_the_same_tokens():
    """The recorder (score - logsumexp, step by step) against the path it replaced: ``generate`` with
    ``output_logits`` and a log-softmax of every step's logits, gathered at the drawn tokens. Without
    log-probabilities (what evaluation and the probe ask: ``GenerationSpec.logprobs`` False) the same
    seed draws the same tokens."""
    from t3s_ray.generate import GenerationSpec

    gen = HFGenerator("builtin:tiny-llama", temperature=0.9, top_p=0.95, topk_logprobs=0, dtype="float32", device="cpu")
    prompts = ["What is 12 + 30?", "Tom has 3 apples."]
    recorded = gen._generate(prompts, 10, seed=3)
    enc = gen.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(3)
    with torch.inference_mode():
        out = gen.model.generate(**enc, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, top_k=0,
                                 return_dict_in_generate=True, output_logits=True,
                                 pad_token_id=gen.tokenizer.pad_token_id, eos_token_id=sorted(gen.eos_ids))
    generated = out.sequences[:, enc["input_ids"].shape[1]:]
    every_step = torch.stack(out.logits, dim=1).float().log_softmax(-1).gather(-1, generated[..., None])[..., 0]
    for b, res in enumerate(recorded):
        n = len(res["token_ids"])
        assert n > 0 and res["token_ids"] == generated[b, :n].tolist()
        torch.testing.assert_close(torch.tensor(res["logprobs"]), every_step[b, :n], atol=1e-6, rtol=0)
    gen.record_logprobs = False
    plain = gen._generate(prompts, 10, seed=3)
    assert [p["token_ids"] for p in plain] == [r["token_ids"] for r in recorded]
    assert all(p["logprobs"] == [] for p in plain)
    assert GenerationSpec(model_ref="m").logprobs is False  # a stage asks for them (the traces do)
    assert HFGenerator.from_model(gen.model, gen.tokenizer, 1.0, 1.0, topk_logprobs=2, logprobs=False).record_logprobs
