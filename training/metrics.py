"""Classification metrics a clinician and an ML engineer both read: per class, with uncertainty.

Everything takes explicit arrays (true class indices, decided class indices, probabilities) and the
class-name list; nothing assumes three classes, because a hospital's evaluation set may have two.
A number that is undefined on the given rows (the sensitivity of a class with no positives, the
AUC of a class absent from ``y_true``) is ``None``, never a crash and never a silent 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

RATES = ("precision", "sensitivity", "specificity", "f1")
DEFAULT_N_BOOTSTRAP = 1000
_BOOTSTRAP_CHUNK_CELLS = 2_000_000  # resamples x rows per chunk: bounds memory for big test sets


def _labels(values, n_classes: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes}), got {array.min()}..{array.max()}")
    return array


def _pair(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t = _labels(y_true, n_classes, "y_true")
    p = _labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    return t, p


def _defined(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator > 0 else None


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = decided class (scikit-learn's, over every class index)."""
    t, p = _pair(y_true, y_pred, n_classes)
    if t.size == 0:  # scikit-learn refuses empty input; zero rows are zero counts
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return sklearn_confusion_matrix(t, p, labels=np.arange(n_classes))


def normalized_confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Each row divided by its count (row = share of that true class sent to each decision).

    Row-normalised because the diagonal then reads as per-class sensitivity whatever the class
    balance. A class absent from ``y_true`` gives a row of NaN (no evidence), not zeros.
    """
    counts = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), np.nan)


def per_class_metrics(y_true, y_pred, classes: Sequence[str]) -> dict[str, dict]:
    """Precision, sensitivity (recall), specificity and F1 of each class, one-vs-rest.

    Also returns the counts (tp, fp, fn, tn, support) so a reader can recompute any rate.
    """
    n_classes = len(classes)
    t, p = _pair(y_true, y_pred, n_classes)
    counts = confusion_matrix(t, p, n_classes)
    total = int(counts.sum())
    # scikit-learn's rates; an undefined one (no positives, nothing called) is NaN there, None here
    precision, sensitivity, f1, _ = precision_recall_fscore_support(
        t, p, labels=np.arange(n_classes), average=None, zero_division=np.nan) if total else ([np.nan] * n_classes,) * 4
    result: dict[str, dict] = {}
    for k, name in enumerate(classes):
        tp = int(counts[k, k])
        fn = int(counts[k].sum() - tp)
        fp = int(counts[:, k].sum() - tp)
        tn = total - tp - fn - fp
        result[name] = {
            "precision": _defined(precision[k]),
            "sensitivity": _defined(sensitivity[k]),
            "specificity": _ratio(tn, tn + fp),
            "f1": _defined(f1[k]),
            "support": tp + fn,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
        }
    return result


def one_vs_rest_auc(y_true, probs, classes: Sequence[str]) -> dict[str, float | None]:
    """ROC AUC of each class's probability against all other classes.

    ``None`` where AUC is undefined: the class is absent from ``y_true`` or is the only class
    present (e.g. a tuberculosis-only source dataset).
    """
    scores = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        raise ValueError(f"probs must have shape (n, {n_classes}), got {scores.shape}")
    t = _labels(y_true, n_classes, "y_true")
    if t.shape[0] != scores.shape[0]:
        raise ValueError("y_true and probs differ in length")
    result: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        positives = t == k
        if positives.all() or not positives.any():
            result[name] = None
        else:
            result[name] = float(roc_auc_score(positives.astype(np.int64), scores[:, k]))
    return result


def _mean(values: list[float | None], weights: list[float] | None = None) -> float | None:
    weights = [1.0] * len(values) if weights is None else weights
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    return float(sum(v * w for v, w in pairs) / total)


def average_metrics(per_class: dict[str, dict], classes: Sequence[str]) -> dict[str, dict]:
    """Macro (each class counts once) and support-weighted averages of the per-class rates.

    Classes whose rate is undefined (``None``) are left out of that rate's average, so a missing
    class does not drag the mean toward 0. ``auc`` is averaged too when ``per_class`` carries it.
    """
    keys = [key for key in (*RATES, "auc") if any(key in per_class[name] for name in classes)]
    supports = [float(per_class[name].get("support", 0)) for name in classes]
    macro = {key: _mean([per_class[name].get(key) for name in classes]) for key in keys}
    weighted = {key: _mean([per_class[name].get(key) for name in classes], supports) for key in keys}
    return {"macro": macro, "weighted": weighted}


def bootstrap_rates(
    y_true, y_pred, n_classes: int, n_bootstrap: int = DEFAULT_N_BOOTSTRAP, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-resample sensitivity and specificity of each class, arrays of shape (n_bootstrap, C).

    Rows are resampled with replacement by a seeded ``numpy.random.Generator``, so the same
    arguments give the same resamples (and two decision vectors over the same rows, e.g. argmax
    and policy, are evaluated on the same, paired, resamples). A rate undefined in a resample
    (no positives or no negatives drawn) is NaN.
    """
    t, p = _pair(y_true, y_pred, n_classes)
    n = t.shape[0]
    sensitivity = np.full((n_bootstrap, n_classes), np.nan)
    specificity = np.full((n_bootstrap, n_classes), np.nan)
    if n == 0 or n_bootstrap <= 0:
        return sensitivity, specificity
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    for start in range(0, n_bootstrap, chunk):
        stop = min(start + chunk, n_bootstrap)
        index = rng.integers(0, n, size=(stop - start, n))
        ts, ps = t[index], p[index]
        for k in range(n_classes):
            positive, called = ts == k, ps == k
            n_pos = positive.sum(axis=1)
            n_neg = n - n_pos
            tp = (positive & called).sum(axis=1)
            tn = (~positive & ~called).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                sensitivity[start:stop, k] = np.where(n_pos > 0, tp / np.maximum(n_pos, 1), np.nan)
                specificity[start:stop, k] = np.where(n_neg > 0, tn / np.maximum(n_neg, 1), np.nan)
    return sensitivity, specificity


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the finite samples; ``None`` when there are none."""
    values = np.asarray(samples, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def bootstrap_intervals(
    y_true,
    y_pred,
    classes: Sequence[str],
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, list[float] | None]]:
    """Percentile 95% intervals of each class's sensitivity and specificity.

    Why: a test split has ~125 tuberculosis images, so a sensitivity of 0.92 is really "somewhere
    between ~0.87 and ~0.96"; the interval tells a reader whether a floor of 0.90 is met with room.
    """
    sens, spec = bootstrap_rates(y_true, y_pred, len(classes), n_bootstrap, seed)
    return {
        name: {
            "sensitivity_ci": percentile_interval(sens[:, k], confidence),
            "specificity_ci": percentile_interval(spec[:, k], confidence),
        }
        for k, name in enumerate(classes)
    }


def classification_report(
    y_true,
    y_pred,
    probs,
    classes: Sequence[str],
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """Everything for one decision vector: per class (with AUC and CIs), averages, confusion.

    ``probs`` supplies the AUC (a property of the scores, identical for any decision rule made
    from them); ``y_pred`` supplies every rate that depends on the decision.
    """
    n_classes = len(classes)
    per_class = per_class_metrics(y_true, y_pred, classes)
    auc = one_vs_rest_auc(y_true, probs, classes)
    intervals = bootstrap_intervals(y_true, y_pred, classes, n_bootstrap, seed)
    for name in classes:
        per_class[name]["auc"] = auc[name]
        per_class[name].update(intervals[name])
    averages = average_metrics(per_class, classes)
    counts = confusion_matrix(y_true, y_pred, n_classes)
    return {
        "per_class": per_class,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "macro_auc": averages["macro"].get("auc"),
        "accuracy": _ratio(int(np.trace(counts)), int(counts.sum())),
        "confusion_matrix": counts.tolist(),
        "confusion_matrix_normalized": normalized_confusion_matrix(y_true, y_pred, n_classes).tolist(),
    }
