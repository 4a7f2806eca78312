"""Score statistics (t3s_ray/stats.py) against hand computations and exhaustive enumeration."""

import itertools
import math

import pytest

from t3s_ray.stats import mean_ci, mean_sd, paired_difference


def test_mean_ci_matches_the_hand_computation():
    values = [1, 0, 1, 1, 0]  # mean 0.6, sample sd sqrt(0.3), stderr sqrt(0.3 / 5)
    out = mean_ci(values)
    stderr = math.sqrt(0.3 / 5)
    assert out["mean"] == pytest.approx(0.6) and out["stderr"] == pytest.approx(stderr) and out["n"] == 5
    assert out["ci95"] == pytest.approx([0.6 - 1.96 * stderr, 0.6 + 1.96 * stderr], abs=1e-4)
    assert mean_ci([0.5])["stderr"] == 0.0 and mean_ci([])["n"] == 0


def test_paired_difference_counts_only_shared_problems():
    a = {"p1": 1.0, "p2": 1.0, "p3": 0.0, "only_a": 1.0}
    b = {"p1": 0.0, "p2": 1.0, "p3": 0.0, "only_b": 0.0}
    d = paired_difference(a, b)
    assert d["n"] == 3 and d["diff"] == pytest.approx(1 / 3) and (d["wins"], d["losses"]) == (1, 0)


def test_sign_flip_p_value_matches_exhaustive_enumeration():
    # 10 problems: the exact two-sided p-value enumerates all 2^10 sign flips of the differences.
    a = {f"p{i}": v for i, v in enumerate([1, 1, 1, 1, 1, 1, 0, 1, 0, 1])}
    b = {f"p{i}": v for i, v in enumerate([0, 0, 1, 0, 0, 1, 1, 1, 0, 0])}
    diffs = [a[k] - b[k] for k in sorted(a)]
    observed = abs(sum(diffs) / len(diffs))
    flips = list(itertools.product([-1, 1], repeat=len(diffs)))
    exact = sum(abs(sum(s * x for s, x in zip(signs, diffs)) / len(diffs)) >= observed - 1e-12
                for signs in flips) / len(flips)
    d = paired_difference(a, b, resamples=20000, seed=1)
    assert d["diff"] == pytest.approx(0.4)
    assert d["p"] == pytest.approx(exact, abs=0.01)  # Monte Carlo error at 20000 resamples is ~0.003


def test_paired_bootstrap_interval_is_the_percentile_interval_of_resampled_means():
    import numpy as np

    a = {f"p{i}": float(i % 3 == 0) for i in range(60)}
    b = {f"p{i}": float(i % 4 == 0) for i in range(60)}
    d = paired_difference(a, b, resamples=4000, seed=3)
    diffs = np.array([a[k] - b[k] for k in sorted(a)])
    # An independent bootstrap (a plain loop, another generator) agrees within Monte Carlo error.
    rng = np.random.default_rng(99)
    means = [diffs[rng.integers(0, len(diffs), len(diffs))].mean() for _ in range(4000)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert d["ci95"][0] == pytest.approx(lo, abs=0.02) and d["ci95"][1] == pytest.approx(hi, abs=0.02)
    assert d["ci95"][0] < d["diff"] < d["ci95"][1]


def test_identical_models_do_not_differ_and_a_large_gap_is_resolved():
    same = {f"p{i}": float(i % 2) for i in range(200)}
    d = paired_difference(same, same)
    assert d["diff"] == 0 and d["p"] == 1.0 and d["ci95"] == [0.0, 0.0]
    better = {k: 1.0 for k in same}
    d = paired_difference(better, same)
    assert d["diff"] == pytest.approx(0.5) and d["p"] < 0.001 and d["ci95"][0] > 0.4


def test_mean_sd_over_seeds():
    mean, sd = mean_sd([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and sd == pytest.approx(0.1)
    assert mean_sd([0.5]) == (0.5, 0.0)
