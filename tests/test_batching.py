"""Micro-batches: token-budget splits, padded and padding-free layouts, per-example values in and out."""

import numpy as np
import pytest
import torch

from t3s_ray.batching import build_micro_batch, token_budget_micro_batches
from t3s_ray.t3s import token_confidence


def test_token_budget_split_padded_and_padding_free():
    lengths = [7, 9, 3, 9, 4, 1]  # sorted: 9 (row 1), 9 (row 3), 7 (0), 4 (4), 3 (2), 1 (5)
    # Padded, cost = rows x longest <= 16: the 9s alone (2 x 9 > 16), the rest needs 2 more runs
    # (7 + 4 + 3 + 1 in one is 4 x 7 > 16). Of the 4-run splits, [7] [4 3 1] computes 7 + 12 = 19
    # tokens, [7 4] [3 1] 14 + 6 = 20: the first is chosen (a greedy fill would take the second).
    assert token_budget_micro_batches(lengths, 16, padding_free=False) == [[1], [3], [0], [4, 2, 5]]
    # Padding-free, cost = sum of lengths <= 16, first fit decreasing: 9+7, 9+4+3, then 1.
    assert token_budget_micro_batches(lengths, 16, padding_free=True) == [[1, 0], [3, 4, 2], [5]]
    # A row over the budget is a micro-batch of its own; every row is used exactly once.
    for free in (False, True):
        parts = token_budget_micro_batches(lengths, 6, padding_free=free)
        assert parts[:3] == [[1], [3], [0]] and sorted(i for p in parts for i in p) == list(range(6))
        assert all(len(p) == 1 or (sum if free else lambda x: len(x) * max(x))([lengths[i] for i in p]) <= 6
                   for p in parts)


def test_token_budget_split_finds_the_fewest_micro_batches_with_the_least_padding():
    """Against brute force over every contiguous cut of the sorted rows."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = [int(x) for x in rng.integers(1, 40, rng.integers(1, 9))]
        budget = int(rng.integers(40, 120))
        got = token_budget_micro_batches(lengths, budget, padding_free=False)
        cost = lambda parts, lengths=lengths: (len(parts), sum(len(p) * max(lengths[i] for i in p) for p in parts))  # noqa: E731
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        best = None
        for cuts in itertools.product([0, 1], repeat=len(order) - 1):
            parts, start = [], 0
            for k, cut in enumerate(cuts, 1):
                if cut:
                    parts.append(order[start:k])
                    start = k
            parts.append(order[start:])
            if all(len(p) == 1 or len(p) * lengths[p[0]] <= budget for p in parts):
                best = min(best or (99, 0), cost(parts))
        assert cost(got) == best, (lengths, budget, got)


def examples_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        target = np.zeros(n, dtype=bool)
        target[n // 2:] = True  # a prompt, then the response
        out.append({"input_ids": rng.integers(3, 101, n), "target_mask": target})
    return out


def test_padded_and_packed_layouts_hold_the_same_examples():
    examples = examples_of([5, 8, 3])
    padded = build_micro_batch(examples, [2, 0, 1], 0, torch.device("cpu"))
    packed = build_micro_batch(examples, [2, 0, 1], 0, torch.device("cpu"), packed=True)
    assert padded.input_ids.shape == (3, 8) and padded.computed_tokens == 24 and padded.real_tokens == 16
    assert packed.input_ids.shape == (1, 16) and packed.attention_mask is None and packed.computed_tokens == 16
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert packed.input_ids[0].tolist() == [t for i in (2, 0, 1) for t in examples[i]["input_ids"]]
    per_example = [np.arange(int(examples[i]["target_mask"].sum())) + 10 * i for i in (2, 0, 1)]
    for batch in (padded, packed):
        values = batch.to_positions(per_example, dtype=torch.float32)
        assert [a.tolist() for a in batch.per_example(values)] == [a.tolist() for a in per_example]
        assert int(batch.target_mask.sum()) == sum(len(a) for a in per_example)


def test_packed_rows_attend_only_within_their_example():
    """transformers turns position ids that restart into a block-diagonal causal mask (flash
    attention's variable-length path does the same on GPUs): the packed confidences equal the
    padded ones. Without the restarts the rows would see each other and the values would differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    examples = examples_of([7, 12, 4, 9], seed=1)
    padded = build_micro_batch(examples, [0, 1, 2, 3], 0, torch.device("cpu"))
    packed = build_micro_batch(examples, [0, 1, 2, 3], 0, torch.device("cpu"), packed=True)
    with torch.no_grad():
        a = token_confidence(model, padded.input_ids, padded.attention_mask, padded.predicted_mask)
        b = token_confidence(model, packed.input_ids, None, packed.predicted_mask, position_ids=packed.position_ids)
        leaky = token_confidence(model, packed.input_ids, None, packed.predicted_mask,
                                 position_ids=torch.arange(packed.input_ids.shape[1])[None])
    for x, y in zip(padded.per_example(a), packed.per_example(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    assert not np.allclose(np.concatenate(packed.per_example(leaky)), np.concatenate(packed.per_example(b)),
                           atol=1e-3)


def test_a_packed_micro_batch_holds_the_boundaries_flash_attention_would_derive():
    """The boundaries a packed micro-batch carries equal what transformers derives from its position
    ids (its own helper, which flash attention otherwise runs in every layer); a padded batch has none."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    examples = examples_of([5, 1, 9, 3])
    packed = build_micro_batch(examples, [2, 0, 3, 1], 0, torch.device("cpu"), packed=True)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(packed.position_ids)
    assert packed.cu_seq_lens.dtype == cu_q.dtype == torch.int32
    assert packed.cu_seq_lens.tolist() == cu_q.tolist() == cu_k.tolist() == [0, 9, 14, 17, 18]
    assert isinstance(packed.max_seq_len, int) and packed.max_seq_len == int(max_q) == int(max_k) == 9
    assert packed.packing == {"position_ids": packed.position_ids, "cu_seq_lens": packed.cu_seq_lens,
                              "max_seq_len": 9}
    padded = build_micro_batch(examples, [2, 0, 3, 1], 0, torch.device("cpu"))
    assert padded.packing == {"position_ids": None, "cu_seq_lens": None, "max_seq_len": None}


FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _varlen_attention(calls: list):
    """An attention implementation whose name says flash attention, for the CPU: it records the
    flash keyword arguments each layer receives and, given ``cu_seq_lens_q``, attends causally within
    each sequence it delimits (flash attention's variable-length path), else over the whole row."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append({k: kwargs.get(k) for k in FLASH_KEYS})
        key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        cu = kwargs.get("cu_seq_lens_q")
        bounds = cu.tolist() if cu is not None else [0, query.shape[2]]
        parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                                scale=scaling) for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None

    return attention


def test_flash_attention_gets_the_micro_batch_boundaries_exactly_when_packed():
    """The worker's module (``LogprobModule``) passes a packed batch's boundaries to the model when its
    attention is flash attention, so that no layer derives them from the position ids (a host sync
    each): every layer receives them, and the packed confidences and loss equal the padded ones under
    sdpa. sdpa gets none (its mask comes from the position ids), nor does a padded batch."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    from t3s_ray.worker import LogprobModule

    calls: list = []
    AttentionInterface.register("flash_varlen_cpu_test", _varlen_attention(calls))
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    module = LogprobModule(model, chunk_size=5)
    examples = examples_of([7, 12, 4, 9], seed=1)
    padded = build_micro_batch(examples, [0, 1, 2, 3], 0, torch.device("cpu"))
    packed = build_micro_batch(examples, [0, 1, 2, 3], 0, torch.device("cpu"), packed=True)
    weights = [torch.rand(b.target_mask.shape) * b.predicted_mask for b in (padded, packed)]

    def run(batch, w):
        calls.clear()
        with torch.no_grad():
            conf = module(batch.input_ids, batch.attention_mask, batch.predicted_mask, **batch.packing)
            loss, _ = module(batch.input_ids, batch.attention_mask, batch.predicted_mask, loss_weights=w,
                             **batch.packing)
        return batch.per_example(conf), loss

    reference, ref_loss = run(padded, weights[0])
    assert not calls  # sdpa: the spy never ran

    model.config._attn_implementation = "flash_varlen_cpu_test"
    confidences, loss = run(packed, packed.to_positions(padded.per_example(weights[0]), dtype=torch.float32))
    assert len(calls) == 2 * config.num_hidden_layers  # every layer of both passes
    for got in calls:
        assert got["cu_seq_lens_q"] is packed.cu_seq_lens and got["cu_seq_lens_k"] is packed.cu_seq_lens
        assert got["max_length_q"] == got["max_length_k"] == 12 and isinstance(got["max_length_q"], int)
    for x, y in zip(reference, confidences):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)

    run(padded, weights[0])  # flash attention on a padded batch: the mask says where rows end
    assert calls and all(v is None for got in calls for v in got.values())

    model.config._attn_implementation = "sdpa"
    seen: list = []
    model.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(sorted(kw)), with_kwargs=True)
    run(packed, weights[1])
    assert seen and all(not set(FLASH_KEYS) & set(kw) for kw in seen)


@pytest.mark.parametrize("normalization", ["token_mean", "sum", "seq_mean"])
def test_loss_weights_reproduce_the_normalised_loss_however_split(normalization):
    """Σ w·CE summed over any split of a batch equals normalize_token_losses of the whole batch."""
    from t3s_ray.t3s import normalize_token_losses, token_loss_weights

    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(4, 6, generator=generator) > 0.4
    keep[2] = False  # a sequence with nothing kept
    ce = torch.rand(4, 6, generator=generator)
    whole = normalize_token_losses(ce, keep, normalization)
    count = {"token_mean": keep.sum(), "seq_mean": keep.any(-1).sum(), "sum": 1}[normalization]
    shares = [(token_loss_weights(keep[i:i + 1], normalization, float(count)) * ce[i:i + 1]).sum() for i in range(4)]
    torch.testing.assert_close(sum(shares), whole)
