"""wbc_batch.evaluation.reliability: ECE, reliability bins and risk-coverage, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wbc_batch.evaluation.reliability import (
    coverage_point,
    expected_calibration_error,
    reliability_bins,
    review_order,
    risk_coverage,
    share_for_accuracy,
)


def test_ece_by_hand():
    conf = [0.95, 0.95, 0.55, 0.55]
    ok = [True, False, True, True]
    # bin (0.9, 1]: conf 0.95, acc 0.5 -> 0.45 * 2/4; bin (0.5, 0.6]: conf 0.55, acc 1 -> 0.45 * 2/4
    assert expected_calibration_error(conf, ok, n_bins=10) == pytest.approx(0.45)


def test_ece_is_zero_when_confidence_equals_accuracy():
    conf = [0.75] * 4
    assert expected_calibration_error(conf, [True, True, True, False]) == pytest.approx(0.0)
    assert expected_calibration_error([], []) == 0.0


def test_bins_cover_confidence_one_and_count_every_image():
    bins = reliability_bins([1.0, 0.0, 0.5], [True, False, True], n_bins=4)
    assert [b.count for b in bins] == [1, 1, 0, 1]  # bins are (lo, hi]: 0.5 in (0.25, 0.5], 0.0 joins the first
    assert math.isnan(bins[2].accuracy) and bins[1].accuracy == 1.0


def test_review_order_is_riskiest_first_and_stable():
    assert review_order([0.1, 0.9, 0.5, 0.9]).tolist() == [1, 3, 2, 0]


def test_coverage_point_and_curve():
    risk = [0.9, 0.8, 0.1, 0.2, 0.3]
    ok = [False, True, True, False, True]
    p = coverage_point(risk, ok, 0.4)  # reviews images 0 and 1: one of two errors
    assert (p.caught, p.accepted_accuracy) == (0.5, pytest.approx(2 / 3))
    curve = risk_coverage(risk, ok, [0.0, 1.0])
    assert curve[0].caught == 0.0 and curve[0].accepted_accuracy == pytest.approx(0.6)
    assert curve[1].caught == 1.0 and math.isnan(curve[1].accepted_accuracy)


def test_share_for_accuracy():
    risk = np.array([0.9, 0.8, 0.7, 0.1])
    ok = [False, False, True, True]
    assert share_for_accuracy(risk, ok, 1.0) == 0.5
    assert share_for_accuracy(risk, ok, 0.5) == 0.0
