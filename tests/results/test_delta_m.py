"""Δm on hand-computed cases with mixed metric directions."""

from __future__ import annotations

import math

import pytest

from polytask.results import delta_m


def test_hand_computed_mixed_directions():
    # seg mIoU 0.40 vs 0.38 (higher better): +5.263% better -> -5.263
    # depth abs err 0.55 vs 0.50 (lower better): +10% worse -> +10
    # normal mean angle 24 vs 25 (lower better): -4% better -> -4
    scores = {"miou": 0.40, "abs_err": 0.55, "mean_angle": 24.0}
    base = {"miou": 0.38, "abs_err": 0.50, "mean_angle": 25.0}
    hib = {"miou": True, "abs_err": False, "mean_angle": False}
    expected = (-(0.40 - 0.38) / 0.38 * 100 + 10.0 - 4.0) / 3
    assert math.isclose(delta_m(scores, base, hib), expected, rel_tol=1e-12)
    assert math.isclose(
        delta_m(scores, base, hib, sign="higher_is_better"), -expected, rel_tol=1e-12
    )


def test_equal_to_baseline_is_zero():
    assert delta_m({"a": 3.0, "b": 0.1}, {"a": 3.0, "b": 0.1}, {"a": True, "b": False}) == 0.0


def test_better_everywhere_is_negative():
    assert (
        delta_m({"acc": 0.9, "err": 1.0}, {"acc": 0.8, "err": 2.0}, {"acc": True, "err": False}) < 0
    )


@pytest.mark.parametrize("side", ["scores", "baselines", "higher_is_better"])
def test_missing_metric_is_named(side):
    args = {
        "scores": {"a": 1.0, "b": 2.0},
        "baselines": {"a": 1.0, "b": 2.0},
        "higher_is_better": {"a": True, "b": False},
    }
    del args[side]["b"]
    with pytest.raises(KeyError, match=r"\['b'\] missing from " + side):
        delta_m(**args)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="baseline of metric 'a' is 0"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})
    with pytest.raises(ValueError, match="score of metric 'a' is nan"):
        delta_m({"a": float("nan")}, {"a": 1.0}, {"a": True})
    with pytest.raises(ValueError, match="must be True or False"):
        delta_m({"a": 1.0}, {"a": 1.0}, {"a": 1})
    with pytest.raises(ValueError, match="sign="):
        delta_m({"a": 1.0}, {"a": 1.0}, {"a": True}, sign="up")
    with pytest.raises(ValueError, match="at least one metric"):
        delta_m({}, {}, {})
