"""Calibration in the shared core: softmax, temperature scaling, ECE, reliability curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_core.calibration import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_curve,
    softmax,
)

N = 20000


def _sample_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cumulative = np.cumsum(probs, axis=1)
    draws = rng.random(probs.shape[0])[:, None]
    return np.minimum((draws > cumulative).sum(axis=1), probs.shape[1] - 1)


@pytest.fixture(scope="module")
def calibrated():
    """Labels drawn from the model's own probabilities: calibrated by construction."""
    rng = np.random.default_rng(20240611)
    logits = rng.normal(0.0, 2.0, size=(N, 3))
    labels = _sample_labels(softmax(logits), rng)
    return logits, labels


def test_softmax_is_stable_and_matches_torch():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    probs = softmax(logits)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0], atol=1e-12)
    expected = torch.softmax(torch.tensor(logits[1:]) / 2.0, dim=1).numpy()
    np.testing.assert_allclose(softmax(logits[1:], temperature=2.0), expected, rtol=1e-12)
    np.testing.assert_allclose(softmax(torch.tensor(logits[1])), softmax(logits[1:])[0])
    with pytest.raises(ValueError):
        softmax(logits, temperature=0.0)


def test_calibrated_set_has_ece_near_zero(calibrated):
    logits, labels = calibrated
    probs = softmax(logits)
    assert expected_calibration_error(probs, labels, n_bins=15, adaptive=False) < 0.02
    assert expected_calibration_error(probs, labels, n_bins=15, adaptive=True) < 0.02


def test_temperature_scaling_recovers_overconfidence(calibrated):
    logits, labels = calibrated
    overconfident = 3.0 * logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.10)
    assert fit_temperature(overconfident, labels) == temperature  # deterministic
    for adaptive in (False, True):
        before = expected_calibration_error(softmax(overconfident), labels, adaptive=adaptive)
        after = expected_calibration_error(softmax(overconfident, temperature), labels, adaptive=adaptive)
        assert after < before / 2 and after < 0.02
    assert negative_log_likelihood(overconfident, labels, temperature) < negative_log_likelihood(overconfident, labels)


def test_ece_equals_hand_computed_value():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1])  # confidences 0.9, 0.6, 0.7; correct 1, 0, 1
    # two bins: all three rows in (0.5, 1]: |2/3 - 0.7333| = 0.0667
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(abs(2 / 3 - 2.2 / 3))
    # ten bins: one row per bin: (0.1 + 0.6 + 0.3) / 3
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(1.0 / 3.0)
    # adaptive with one bin per row gives the same per-row gaps
    assert expected_calibration_error(probs, labels, n_bins=3, adaptive=True) == pytest.approx(1.0 / 3.0)


def test_reliability_curve_bins(calibrated):
    logits, labels = calibrated
    probs = softmax(logits)
    width = reliability_curve(probs, labels, n_bins=10, adaptive=False)
    mass = reliability_curve(probs, labels, n_bins=10, adaptive=True)
    assert sum(width["count"]) == sum(mass["count"]) == N
    assert set(mass["count"]) == {N // 10}
    assert all(lo <= c <= hi for lo, c, hi in zip(width["lower"], width["confidence"], width["upper"]))
    assert np.all(np.diff(mass["confidence"]) > 0)
    assert len(width["accuracy"]) == len(width["confidence"]) == len(width["count"])


def test_operating_point_fits_thresholds_on_the_calibrated_probabilities():
    from cxr_core.operating_point import fit_operating_point
    from cxr_core.policy import PolicyConfig

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), labels] += 2.0
    logits *= 3.0  # over-confident: the fitted temperature is well above 1
    classes = ["normal", "pneumonia", "tuberculosis"]
    point = fit_operating_point(logits, labels, classes, PolicyConfig())
    assert point.temperature == pytest.approx(fit_temperature(logits, labels)) and point.temperature > 1.3
    calibrated = softmax(logits, point.temperature)
    for name, threshold in point.policy.thresholds.items():  # each threshold is a calibrated probability of a case
        assert np.isclose(calibrated[labels == classes.index(name), classes.index(name)], threshold).any()
    kept = fit_operating_point(logits, labels, classes, PolicyConfig(), temperature=1.0)
    assert kept.temperature == 1.0 and kept.policy.thresholds != point.policy.thresholds
