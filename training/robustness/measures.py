"""The few numbers every robustness report quotes, from one set of predictions.

Sensitivity / specificity at the policy decisions (with Wilson 95% intervals: a held-out source
may hold 39 tuberculosis images), one-vs-rest AUC, and the same-population AUC: each disease
against reference images of the *same age group* (adult tuberculosis vs adult normal), which an
"adult means TB" model cannot pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def wilson_interval(successes: int, total: int, z: float = 1.96) -> list[float] | None:
    if total <= 0:
        return None
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def rate(hits: np.ndarray) -> dict:
    """Share of True in ``hits`` with its Wilson interval (None when empty)."""
    n = int(hits.size)
    k = int(np.sum(hits))
    return {"value": round(k / n, 4) if n else None, "n": n, "ci95": wilson_interval(k, n)}


def safe_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return round(float(roc_auc_score(positive.astype(np.int64), scores)), 4)


def operating_point_metrics(
    classes: Sequence[str], y_true: np.ndarray, probs: np.ndarray, decisions: np.ndarray,
    age_groups: Sequence[str], reference_class: str = "normal",
) -> dict:
    """Per disease class at the policy: sensitivity, specificity, AUC, same-population AUC.

    ``specificity`` of a disease class is the share of *all* its negatives not decided as it;
    ``reference_specificity`` only over the reference class (e.g. healthy adults not called TB).
    """
    classes = list(classes)
    y_true = np.asarray(y_true)
    decisions = np.asarray(decisions)
    ages = np.asarray(list(age_groups), dtype=object)
    ref = classes.index(reference_class) if reference_class in classes else None
    argmax = probs.argmax(axis=1)
    result: dict = {
        "n": int(len(y_true)),
        "counts": {name: int((y_true == k).sum()) for k, name in enumerate(classes)},
        "accuracy_policy": rate(decisions == y_true)["value"],
        "accuracy_argmax": rate(argmax == y_true)["value"],
        "classes": {},
    }
    aucs = []
    for k, name in enumerate(classes):
        if name == reference_class:
            continue
        positive = y_true == k
        entry = {
            "sensitivity": rate(decisions[positive] == k),
            "specificity": rate(decisions[~positive] != k),
            "reference_specificity": rate(decisions[y_true == ref] != k) if ref is not None else None,
            "auc": safe_auc(positive, probs[:, k]),
        }
        if entry["auc"] is not None:
            aucs.append(entry["auc"])
        if ref is not None:
            same = {}
            for age in sorted({a for a in ages[positive].tolist()}):
                rows = (ages == age) & ((y_true == k) | (y_true == ref))
                if (rows & (y_true == ref)).any():
                    same[age] = {"auc": safe_auc(positive[rows], probs[rows, k]),
                                 "n_disease": int((rows & positive).sum()),
                                 "n_reference": int((rows & (y_true == ref)).sum()),
                                 "reference_specificity": rate(decisions[rows & (y_true == ref)] != k)}
            entry["same_population"] = same
        result["classes"][name] = entry
    ref_auc = safe_auc(y_true == ref, probs[:, ref]) if ref is not None else None
    result["auc_reference"] = ref_auc
    present = [a for a in aucs + ([ref_auc] if ref_auc is not None else [])]
    result["macro_auc"] = round(float(np.mean(present)), 4) if len(present) >= 2 else None
    return result


def value(entry: dict | None) -> float | None:
    """``rate`` dict -> its value (None-safe), for tables."""
    return None if entry is None else entry.get("value")


def same_population_auc(metrics: dict, disease: str) -> float | None:
    """The disease's AUC against same-age reference images (adult for TB), None when undefined."""
    same = metrics["classes"].get(disease, {}).get("same_population") or {}
    values = [v["auc"] for v in same.values() if v.get("auc") is not None]
    return min(values) if values else None
