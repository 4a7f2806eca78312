"""Losses against hand-computed numbers and straightforward per-position loops."""

import math

import pytest
import torch

from t3s_ray.t3s import (
    dllm_forced_mask,
    dllm_loss,
    keep_mask,
    masked_token_loss,
    token_logprobs_from_logits,
    topk_kd_loss,
)

# CE values: row 0 keeps 1 and 3, row 1 keeps 4, row 2 keeps nothing.
TOKEN_LOGPROBS = torch.tensor(
    [
        [0.0, -1.0, -2.0, -3.0],
        [0.0, -4.0, -9.0, 0.0],
        [0.0, -5.0, -6.0, -7.0],
    ]
)
KEEP = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "normalization,expected",
    [
        ("token_mean", (1 + 3 + 4) / 3),
        ("sum", 1 + 3 + 4),
        ("seq_mean", ((1 + 3) / 2 + 4 / 1) / 2),  # row 2 has no kept token and is not averaged
    ],
)
def test_masked_token_loss_normalizations(normalization, expected):
    assert masked_token_loss(TOKEN_LOGPROBS, KEEP, normalization).item() == pytest.approx(expected)


def test_masked_token_loss_ignores_non_finite_dropped_values():
    token_logprobs = TOKEN_LOGPROBS.clone()
    token_logprobs[0, 2] = -math.inf
    token_logprobs[2, 1] = math.nan
    assert masked_token_loss(token_logprobs, KEEP).item() == pytest.approx(8 / 3)


@pytest.mark.parametrize("normalization", ["token_mean", "sum", "seq_mean"])
def test_masked_token_loss_with_nothing_kept_is_a_differentiable_zero(normalization):
    token_logprobs = TOKEN_LOGPROBS.clone().requires_grad_(True)
    loss = masked_token_loss(token_logprobs, torch.zeros_like(KEEP), normalization)
    loss.backward()
    assert loss.item() == 0.0 and (token_logprobs.grad == 0).all()


def test_masked_token_loss_rejects_unknown_normalization():
    with pytest.raises(ValueError, match="unknown normalization 'mean'"):
        masked_token_loss(TOKEN_LOGPROBS, KEEP, "mean")


def test_dropped_anchors_get_no_gradient():
    generator = torch.Generator().manual_seed(0)
    batch, length, vocab = 2, 8, 11
    logits = torch.randn(batch, length, vocab, generator=generator, requires_grad=True)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    targets = torch.zeros(batch, length, dtype=torch.bool)
    targets[:, 3:] = True
    anchors = torch.zeros_like(targets)
    anchors[0, [3, 6]] = True
    anchors[1, 7] = True
    keep = keep_mask("t3s", anchors, targets)

    masked_token_loss(token_logprobs_from_logits(logits, input_ids, targets, chunk_size=3), keep).backward()

    # Token t is predicted by logits row t-1: only the rows of kept tokens carry gradient.
    source_row_norms = logits.grad.norm(dim=-1)
    for b in range(batch):
        for t in range(1, length):
            if keep[b, t]:
                assert source_row_norms[b, t - 1] > 0
            else:
                assert source_row_norms[b, t - 1] == 0
    assert (source_row_norms[:, -1] == 0).all()  # the last row predicts nothing


def dllm_batch(batch=4, length=12, vocab=13, prompt=4):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab - 1, (batch, length), generator=generator)
    response_mask = torch.zeros(batch, length, dtype=torch.bool)
    response_mask[:, prompt:] = True
    response_mask[1, -3:] = False  # padding
    forced = torch.zeros_like(response_mask)
    forced[:, [1, prompt, prompt + 2]] = True  # position 1 is a prompt token: must stay unmasked
    return input_ids, response_mask, forced


def test_dllm_forced_mask_respects_prompt_forced_and_mask_token():
    input_ids, response_mask, forced = dllm_batch()
    mask_token_id = 12
    for seed in range(20):
        noised, masked, sigma = dllm_forced_mask(
            input_ids, response_mask, forced, mask_token_id, generator=torch.Generator().manual_seed(seed)
        )
        assert not (masked & ~response_mask).any()
        assert (masked | ~(forced & response_mask)).all()
        assert torch.equal(noised[masked], torch.full((int(masked.sum()),), mask_token_id))
        assert torch.equal(noised[~masked], input_ids[~masked])
        assert ((sigma >= 0.3) & (sigma <= 0.8)).all() and sigma.shape == (input_ids.shape[0],)


def test_dllm_forced_mask_is_deterministic_per_generator():
    input_ids, response_mask, forced = dllm_batch()

    def draw(seed):
        return dllm_forced_mask(input_ids, response_mask, forced, 12, generator=torch.Generator().manual_seed(seed))

    for first, again in zip(draw(3), draw(3), strict=True):
        assert torch.equal(first, again)
    assert not torch.equal(draw(3)[1], draw(4)[1])


def test_dllm_random_mask_fraction_follows_sigma():
    batch, length = 64, 2000
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    response_mask = torch.ones(batch, length, dtype=torch.bool)
    forced = torch.zeros_like(response_mask)
    forced[:, :100] = True

    _, masked, sigma = dllm_forced_mask(
        input_ids, response_mask, forced, 1, mask_lo=0.2, mask_hi=0.9, generator=torch.Generator().manual_seed(0)
    )

    random_fraction = masked[:, 100:].float().mean(-1)  # non-forced tokens only
    assert (random_fraction - sigma).abs().max() < 0.05
    assert sigma.mean().item() == pytest.approx(0.55, abs=0.07)
    assert masked[:, :100].all()


def dllm_loss_inputs():
    input_ids, response_mask, forced = dllm_batch()
    _, masked, sigma = dllm_forced_mask(
        input_ids, response_mask, forced, 12, generator=torch.Generator().manual_seed(5)
    )
    logits = torch.randn(*input_ids.shape, 13, generator=torch.Generator().manual_seed(6))
    return logits, input_ids, masked, sigma, response_mask


def manual_masked_ce(logits, input_ids, masked):
    """{(b, t): CE of the original token at the same position}, one position at a time."""
    ce = {}
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            if masked[b, t]:
                ce[b, t] = -torch.log_softmax(logits[b, t].double(), -1)[input_ids[b, t]].item()
    return ce


def test_dllm_loss_is_mean_ce_over_masked_positions():
    logits, input_ids, masked, _, _ = dllm_loss_inputs()
    ce = manual_masked_ce(logits, input_ids, masked)
    expected = sum(ce.values()) / len(ce)
    assert dllm_loss(logits, input_ids, masked, chunk_size=5).item() == pytest.approx(expected, rel=1e-5)


def test_dllm_loss_inv_t_with_realised_fraction():
    logits, input_ids, masked, _, response_mask = dllm_loss_inputs()
    ce = manual_masked_ce(logits, input_ids, masked)
    per_sample = []
    for b in range(input_ids.shape[0]):
        n_masked, n_response = int(masked[b].sum()), int(response_mask[b].sum())
        realised = n_masked / n_response
        per_sample.append(sum(v for (row, _), v in ce.items() if row == b) / realised / n_response)
    expected = sum(per_sample) / len(per_sample)
    assert dllm_loss(logits, input_ids, masked, weighting="inv_t").item() == pytest.approx(expected, rel=1e-5)


def test_dllm_loss_inv_t_with_nominal_sigma():
    logits, input_ids, masked, sigma, response_mask = dllm_loss_inputs()
    ce = manual_masked_ce(logits, input_ids, masked)
    per_sample = [
        sum(v for (row, _), v in ce.items() if row == b) / sigma[b].item() / int(response_mask[b].sum())
        for b in range(input_ids.shape[0])
    ]
    expected = sum(per_sample) / len(per_sample)
    result = dllm_loss(logits, input_ids, masked, weighting="inv_t", sigma=sigma, response_mask=response_mask)
    assert result.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="response_mask"):
        dllm_loss(logits, input_ids, masked, weighting="inv_t", sigma=sigma)


def manual_topk_kl(student_logits, ids, teacher_logprobs, keep, tail_bucket):
    """Token-mean forward KL over the kept positions t >= 1, one position at a time, in fp64."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if not keep[b, t]:
                continue
            p = teacher_logprobs[b, t].double().exp()
            q = torch.softmax(student_logits[b, t - 1].double(), -1)[ids[b, t]]
            if tail_bucket:
                p = torch.cat([p, 1 - p.sum(-1, keepdim=True)])
                q = torch.cat([q, 1 - q.sum(-1, keepdim=True)])
            else:
                p, q = p / p.sum(), q / q.sum()
            total += (p * (p / q).log()).sum().item()
            count += 1
    return total / count


def kd_inputs(batch=2, length=6, vocab=20, k=4):
    generator = torch.Generator().manual_seed(2)
    student_logits = torch.randn(batch, length, vocab, generator=generator)
    teacher_logits = 2 * torch.randn(batch, length, vocab, generator=generator)
    teacher_logprobs, ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[0, :2] = False
    keep[1, 4] = False
    return student_logits, ids, teacher_logprobs, keep


@pytest.mark.parametrize("tail_bucket", [False, True])
def test_topk_kd_matches_manual_formula(tail_bucket):
    student_logits, ids, teacher_logprobs, keep = kd_inputs()
    expected = manual_topk_kl(student_logits, ids, teacher_logprobs, keep, tail_bucket)
    result = topk_kd_loss(student_logits, ids, teacher_logprobs, keep, tail_bucket=tail_bucket, chunk_size=3)
    assert result.item() == pytest.approx(expected, rel=1e-5)
    assert result.item() > 0.01


def test_topk_kd_is_zero_when_student_matches_teacher_on_support():
    student_logits, _, _, keep = kd_inputs()
    # The teacher's top-k is the student's own distribution, shifted one position: the logits at
    # t-1 describe the token at t.
    student_logprobs = torch.log_softmax(student_logits, -1)
    teacher_logprobs, ids = torch.zeros(2, 6, 4), torch.zeros(2, 6, 4, dtype=torch.long)
    teacher_logprobs[:, 1:], ids[:, 1:] = student_logprobs[:, :-1].topk(4, dim=-1)

    for tail_bucket in (False, True):
        assert topk_kd_loss(
            student_logits, ids, teacher_logprobs, keep, tail_bucket=tail_bucket
        ).item() == pytest.approx(0.0, abs=1e-6)
    # Renormalised over the support, a teacher with less total mass on it is still matched...
    assert topk_kd_loss(student_logits, ids, teacher_logprobs - 0.5, keep).item() == pytest.approx(0.0, abs=1e-6)
    # ...but the tail bucket sees the mass difference.
    assert topk_kd_loss(student_logits, ids, teacher_logprobs - 0.5, keep, tail_bucket=True).item() > 0.01


def test_topk_kd_gradient_flows_only_to_kept_source_rows():
    student_logits, ids, teacher_logprobs, keep = kd_inputs()
    student_logits.requires_grad_(True)
    topk_kd_loss(student_logits, ids, teacher_logprobs, keep, normalization="seq_mean").backward()
    has_grad = student_logits.grad.norm(dim=-1) > 0
    assert torch.equal(has_grad[:, :-1], keep[:, 1:])
    assert not has_grad[:, -1].any()
