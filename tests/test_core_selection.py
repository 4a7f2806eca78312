"""Selection rules on small hand-written tensors with hand-written expected masks."""

import numpy as np
import pytest
import torch

from t3s_ray.t3s import (
    cap_anchor_frac,
    delta_latest,
    ema_update,
    keep_mask,
    select_delta,
    select_forced,
    select_top_frac,
)

# Two sequences of 6 positions; position 0 is a prompt token in both, row 1 is right-padded.
DELTA = torch.tensor(
    [
        [9.0, 0.5, -0.3, 0.0, 0.1, -0.1],
        [9.0, -0.25, 0.3, 0.2, 9.0, 9.0],
    ]
)
TARGETS = torch.tensor(
    [
        [0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0, 0],
    ],
    dtype=torch.bool,
)


def mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_select_delta_default_tau_is_strictly_positive():
    expected = mask([[0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    assert torch.equal(select_delta(DELTA, TARGETS), expected)


def test_select_delta_with_tau():
    expected = mask([[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
    assert torch.equal(select_delta(DELTA, TARGETS, tau=0.2), expected)


def test_select_forced():
    expected = mask([[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    assert torch.equal(select_forced(DELTA, TARGETS, tau=0.2), expected)
    expected_tau0 = mask([[0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]])
    assert torch.equal(select_forced(DELTA, TARGETS, tau=0.0), expected_tau0)


def test_select_top_frac_uses_ceiling_per_sequence():
    # Row 0 has 5 targets: ceil(0.3 * 5) = 2 -> deltas 0.5 and 0.1.
    # Row 1 has 3 targets: ceil(0.3 * 3) = 1 -> delta 0.3 (the 9.0s are not targets).
    expected = mask([[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]])
    assert torch.equal(select_top_frac(DELTA, TARGETS, rho=0.3), expected)


def test_select_top_frac_edges_and_float_noise():
    assert not select_top_frac(DELTA, TARGETS, rho=0.0).any()
    assert torch.equal(select_top_frac(DELTA, TARGETS, rho=1.0), TARGETS)
    targets = torch.ones(1, 30, dtype=torch.bool)
    # 0.1 * 30 = 3.0000000000000004 in floating point: must still be 3 tokens.
    assert select_top_frac(torch.randn(1, 30), targets, rho=0.1).sum() == 3


def test_select_top_frac_ties_prefer_earlier_positions():
    delta = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    targets = torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(select_top_frac(delta, targets, rho=0.5), mask([[0, 1, 1, 0]]))


def test_cap_anchor_frac_keeps_highest_delta():
    anchors = select_delta(DELTA, TARGETS)  # row 0: positions 1 (0.5) and 4 (0.1); row 1: 2 (0.3), 3 (0.2)
    # floor(0.34 * 5) = 1 and floor(0.34 * 3) = 1
    expected = mask([[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
    assert torch.equal(cap_anchor_frac(anchors, DELTA, TARGETS, max_frac=0.34), expected)
    # floor(0.3 * 5) = 1 and floor(0.3 * 3) = 0
    expected = mask([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert torch.equal(cap_anchor_frac(anchors, DELTA, TARGETS, max_frac=0.3), expected)
    assert torch.equal(cap_anchor_frac(anchors, DELTA, TARGETS, max_frac=1.0), anchors)
    assert not cap_anchor_frac(anchors, DELTA, TARGETS, max_frac=0.0).any()


def test_cap_never_promotes_non_anchors():
    anchors = mask([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])  # one low-delta anchor
    assert torch.equal(cap_anchor_frac(anchors, DELTA, TARGETS, max_frac=1.0), anchors)


def test_keep_mask_methods():
    anchors = mask([[0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    assert torch.equal(keep_mask("none", anchors, TARGETS), TARGETS)
    assert torch.equal(keep_mask("t3s", anchors, TARGETS), mask([[0, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 0]]))
    assert torch.equal(keep_mask("inverse", anchors, TARGETS), anchors)
    with pytest.raises(ValueError, match="unknown keep method 'bogus'"):
        keep_mask("bogus", anchors, TARGETS)


def test_keep_mask_ignores_anchors_outside_targets():
    anchors = torch.ones(2, 6, dtype=torch.bool)
    assert torch.equal(keep_mask("inverse", anchors, TARGETS), TARGETS)
    assert not keep_mask("t3s", anchors, TARGETS).any()


def test_random_keep_drops_anchor_count_and_is_deterministic():
    targets = torch.zeros(3, 40, dtype=torch.bool)
    targets[0, 5:] = True
    targets[1, 10:30] = True
    targets[2, 1:] = True
    anchors = torch.zeros_like(targets)
    anchors[0, 5:12] = True  # 7 anchors
    anchors[1, 10:11] = True  # 1 anchor
    # row 2: no anchor

    first = keep_mask("random", anchors, targets, generator=torch.Generator().manual_seed(7))
    again = keep_mask("random", anchors, targets, generator=torch.Generator().manual_seed(7))
    other = keep_mask("random", anchors, targets, generator=torch.Generator().manual_seed(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not (first & ~targets).any()
    dropped = (targets & ~first).sum(-1)
    assert dropped.tolist() == [7, 1, 0]
    # The dropped tokens are not simply the anchors.
    assert not torch.equal(targets & ~first, anchors)


def test_random_keep_is_uniform_over_targets():
    targets = torch.ones(1, 10, dtype=torch.bool)
    anchors = torch.zeros_like(targets)
    anchors[0, :3] = True
    generator = torch.Generator().manual_seed(0)
    drop_counts = sum((~keep_mask("random", anchors, targets, generator=generator)).int() for _ in range(2000))
    frequency = drop_counts.float() / 2000
    assert torch.allclose(frequency, torch.full_like(frequency, 0.3), atol=0.05)


def test_delta_latest():
    c_latest = torch.tensor([[-1.0, -0.5]], dtype=torch.float16)
    c0 = torch.tensor([[-2.0, -0.25]])
    result = delta_latest(c_latest, c0)
    assert result.dtype == torch.float32
    assert torch.equal(result, torch.tensor([[1.0, -0.25]]))


def test_ema_update_matches_a_loop_over_visits():
    generator = torch.Generator().manual_seed(0)
    steps, length, alpha = 6, 5, 0.3
    values = torch.randn(steps, length, generator=generator)
    visits = torch.rand(steps, length, generator=generator) < 0.5
    visits[:, 4] = False  # never visited: stays at its initial value
    initial = torch.tensor([0.0, 1.0, float("nan"), -1.0, 2.0])

    ema = initial.clone()
    for step in range(steps):
        ema = ema_update(ema, values[step], alpha, visits[step])

    expected = initial.tolist()
    for step in range(steps):
        for t in range(length):
            if visits[step, t]:
                previous = expected[t]
                value = values[step, t].item()
                expected[t] = value if previous != previous else (1 - alpha) * previous + alpha * value
    torch.testing.assert_close(ema, torch.tensor(expected), equal_nan=True)
    assert ema[4] == 2.0


def test_ema_update_alpha_validation():
    with pytest.raises(ValueError, match="alpha"):
        ema_update(torch.zeros(2), torch.zeros(2), 0.0, torch.ones(2, dtype=torch.bool))


def test_rules_accept_numpy_single_sequences():
    delta = np.array([0.0, 0.5, -0.3, 0.2], dtype=np.float32)
    targets = np.array([False, True, True, True])
    anchors = select_delta(delta, targets)
    assert isinstance(anchors, np.ndarray)
    assert anchors.tolist() == [False, True, False, True]
    assert select_top_frac(delta, targets, rho=0.3).tolist() == [False, True, False, False]
    assert cap_anchor_frac(anchors, delta, targets, max_frac=0.34).tolist() == [False, True, False, False]
    assert keep_mask("t3s", anchors, targets).tolist() == [False, False, True, False]
    c_latest = np.array([-1.0, -2.0], dtype=np.float16)
    assert delta_latest(c_latest, np.array([-1.5, -1.0], dtype=np.float32)).tolist() == [0.5, -1.0]
