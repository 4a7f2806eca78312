"""The masked-diffusion sampler (dLLM students) against hand-worked cases and a one-row reference loop."""

from types import SimpleNamespace

import pytest
import torch

from t3s_ray.t3s.diffusion import diffusion_generate, transfer_schedule

MASK, PAD, EOS, V = 9, 0, 8, 10


class CountingModel(torch.nn.Module):
    """Predicts, at every position, token 1 + (number of answer tokens already committed), with a
    confidence that falls with the position's distance from ``favourite``: the commit order and the
    tokens it produces can be worked out by hand."""

    def __init__(self, favourite: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.favourite = favourite

    def forward(self, input_ids, attention_mask):
        batch, total = input_ids.shape
        logits = torch.full((batch, total, V), -10.0)
        committed = ((input_ids != MASK) & (input_ids != PAD)).sum(-1)  # prompt tokens included
        for b in range(batch):
            token = int(committed[b]) % 8 + 1  # 1..8 (8 = EOS)
            for t in range(total):
                logits[b, t, token] = 5.0 - abs(t - self.favourite) - 0.1 * t  # no ties
        return SimpleNamespace(logits=logits)


def test_transfer_schedule_spreads_a_block_over_its_steps():
    assert transfer_schedule(8, 4) == [2, 2, 2, 2]
    assert transfer_schedule(7, 3) == [3, 2, 2]
    assert transfer_schedule(3, 10) == [1, 1, 1]  # never more steps than tokens
    assert sum(transfer_schedule(33, 5)) == 33


def test_one_token_per_step_commits_the_most_confident_position_first():
    # Prompt of 2 tokens, 4 answer tokens at columns 2..5; the model is most confident at column 4
    # (4.6), then 3 (3.7), 5 (3.5), 2 (2.8). Step s commits token 1 + (2 + s) % 8.
    out = diffusion_generate(CountingModel(favourite=4), [[3, 4]], 4, mask_id=MASK, pad_id=PAD, eos_ids={EOS},
                             steps=4, block_length=4)
    # column 4 <- 3 (2 committed so far), column 3 <- 4, column 5 <- 5, column 2 <- 6
    assert out[0]["token_ids"] == [6, 4, 3, 5]
    assert out[0]["finish_reason"] == "length"
    assert len(out[0]["logprobs"]) == 4 and all(lp <= 0 for lp in out[0]["logprobs"])


def test_blocks_are_filled_left_to_right():
    # Same model, blocks of 2: the favourite column 4 is in the second block, so the first block
    # (columns 2, 3) is committed first, column 3 before column 2.
    out = diffusion_generate(CountingModel(favourite=4), [[3, 4]], 4, mask_id=MASK, pad_id=PAD, eos_ids={EOS},
                             steps=4, block_length=2)
    assert out[0]["token_ids"] == [4, 3, 5, 6]


def test_several_tokens_per_step_and_eos_cuts_the_answer():
    # Two steps for 4 tokens: two commits per step, both with the same prediction.
    out = diffusion_generate(CountingModel(favourite=4), [[3, 4]], 4, mask_id=MASK, pad_id=PAD, eos_ids={EOS},
                             steps=2, block_length=4)
    assert out[0]["token_ids"] == [5, 3, 3, 5]
    # A prompt of 5 tokens makes the first prediction 1 + 5 % 8 = 6, then 7, then 8 = EOS.
    out = diffusion_generate(CountingModel(favourite=5), [[1, 2, 3, 4, 5]], 4, mask_id=MASK, pad_id=PAD,
                             eos_ids={EOS}, steps=4, block_length=4)
    # commits: column 5 <- 6, column 6 <- 7, column 7 <- 8 (EOS), column 8 <- 2; the answer ends at EOS
    assert out[0]["token_ids"] == [6, 7, 8] and out[0]["finish_reason"] == "stop"
    assert len(out[0]["logprobs"]) == 3


def reference_one_row(model, prompt, max_tokens, mask_id, steps, block_length):
    """A plain greedy loop over one row: predict, pick the single most confident masked position of
    the current block (or the few most confident), commit; no batching, no index tricks."""
    seq = list(prompt) + [mask_id] * max_tokens
    n_blocks = -(-max_tokens // block_length)
    per_block = max(1, steps // n_blocks)
    for block in range(n_blocks):
        cols = [len(prompt) + j for j in range(block * block_length, min(max_tokens, (block + 1) * block_length))]
        for k in transfer_schedule(len(cols), per_block):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits[0]
            candidates = []
            for c in cols:
                if seq[c] != mask_id:
                    continue
                row = logits[c].float().clone()
                row[mask_id] = float("-inf")
                token = int(row.argmax())
                candidates.append((float(row.log_softmax(-1)[token]), -c, c, token))
            for _, _, c, token in sorted(candidates, reverse=True)[:k]:
                seq[c] = token
    return seq[len(prompt):]


@pytest.mark.parametrize("steps,block", [(0, 32), (6, 4), (12, 3)])
def test_batched_sampler_matches_the_one_row_reference_on_the_tiny_denoiser(steps, block):
    from t3s_ray.models import load_model, load_tokenizer

    model = load_model("builtin:tiny-dllm", dtype="float32").eval()
    tok = load_tokenizer("builtin:tiny-dllm")
    prompts = [tok("1 + 2 =", add_special_tokens=False)["input_ids"],
               tok("what is 12 times 3 ?", add_special_tokens=False)["input_ids"]]
    assert len(prompts[0]) != len(prompts[1])  # rows of different lengths in one batch
    batched = diffusion_generate(model, prompts, 12, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id,
                                 eos_ids=set(), steps=steps, block_length=block)
    for prompt, got in zip(prompts, batched):
        want = reference_one_row(model, prompt, 12, tok.mask_token_id, steps or 12, block)
        assert got["token_ids"] == want
        assert tok.mask_token_id not in got["token_ids"]


def test_sampling_is_seeded_and_temperature_changes_the_draw():
    from t3s_ray.models import load_model, load_tokenizer

    model = load_model("builtin:tiny-dllm", dtype="float32").eval()
    tok = load_tokenizer("builtin:tiny-dllm")
    prompt = [tok("1 + 2 =", add_special_tokens=False)["input_ids"]]

    def draw(seed):
        return diffusion_generate(model, prompt, 16, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id,
                                  eos_ids=set(), temperature=1.0, top_p=0.95,
                                  generator=torch.Generator().manual_seed(seed))[0]["token_ids"]

    greedy = diffusion_generate(model, prompt, 16, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id,
                                eos_ids=set())[0]["token_ids"]
    assert draw(1) == draw(1)
    assert len({tuple(draw(s)) for s in range(4)} | {tuple(greedy)}) > 1


class ElsewhereGenerator:
    """A seeded CPU generator that claims to live on another device ("cuda"): on a CPU-only machine
    this stands in for a generator whose device differs from the probabilities' (on a GPU: a CPU
    generator and CUDA probabilities, which ``torch.multinomial`` refuses)."""

    device = torch.device("cuda")

    def __init__(self, seed: int):
        self.inner = torch.Generator().manual_seed(seed)


def refuse_foreign_generators(monkeypatch):
    """Random ops that, like CUDA's, refuse a generator of another device than the one they draw on;
    with an ``ElsewhereGenerator`` on its own (claimed) device they draw from its CPU generator."""
    real_rand, real_multinomial = torch.rand, torch.multinomial

    def unwrap(generator, draw_device):
        if isinstance(generator, ElsewhereGenerator):
            if torch.device(draw_device) != generator.device:
                raise RuntimeError(f"Expected a '{torch.device(draw_device).type}' device type for generator "
                                   f"but found '{generator.device.type}'")
            return generator.inner
        return generator

    def rand(*size, generator=None, device=None, **kw):
        device = device if device is not None else "cpu"
        inner = unwrap(generator, device)
        return real_rand(*size, generator=inner, device="cpu" if inner is not generator else device, **kw)

    def multinomial(input, num_samples, replacement=False, *, generator=None, **kw):
        return real_multinomial(input, num_samples, replacement, generator=unwrap(generator, input.device), **kw)

    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(torch, "multinomial", multinomial)


def test_sampling_works_with_a_generator_on_another_device_than_the_probabilities(monkeypatch):
    """The HF backend seeds a CPU generator whatever device the dLLM runs on: sampling at temperature
    > 0 must draw where the generator lives (it used to hand it to ``torch.multinomial`` with CUDA
    probabilities, and every GPU sample failed). The draw is the same as with a plain CPU generator."""
    from t3s_ray.models import load_model, load_tokenizer

    model = load_model("builtin:tiny-dllm", dtype="float32").eval()
    tok = load_tokenizer("builtin:tiny-dllm")
    prompts = [tok("1 + 2 =", add_special_tokens=False)["input_ids"], tok("7 x", add_special_tokens=False)["input_ids"]]

    def draw(generator):
        return [o["token_ids"] for o in diffusion_generate(
            model, prompts, 12, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, eos_ids=set(), steps=6,
            block_length=4, temperature=1.0, top_p=0.9, generator=generator)]

    plain = draw(torch.Generator().manual_seed(3))
    refuse_foreign_generators(monkeypatch)
    elsewhere = draw(ElsewhereGenerator(3))
    assert elsewhere == plain
    assert all(0 <= t < len(tok) and t != tok.mask_token_id for row in elsewhere for t in row)


def test_inverse_cdf_draws_follow_the_probabilities_and_never_a_zero():
    """The sampler's draw (one uniform per row through the CDF): frequencies match the probabilities,
    tokens of probability 0 (between others, first, last) are never drawn."""
    from t3s_ray.t3s.diffusion import _inverse_cdf_sample

    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    drawn = _inverse_cdf_sample(probs.expand(40000, -1).contiguous(), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=6).float() / len(drawn)
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)
    # unnormalised rows, and a row whose only mass is on its last token
    rows = torch.tensor([[2.0, 0.0, 6.0], [0.0, 0.0, 1e-30]])
    drawn = _inverse_cdf_sample(rows.repeat(500, 1), torch.Generator().manual_seed(1)).reshape(500, 2)
    assert set(drawn[:, 0].tolist()) == {0, 2} and set(drawn[:, 1].tolist()) == {2}
