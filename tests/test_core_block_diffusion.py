"""LLaDA2's block diffusion (``t3s_ray/t3s/diffusion.py``): the training masks and layout against
hand-written values and a direct block-causal forward, the no-shift chunked loss against the naive
full-logit CE, and the block-causal threshold sampler against hand-worked cases on a stub model, a
batch against one-row runs, the prefix cache against no cache."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from t3s_ray import models
from t3s_ray.t3s.diffusion import (
    block_causal_mask,
    block_diffusion_generate,
    block_diffusion_mask,
    denoiser_loss,
    diffusion_batch,
)

MASK, FILL, PAD = 99, 98, 97


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("builtin:tiny-llada2", dtype="float32").eval()


def test_the_block_diffusion_mask_for_four_tokens_in_blocks_of_two():
    # columns: noisy 0 1 | 2 3, clean 0 1 | 2 3
    want = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0: its own noisy block, no clean block before it
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # noisy block 1: its own noisy block and clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0: itself
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # clean block 1: clean blocks 0 and 1
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_diffusion_mask(4, 2), want)
    assert torch.equal(block_causal_mask(5, 2), torch.tensor([
        [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


def a_batch():
    """Two right-padded rows: prompt 3 + response 4 (length 7), prompt 2 + response 2 (length 4)."""
    ids = torch.tensor([[1, 2, 3, 10, 11, 12, 13], [4, 5, 20, 21, PAD, PAD, PAD]])
    attention = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    forced = torch.tensor([[0, 0, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    return ids, attention, response, forced


def test_the_layout_fills_to_whole_blocks_and_masks_the_noisy_half_only():
    ids, attention, response, forced = a_batch()
    seen_forced = 0
    for seed in range(20):
        b = diffusion_batch(ids, attention, response, forced, mask_id=MASK, fill_id=FILL, block_size=4,
                            generator=torch.Generator().manual_seed(seed))
        assert b.length == 8 and b.input_ids.shape == (2, 16)
        assert b.targets.tolist() == [[1, 2, 3, 10, 11, 12, 13, FILL], [4, 5, 20, 21, FILL, FILL, FILL, FILL]]
        # maskable: the response and each row's fill up to its own last block's end (row 1 ends at 4: none)
        assert b.maskable.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0]]
        assert torch.equal(b.input_ids[:, 8:], b.targets)  # the clean half is clean
        noisy = b.input_ids[:, :8]
        assert torch.equal(noisy == MASK, b.masked) and not (b.masked & ~b.maskable).any()
        assert b.masked[0, 4] and b.masked[0, 6] and b.masked[1, 2]  # forced: always masked
        seen_forced += 1
        assert torch.equal(noisy[~b.masked], b.targets[~b.masked])
        assert ((b.sigma >= 0.3) & (b.sigma <= 0.8)).all()
        assert b.position_ids.tolist() == [list(range(8)) * 2] * 2
        assert torch.equal(b.attention_mask, block_diffusion_mask(8, 4)[None, None])
    assert seen_forced == 20
    # No fill: nothing past a row's end is maskable, and the tail of its last block is hidden.
    b = diffusion_batch(ids, attention, response, forced, mask_id=MASK, fill_id=FILL, block_size=4, fill=False,
                        generator=torch.Generator().manual_seed(0))
    assert b.maskable.tolist() == [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0, 0]]
    assert b.attention_mask.shape == (2, 1, 16, 16)
    assert not b.attention_mask[0, 0, :, 7].any() and not b.attention_mask[0, 0, :, 15].any()
    assert b.attention_mask[0, 0, 6, 6] and b.attention_mask[0, 0, 6, 8]
    # The full layout: the noisy tokens alone, each row seeing its own tokens and fill.
    b = diffusion_batch(ids, attention, response, forced, mask_id=MASK, fill_id=FILL, block_size=4, layout="full",
                        generator=torch.Generator().manual_seed(0))
    assert b.input_ids.shape == (2, 8) and b.attention_mask.shape == (2, 1, 1, 8)
    assert b.attention_mask[:, 0, 0].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="right-padded"):
        diffusion_batch(ids, attention.flip(-1), response, forced, mask_id=MASK, fill_id=FILL)


def test_noisy_block_logits_equal_a_direct_block_causal_forward(tiny):
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (2, 12))
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 3:] = True
    b = diffusion_batch(ids, attention, response, torch.zeros_like(response), mask_id=7, fill_id=3, block_size=4,
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layout = tiny(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits[:, :12]
        for k in range(3):
            start, end = 4 * k, 4 * (k + 1)
            direct_ids = torch.cat([b.targets[:, :start], b.input_ids[:, start:end]], dim=1)
            direct = tiny(direct_ids, attention_mask=block_causal_mask(end, 4)[None, None],
                          position_ids=torch.arange(end)[None]).logits
            torch.testing.assert_close(layout[:, start:end], direct[:, start:end], rtol=0, atol=2e-5)


def test_the_chunked_no_shift_loss_equals_the_naive_cross_entropy(tiny, monkeypatch):
    torch.manual_seed(0)
    ids, attention, response, forced = a_batch()
    b = diffusion_batch(ids, attention, response, forced, mask_id=7, fill_id=3, block_size=4,
                        generator=torch.Generator().manual_seed(2))
    model = models.load_model("builtin:tiny-llada2", dtype="float32").train()
    # naive: every position's logits, CE of position t against token t, mean over the masked ones
    logits = model(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits[:, :b.length]
    naive = F.cross_entropy(logits[b.masked], b.targets[b.masked])
    naive.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    def no_forward(*args, **kwargs):
        raise AssertionError("the lm head's forward ran")

    monkeypatch.setattr(model.lm_head, "forward", no_forward)
    loss, logprobs = denoiser_loss(model, b, chunk_size=3)
    loss.backward()
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(logprobs[b.masked], -F.cross_entropy(logits[b.masked], b.targets[b.masked],
                                                                    reduction="none").detach())
    assert not logprobs[~b.masked].any()
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The sampler on a stub model
# --------------------------------------------------------------------------------------------

V, SMASK, EOS = 8, 7, 6  # the stub's vocabulary, mask and EOS


class ScriptedModel(torch.nn.Module):
    """Predicts at absolute position p the token ``script[p] = (token, margin)``: logit ``margin`` for
    it, 0 for the others, so that (the mask token excluded) its probability is e^m / (e^m + 6), by
    hand. A decoder and an identity lm head, as the sampler expects; records what every forward saw."""

    def __init__(self, script: dict[int, tuple[int, float]]):
        super().__init__()
        self.model = ScriptedDecoder(script)
        self.lm_head = torch.nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(V))

    @property
    def calls(self) -> list[dict]:
        return self.model.calls

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model


class ScriptedDecoder(torch.nn.Module):
    def __init__(self, script: dict[int, tuple[int, float]]):
        super().__init__()
        self.script = script
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None):
        self.calls.append({"ids": input_ids.tolist(), "positions": position_ids.tolist()})
        hidden = torch.zeros(*input_ids.shape, V)
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1]):
                token, margin = self.script.get(int(position_ids[b, t]), (0, 0.0))
                hidden[b, t, token] = margin
        return SimpleNamespace(last_hidden_state=hidden)


def confidence(margin: float) -> float:
    return math.exp(margin) / (math.exp(margin) + 6)


def logprob(margin: float) -> float:
    return margin - math.log(math.exp(margin) + 6)


# Prompt of 5 in blocks of 4: the first block decoded is block 1 (columns 4..7), whose column 4 is the
# prompt's tail. Columns 6 and 7 pass the threshold 0.9 (0.961, 0.937), column 5 does not (0.552);
# in block 2 (8..11) nothing does: one commit per step, most confident first: 9, 10, 8, 11.
SCRIPT = {5: (1, 2.0), 6: (3, 5.0), 7: (4, 4.5), 8: (2, 1.0), 9: (5, 3.0), 10: (1, 2.5), 11: (2, 0.5)}


def test_hand_worked_blocks_aligned_to_the_prompt_with_the_threshold_and_the_fallback():
    assert confidence(5.0) > 0.9 and confidence(4.5) > 0.9 and confidence(3.0) < 0.9
    stub = ScriptedModel(SCRIPT)
    out = block_diffusion_generate(stub, [[1, 2, 3, 4, 5]], 6, mask_id=SMASK, eos_ids={EOS}, block_length=4,
                                   threshold=0.9, use_cache=False)[0]
    assert out["token_ids"] == [1, 3, 4, 2, 5, 1] and out["finish_reason"] == "length"
    for got, margin in zip(out["logprobs"], [2.0, 5.0, 4.5, 1.0, 3.0, 2.5]):
        assert got == pytest.approx(logprob(margin), abs=1e-5)
    # Each forward saw only the columns before its block's end: 8, then 12.
    assert [len(c["ids"][0]) for c in stub.calls] == [8, 8, 12, 12, 12, 12]
    masked = [[t for t, tok in enumerate(c["ids"][0]) if tok == SMASK and t < 12] for c in stub.calls]
    assert masked == [[5, 6, 7], [5],  # step 1 committed 6 and 7 at once, step 2 the fallback's 5
                      [8, 9, 10, 11], [8, 10, 11], [8, 11], [11]]  # then one a step
    assert stub.calls[0]["ids"][0][:5] == [1, 2, 3, 4, 5]  # the prompt is never touched
    # With the cache: the prompt's full block prefilled, each step only its block, a completed block
    # run once more; the same tokens.
    cached = ScriptedModel(SCRIPT)
    again = block_diffusion_generate(cached, [[1, 2, 3, 4, 5]], 6, mask_id=SMASK, eos_ids={EOS}, block_length=4,
                                     threshold=0.9, use_cache=True)[0]
    assert again == out
    assert [c["positions"][0] for c in cached.calls] == [[0, 1, 2, 3]] + [[4, 5, 6, 7]] * 3 + [[8, 9, 10, 11]] * 4


def test_steps_per_block_spreads_the_fallback():
    stub = ScriptedModel(SCRIPT)
    out = block_diffusion_generate(stub, [[1, 2, 3, 4, 5]], 6, mask_id=SMASK, eos_ids={EOS}, block_length=4,
                                   threshold=0.9, steps_per_block=2, use_cache=False)[0]
    # block 1: step 1 commits 6 and 7 (two above the threshold, as many as the schedule's 2), step 2 the
    # last one; block 2 in two steps of two: 9 and 10, then 8 and 11.
    assert out["token_ids"] == [1, 3, 4, 2, 5, 1] and len(stub.calls) == 4


def test_the_answer_stops_after_the_block_holding_eos():
    script = {2: (1, 5.0), 3: (2, 5.0), 4: (3, 5.0), 5: (EOS, 5.0), 6: (EOS, 5.0), 7: (EOS, 5.0), 8: (4, 5.0)}
    stub = ScriptedModel(script)
    out = block_diffusion_generate(stub, [[1, 2]], 12, mask_id=SMASK, eos_ids={EOS}, block_length=4,
                                   threshold=0.9, use_cache=False)[0]
    assert out["token_ids"] == [1, 2, 3, EOS] and out["finish_reason"] == "stop" and len(out["logprobs"]) == 4
    assert [len(c["ids"][0]) for c in stub.calls] == [4, 8]  # block 2 never runs


def test_a_batch_equals_its_rows_run_alone():
    prompts = [[1, 2, 3, 4, 5], [1, 2], [3] * 9]
    script = {**SCRIPT, 2: (5, 4.0), 3: (EOS, 1.0), 4: (2, 3.5), 12: (3, 1.5), 13: (EOS, 6.0)}
    batch = block_diffusion_generate(ScriptedModel(script), prompts, 6, mask_id=SMASK, eos_ids={EOS}, block_length=4,
                                     threshold=0.9)
    alone = [block_diffusion_generate(ScriptedModel(script), [p], 6, mask_id=SMASK, eos_ids={EOS}, block_length=4,
                                      threshold=0.9)[0] for p in prompts]
    assert batch == alone
    assert {o["finish_reason"] for o in batch} == {"stop", "length"}


def test_on_the_tiny_model_cache_and_batch_change_no_token(tiny):
    tok = models.load_tokenizer("builtin:tiny-llada2")
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("1 + 2 =", "what is 12 times 3 ? please")]
    model = models.load_model("builtin:tiny-llada2", dtype="float32").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked predictions: several positions pass the threshold per step
    kw = dict(mask_id=tok.mask_token_id, eos_ids=set(), block_length=8, threshold=0.5)
    stats: dict = {}
    cached = block_diffusion_generate(model, prompts, 20, use_cache=True, stats=stats, **kw)
    plain = block_diffusion_generate(model, prompts, 20, use_cache=False, **kw)
    alone = [block_diffusion_generate(model, [p], 20, **kw)[0] for p in prompts]
    for c, p, a in zip(cached, plain, alone):
        assert c["token_ids"] == p["token_ids"] == a["token_ids"]
        assert len(c["token_ids"]) == 20 and tok.mask_token_id not in c["token_ids"]
        torch.testing.assert_close(torch.tensor(c["logprobs"]), torch.tensor(p["logprobs"]), rtol=0, atol=1e-4)
    assert stats["forwards"] < 2 * 20  # the threshold committed several tokens in some steps
    # Seeded sampling: the same seed, the same draw; the draw differs from greedy.
    draw = [block_diffusion_generate(model, prompts, 20, temperature=1.0, generator=torch.Generator().manual_seed(5),
                                     **kw) for _ in range(2)]
    assert draw[0] == draw[1] and [o["token_ids"] for o in draw[0]] != [o["token_ids"] for o in cached]


def test_the_hf_engine_samples_llada2_with_the_block_sampler():
    from t3s_ray.engines.hf import HFGenerator

    gen = HFGenerator("builtin:tiny-llada2", temperature=0.0, top_p=1.0, topk_logprobs=0, device="cpu",
                      sampler="diffusion", diffusion_block_length=8, diffusion_threshold=0.9)
    rows = [{"id": "a", "prompt_text": "1 + 2 =", "max_tokens": 5, "seed": 0},
            {"id": "b", "prompt_text": "what is 3 times 4 ?", "max_tokens": 5, "seed": 0}]
    outs = gen.generate_rows(rows)
    tok = gen.tokenizer
    # the answer ends at the chat turn's end or at the fill token (the builtin's generation config)
    assert gen.eos_ids == {tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")}
    for row, out in zip(rows, outs):
        assert out["error"] is None and 1 <= len(out["token_ids"]) <= 5
        prompt = tok(row["prompt_text"], add_special_tokens=False)["input_ids"]
        want = block_diffusion_generate(gen.model, [prompt], 5, mask_id=tok.mask_token_id, eos_ids=gen.eos_ids,
                                        block_length=8, threshold=0.9)[0]
        assert out["token_ids"] == want["token_ids"]
