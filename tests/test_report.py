"""Report helpers that need no run: token classes and the anchor statistics, against hand counts."""

import pytest

from t3s_ray.report import anchor_classes, token_classes


def test_generic_token_classes():
    assert token_classes(["Ġ12", "Ġthe", ".", "<|im_end|>", "Ġ", "▁x"], "builtin:arith") == [
        "digit", "word", "punctuation/space", "special", "punctuation/space", "word"]


def test_lab_runs_use_the_lab_classes():
    assert token_classes(["2", "##5", "-", "7", "=", "1", "##8"], "builtin:lab") == [
        "operand", "operand", "operator", "operand", "operator", "borrow-fix", "result"]


def test_anchor_classes_counts_by_hand():
    traj = {"tokens": ["a", "b", "a", "1", "1"], "classes": ["word", "word", "word", "digit", "digit"],
            "is_anchor": [True, False, True, True, False], "delta": [2.0, -1.0, 4.0, 0.5, 0.0]}
    out = anchor_classes(traj, top=2)
    assert out["anchor_frac"] == pytest.approx(3 / 5) and out["tokens"] == 5
    word, digit = out["classes"]["word"], out["classes"]["digit"]
    assert (word["tokens"], word["anchors"], digit["tokens"], digit["anchors"]) == (3, 2, 2, 1)
    assert word["anchor_frac"] == pytest.approx(2 / 3) and word["share_of_anchors"] == pytest.approx(2 / 3)
    assert word["delta_quartiles"] == [0.5, 2.0, 3.0]  # numpy's linear percentiles of -1, 2, 4
    assert out["frequent_tokens"] == [{"token": "a", "count": 2, "anchor_frac": 1.0},
                                      {"token": "1", "count": 2, "anchor_frac": 0.5}]
