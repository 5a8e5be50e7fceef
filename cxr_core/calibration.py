"""Calibration: logits -> probabilities a clinician can read as frequencies.

The decision policy compares probabilities with fitted thresholds, and the worklists flag
"confident" errors, so a probability of 0.9 must mean "right about 9 times in 10". Networks trained
with cross-entropy are usually over-confident; one scalar temperature fitted on validation
(Guo et al., 2017) fixes most of it without changing any argmax decision. The same functions are
used by training (fit), evaluation (ECE, reliability diagrams), serving (softmax with the bundle's
temperature) and the drift job (ECE on labelled feedback), which is why they live in the shared core.

numpy + torch only: serving images must not need scikit-learn or matplotlib for this.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

DEFAULT_N_BINS = 15
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2


def _as_float_array(values: Any, ndim: int, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _as_labels(labels: Any, n_rows: int, n_classes: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n_rows:
        raise ValueError(f"labels must be a vector of length {n_rows}, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError("labels must be integer class indices")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {array.min()}..{array.max()}")
    return array.astype(np.int64)


def _log_softmax(scaled: np.ndarray) -> np.ndarray:
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits divided by ``temperature`` (rows sum to 1).

    The row maximum is subtracted before ``exp`` so very large logits (an over-confident model,
    or a small temperature) cannot overflow. Accepts a numpy array or a torch tensor, one row
    (shape ``(C,)``) or many (``(N, C)``); returns float64 of the same shape.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    raw = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
    array = np.asarray(raw, dtype=np.float64)
    single = array.ndim == 1
    array = _as_float_array(array[None, :] if single else array, 2, "logits")
    probs = np.exp(_log_softmax(array / temperature))
    return probs[0] if single else probs


def calibrate(logits: Any, temperature: float) -> np.ndarray:
    """The calibration step of the inference chain: temperature-scaled softmax."""
    return softmax(logits, temperature)


def negative_log_likelihood(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean cross-entropy of the temperature-scaled softmax: what temperature scaling minimises."""
    array = _as_float_array(logits, 2, "logits")
    targets = _as_labels(labels, array.shape[0], array.shape[1])
    log_probs = _log_softmax(array / temperature)
    return float(-log_probs[np.arange(array.shape[0]), targets].mean())


def fit_temperature(
    logits: Any,
    labels: Any,
    *,
    min_temperature: float = MIN_TEMPERATURE,
    max_temperature: float = MAX_TEMPERATURE,
    grid_points: int = 81,
    tolerance: float = 1e-7,
) -> float:
    """The temperature T > 0 that minimises validation NLL of ``softmax(logits / T)``.

    Why a 1-D search and not gradient descent: the NLL is convex in 1/T, hence unimodal in log T,
    so a coarse grid over log T followed by golden-section refinement always finds the minimum,
    needs no learning rate, and gives the same float on every machine (no random init, no
    data-order effects). The search runs in float64 over ``[min_temperature, max_temperature]``;
    a result at a bound means the data asked for more (e.g. perfectly separated validation set).
    """
    array = _as_float_array(logits, 2, "logits")
    targets = _as_labels(labels, array.shape[0], array.shape[1])
    if array.shape[0] == 0:
        raise ValueError("cannot fit a temperature on zero rows")
    if not 0 < min_temperature < max_temperature:
        raise ValueError("need 0 < min_temperature < max_temperature")
    rows = np.arange(array.shape[0])

    def nll(log_t: float) -> float:
        return float(-_log_softmax(array / math.exp(log_t))[rows, targets].mean())

    low, high = math.log(min_temperature), math.log(max_temperature)
    grid = np.linspace(low, high, max(grid_points, 3))
    values = np.array([nll(float(u)) for u in grid])
    best = int(np.argmin(values))  # first minimum: deterministic on ties
    a = float(grid[max(best - 1, 0)])
    b = float(grid[min(best + 1, len(grid) - 1)])

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    candidate = (a + b) / 2.0
    # keep the grid point if the bracket's middle is somehow worse (flat or noisy objective)
    log_t = candidate if nll(candidate) <= values[best] else float(grid[best])
    return float(math.exp(log_t))


def _confidence_and_correct(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    array = _as_float_array(probs, 2, "probs")
    targets = _as_labels(labels, array.shape[0], array.shape[1])
    if array.shape[0] == 0:
        raise ValueError("calibration needs at least one row")
    confidence = array.max(axis=1)
    correct = (array.argmax(axis=1) == targets).astype(np.float64)
    return confidence, correct


def _bin_members(confidence: np.ndarray, n_bins: int, adaptive: bool) -> list[np.ndarray]:
    """Row indices of each bin. Equal-width: (k/B, (k+1)/B]; adaptive: equal counts by confidence."""
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    if adaptive:
        order = np.argsort(confidence, kind="stable")
        return [part for part in np.array_split(order, n_bins)]
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return [np.flatnonzero(index == k) for k in range(n_bins)]


def reliability_curve(probs: Any, labels: Any, n_bins: int = DEFAULT_N_BINS, adaptive: bool = False) -> dict:
    """Per-bin mean confidence, accuracy and count of the top-label prediction, for plotting.

    A reliability diagram plots ``accuracy`` against ``confidence``; a calibrated model lies on
    the diagonal. Empty bins are left out (they carry no evidence). ``lower``/``upper`` are the
    bin edges for equal-width bins and the smallest/largest confidence inside the bin for adaptive
    (equal-mass) bins, which put the same number of rows in every bin so that the crowded
    high-confidence end is resolved finely and no bin is estimated from a handful of rows.
    """
    confidence, correct = _confidence_and_correct(probs, labels)
    lower, upper, mean_conf, accuracy, counts = [], [], [], [], []
    for k, members in enumerate(_bin_members(confidence, n_bins, adaptive)):
        if members.size == 0:
            continue
        if adaptive:
            lower.append(float(confidence[members].min()))
            upper.append(float(confidence[members].max()))
        else:
            lower.append(k / n_bins)
            upper.append((k + 1) / n_bins)
        mean_conf.append(float(confidence[members].mean()))
        accuracy.append(float(correct[members].mean()))
        counts.append(int(members.size))
    return {
        "n_bins": int(n_bins),
        "adaptive": bool(adaptive),
        "lower": lower,
        "upper": upper,
        "confidence": mean_conf,
        "accuracy": accuracy,
        "count": counts,
        "n": int(confidence.size),
    }


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = DEFAULT_N_BINS, adaptive: bool = False) -> float:
    """Top-label ECE: the count-weighted mean |accuracy - confidence| over confidence bins.

    Top-label (the probability of the predicted class) because that is the number a reader
    sees. Equal-width bins are the classic definition and comparable with the literature;
    adaptive (equal-mass) bins are less biased when most predictions sit near 1.0, as they do for
    a strong model, so both are reported.
    """
    curve = reliability_curve(probs, labels, n_bins=n_bins, adaptive=adaptive)
    total = float(curve["n"])
    gaps = np.abs(np.asarray(curve["accuracy"]) - np.asarray(curve["confidence"]))
    return float(np.sum(gaps * np.asarray(curve["count"], dtype=np.float64)) / total)
