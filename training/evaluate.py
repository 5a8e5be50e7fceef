"""Evaluation of one model on one labelled set: the metrics, and the entry point that writes everything.

Jobs are split by module: the numbers here (with :mod:`training.metrics`), the worklists in
:mod:`training.worklists`, the figures in :mod:`training.evaluation_figures` and the Markdown in
:mod:`training.evaluation_report`; :func:`evaluate_predictions` runs them in order.

What it answers, for a clinician and an ML engineer alike:
- how good is each class, with bootstrap intervals (a test split holds ~125 tuberculosis images);
- what the risk-prioritized policy buys over argmax (sensitivity gained, specificity given up,
  missed cases avoided) and how often its sensitivity floors hold on resampled test sets;
- whether probabilities mean what they say (ECE and reliability before / after temperature scaling);
- whether the model learned the disease or the hospital: the same metrics per source dataset, and
  a same-population view (each disease against the reference class, restricted to sources that
  hold both, e.g. adult tuberculosis vs adult normal) that removes the age/hospital shortcut;
- which images a person should look at: missed cases, gray zone, confident-wrong (CSV + contact sheets).

The policy decisions are computed by the shared-core policy and passed in, so this module never
re-implements the decision rule; it only measures it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_core.calibration import DEFAULT_N_BINS, expected_calibration_error, negative_log_likelihood, softmax
from cxr_core.reporting import json_ready
from training import evaluation_figures
from training.evaluation_report import write_evaluation_markdown
from training.metrics import bootstrap_rates, classification_report, one_vs_rest_auc, per_class_metrics
from training.worklists import WORKLISTS, build_worklists, contact_sheet, worklist_columns, write_worklist_csv

__all__ = ["evaluate_predictions", "write_evaluation_markdown", "METRICS_FILE", "REPORT_FILE"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"


# ----------------------------------------------------------------------------------------------
# helpers


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else float(a - b)


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def _check_labels(values, n_rows: int, n_classes: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (n_rows,):
        raise ValueError(f"{name} must have shape ({n_rows},), got {array.shape}")
    array = array.astype(np.int64)
    if n_rows and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(f"{name} holds class indices outside [0, {n_classes})")
    return array


def _resolve_reference(classes: list[str], floors: dict[str, float], reference_class: str | None) -> str | None:
    if reference_class is not None:
        if reference_class not in classes:
            raise ValueError(f"reference_class {reference_class!r} is not one of the model's classes {classes}")
        return reference_class
    rest = [name for name in classes if name not in floors]
    return rest[0] if len(rest) == 1 else None


def _check_policy_classes(classes: list[str], thresholds: dict, floors: dict) -> None:
    """A class in the policy but not in the model is an error, never silently dropped."""
    unknown = sorted((set(thresholds) | set(floors)) - set(classes))
    if unknown:
        raise ValueError(
            f"policy names classes the model does not have: {unknown}; model classes are {classes}"
        )
    no_threshold = [name for name in floors if name not in thresholds]
    if no_threshold:
        log.warning("floors without a fitted threshold (no gray zone for them): %s", no_threshold)


# ----------------------------------------------------------------------------------------------
# metric blocks


def _policy_vs_argmax(per_class: dict, disease_classes: list[str]) -> dict:
    result = {}
    for name in disease_classes:
        a, p = per_class["argmax"][name], per_class["policy"][name]
        result[name] = {
            "sensitivity_argmax": a["sensitivity"],
            "sensitivity_policy": p["sensitivity"],
            "sensitivity_gained": _diff(p["sensitivity"], a["sensitivity"]),
            "specificity_argmax": a["specificity"],
            "specificity_policy": p["specificity"],
            "specificity_given_up": _diff(a["specificity"], p["specificity"]),
            "false_negatives_argmax": a["fn"],
            "false_negatives_policy": p["fn"],
            "missed_cases_avoided": a["fn"] - p["fn"],
            "false_positives_added": p["fp"] - a["fp"],
        }
    return result


def _floor_holds(
    y_true: np.ndarray, policy: np.ndarray, classes: list[str], floors: dict[str, float], n_bootstrap: int, seed: int
) -> dict:
    sensitivity, _ = bootstrap_rates(y_true, policy, len(classes), n_bootstrap, seed)
    result = {}
    for name in classes:
        if name not in floors:
            continue
        column = sensitivity[:, classes.index(name)]
        defined = column[np.isfinite(column)]
        positives = y_true == classes.index(name)
        result[name] = {
            "floor": float(floors[name]),
            "policy_sensitivity": _share(policy[positives] == classes.index(name)),
            "share": float((defined >= floors[name]).mean()) if defined.size else None,
            "n_resamples": int(defined.size),
        }
    return result


def _calibration_block(logits: np.ndarray, y_true: np.ndarray, temperature: float, n_bins: int) -> dict:
    before, after = softmax(logits, 1.0), softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "n_bins": int(n_bins),
        "ece_before": expected_calibration_error(before, y_true, n_bins, adaptive=False),
        "ece_after": expected_calibration_error(after, y_true, n_bins, adaptive=False),
        "adaptive_ece_before": expected_calibration_error(before, y_true, n_bins, adaptive=True),
        "adaptive_ece_after": expected_calibration_error(after, y_true, n_bins, adaptive=True),
        "nll_before": negative_log_likelihood(logits, y_true, 1.0),
        "nll_after": negative_log_likelihood(logits, y_true, temperature),
    }


def _per_source(
    classes: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    argmax: np.ndarray,
    policy: np.ndarray,
    sources: np.ndarray,
) -> dict:
    result = {}
    for source in sorted(set(sources.tolist())):
        rows = sources == source
        entry = {
            "n": int(rows.sum()),
            "counts": {name: int((y_true[rows] == k).sum()) for k, name in enumerate(classes)},
            "accuracy_argmax": _share(argmax[rows] == y_true[rows]),
            "accuracy_policy": _share(policy[rows] == y_true[rows]),
        }
        for rule, decided in (("argmax", argmax), ("policy", policy)):
            metrics = per_class_metrics(y_true[rows], decided[rows], classes)
            entry[rule] = {
                name: {"sensitivity": metrics[name]["sensitivity"], "specificity": metrics[name]["specificity"]}
                for name in classes
            }
        entry["auc"] = one_vs_rest_auc(y_true[rows], probs[rows], classes)
        result[source] = entry
    return result


def _same_population(
    classes: list[str],
    reference: str | None,
    y_true: np.ndarray,
    probs: np.ndarray,
    argmax: np.ndarray,
    policy: np.ndarray,
    sources: np.ndarray,
) -> dict:
    """Each disease vs the reference class, only within sources that hold both.

    In cxr3 pneumonia is pediatric and tuberculosis adult while normal is mixed, so "tuberculosis
    vs all normal" can be solved by telling adults from children. Restricting to sources that
    hold both labels (adult tuberculosis vs adult normal from kaggle-cxr and tbdb) compares like
    with like; a model that only learned the shortcut drops here.
    """
    if reference is None:
        return {}
    ref = classes.index(reference)
    result = {}
    for d, disease in enumerate(classes):
        if disease == reference:
            continue
        holding = sorted(
            source
            for source in set(sources.tolist())
            if np.any((sources == source) & (y_true == d)) and np.any((sources == source) & (y_true == ref))
        )
        rows = np.isin(sources, holding) & np.isin(y_true, [d, ref])
        positive = rows & (y_true == d)
        negative = rows & (y_true == ref)
        auc = None
        if positive.any() and negative.any():
            auc = float(roc_auc_score((y_true[rows] == d).astype(np.int64), probs[rows, d]))
        result[disease] = {
            "reference": reference,
            "sources": holding,
            "n": int(rows.sum()),
            "n_disease": int(positive.sum()),
            "n_reference": int(negative.sum()),
            "auc": auc,
            "policy_sensitivity": _share(policy[positive] == d),
            "policy_specificity": _share(policy[negative] != d),
            "argmax_sensitivity": _share(argmax[positive] == d),
            "argmax_specificity": _share(argmax[negative] != d),
            "policy_reference_kept": _share(policy[negative] == ref),
        }
    return result


# ----------------------------------------------------------------------------------------------
# entry points


def evaluate_predictions(
    classes: list[str],
    y_true: np.ndarray,
    logits: np.ndarray,
    temperature: float,
    policy_decisions: np.ndarray,
    thresholds: dict[str, float],
    floors: dict[str, float],
    sources: list[str],
    relpaths: list[str],
    out_dir: Path,
    image_root: Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    gray_zone_margin: float = 0.05,
    confident_wrong: float = 0.95,
    reference_class: str | None = None,
    figures: bool = True,
) -> dict:
    """Measure argmax and policy decisions on one labelled set; write metrics, figures, worklists.

    ``logits`` are raw model outputs; probabilities are ``softmax(logits / temperature)``.
    ``policy_decisions`` are class indices from the shared-core policy. ``floors`` names the
    disease classes (policy minimum sensitivities); ``thresholds`` their fitted thresholds (for
    the gray zone). ``reference_class`` (the "normal" class) defaults to the only class without a
    floor. Returns the JSON-ready dict also written to ``out_dir/metrics.json``.
    """
    classes = list(classes)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError("evaluation needs at least two classes")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = np.asarray(logits, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        raise ValueError(f"logits must have shape (n, {n_classes}), got {scores.shape}")
    n = scores.shape[0]
    if n == 0:
        raise ValueError("nothing to evaluate: zero rows")
    truth = _check_labels(y_true, n, n_classes, "y_true")
    policy = _check_labels(policy_decisions, n, n_classes, "policy_decisions")
    if len(sources) != n or len(relpaths) != n:
        raise ValueError(f"sources ({len(sources)}) and relpaths ({len(relpaths)}) must have {n} entries")
    thresholds = {name: float(value) for name, value in thresholds.items()}
    floors = {name: float(value) for name, value in floors.items()}
    _check_policy_classes(classes, thresholds, floors)
    reference = _resolve_reference(classes, floors, reference_class)
    disease_classes = [name for name in classes if name in floors]
    source_array = np.asarray([str(s) for s in sources], dtype=object)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    probs = softmax(scores, temperature)
    argmax = probs.argmax(axis=1)
    reports = {
        rule: classification_report(truth, decided, probs, classes, n_bootstrap, seed)
        for rule, decided in (("argmax", argmax), ("policy", policy))
    }
    per_class = {rule: report["per_class"] for rule, report in reports.items()}
    per_source = _per_source(classes, truth, probs, argmax, policy, source_array)
    lists = build_worklists(
        classes, truth, probs, argmax, policy, list(map(str, sources)), list(map(str, relpaths)),
        thresholds, floors, gray_zone_margin, confident_wrong,
    )
    metrics = {
        "n": n,
        "classes": classes,
        "reference_class": reference,
        "disease_classes": disease_classes,
        "thresholds": thresholds,
        "floors": floors,
        "per_class": per_class,
        "macro": {rule: report["macro"] for rule, report in reports.items()},
        "weighted": {rule: report["weighted"] for rule, report in reports.items()},
        "accuracy": {rule: report["accuracy"] for rule, report in reports.items()},
        "macro_auc": reports["argmax"]["macro_auc"],
        "confusion_matrix": {
            rule: {"counts": report["confusion_matrix"], "normalized": report["confusion_matrix_normalized"]}
            for rule, report in reports.items()
        },
        "policy_vs_argmax": _policy_vs_argmax(per_class, disease_classes),
        "floor_holds_bootstrap": _floor_holds(truth, policy, classes, floors, n_bootstrap, seed),
        "calibration": _calibration_block(scores, truth, temperature, DEFAULT_N_BINS),
        "per_source": per_source,
        "same_population": _same_population(classes, reference, truth, probs, argmax, policy, source_array),
        "worklists": {
            "missed": len(lists["missed"]),
            "gray_zone": len(lists["gray_zone"]),
            "confident_wrong": len(lists["confident_wrong"]),
            "missed_per_class": {
                name: sum(1 for row in lists["missed"] if row["true"] == name) for name in disease_classes
            },
            "gray_zone_margin": float(gray_zone_margin),
            "confident_wrong_above": float(confident_wrong),
        },
        "bootstrap": {"n": int(n_bootstrap), "seed": int(seed), "interval": "percentile 95%"},
    }

    written = [METRICS_FILE, REPORT_FILE]
    columns = worklist_columns(classes)
    for name in WORKLISTS:
        write_worklist_csv(lists[name], columns, out_dir / f"worklist_{name}.csv")
        written.append(f"worklist_{name}.csv")
        if image_root is not None and lists[name]:
            contact_sheet(lists[name], Path(image_root), name.replace("_", " "), out_dir / f"worklist_{name}.png")
            written.append(f"worklist_{name}.png")
    if figures:
        for rule in ("argmax", "policy"):
            evaluation_figures.plot_confusion(
                metrics["confusion_matrix"][rule]["normalized"], metrics["confusion_matrix"][rule]["counts"],
                classes, f"Confusion ({rule}), rows normalized", out_dir / f"confusion_matrix_{rule}.png",
            )
        auc = {name: per_class["argmax"][name]["auc"] for name in classes}
        evaluation_figures.plot_roc(truth, probs, classes, auc, out_dir / "roc_curves.png")
        evaluation_figures.plot_reliability(softmax(scores, 1.0), truth, DEFAULT_N_BINS, "Before temperature scaling (T=1)",
                          out_dir / "reliability_before.png")
        evaluation_figures.plot_reliability(probs, truth, DEFAULT_N_BINS, f"After temperature scaling (T={temperature:.3f})",
                          out_dir / "reliability_after.png")
        evaluation_figures.plot_per_source(per_source, classes, out_dir / "per_source_sensitivity.png")
        written += [*evaluation_figures.FIGURES]

    metrics = json_ready(metrics)
    metrics["files"] = sorted(written)
    write_evaluation_markdown(metrics, out_dir / REPORT_FILE)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics


