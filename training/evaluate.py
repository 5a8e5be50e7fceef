"""Evaluation of one model on one labelled set: metrics, figures, worklists, report.

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

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from cxr_core.calibration import (  # noqa: E402
    DEFAULT_N_BINS,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_curve,
    softmax,
)
from training.metrics import (  # noqa: E402
    bootstrap_rates,
    classification_report,
    one_vs_rest_auc,
    per_class_metrics,
)

log = logging.getLogger(__name__)

WORKLISTS = ("missed", "gray_zone", "confident_wrong")
CONTACT_SHEET_MAX = 32
CONTACT_SHEET_COLUMNS = 8
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
FIGURES = (
    "confusion_matrix_argmax.png",
    "confusion_matrix_policy.png",
    "roc_curves.png",
    "reliability_before.png",
    "reliability_after.png",
    "per_source_sensitivity.png",
)


# ----------------------------------------------------------------------------------------------
# helpers


def _jsonable(value):
    """numpy scalars/arrays -> Python, NaN/inf -> None, tuples -> lists (strict JSON)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


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
# worklists


def _worklist_columns(classes: list[str]) -> list[str]:
    return ["relpath", "source", "true", "decided", *[f"p_{name}" for name in classes], "argmax", "reason"]


def _worklist_row(
    i: int, classes, y_true, policy, argmax, probs, sources, relpaths, reason: str, key_class: int
) -> dict:
    row = {
        "relpath": relpaths[i],
        "source": sources[i],
        "true": classes[y_true[i]],
        "decided": classes[policy[i]],
        "argmax": classes[argmax[i]],
        "reason": reason,
        "_key": f"p({classes[key_class]})={probs[i, key_class]:.2f}",  # contact-sheet title only
    }
    for k, name in enumerate(classes):
        row[f"p_{name}"] = round(float(probs[i, k]), 6)
    return row


def _build_worklists(
    classes: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    argmax: np.ndarray,
    policy: np.ndarray,
    sources: list[str],
    relpaths: list[str],
    thresholds: dict[str, float],
    floors: dict[str, float],
    gray_zone_margin: float,
    confident_wrong: float,
) -> dict[str, list[dict]]:
    common = (classes, y_true, policy, argmax, probs, sources, relpaths)
    missed: list[dict] = []
    gray: list[dict] = []
    for name in floors:  # policy priority order: the most important misses come first
        k = classes.index(name)
        # within a class, closest misses first: those a slightly lower threshold would catch
        rows = np.flatnonzero((y_true == k) & (policy != k))
        for i in rows[np.argsort(-probs[rows, k], kind="stable")]:
            threshold = thresholds.get(name)
            limit = f" (threshold {threshold:.3f})" if threshold is not None else ""
            reason = f"{name} missed: p({name})={probs[i, k]:.3f}{limit}"
            missed.append(_worklist_row(int(i), *common, reason, k))
    for name, threshold in thresholds.items():
        k = classes.index(name)
        distance = np.abs(probs[:, k] - threshold)
        rows = np.flatnonzero(distance <= gray_zone_margin)
        for i in rows[np.argsort(distance[rows], kind="stable")]:
            reason = f"p({name})={probs[i, k]:.3f} within {gray_zone_margin:g} of threshold {threshold:.3f}"
            gray.append(_worklist_row(int(i), *common, reason, k))
    top = probs.max(axis=1)
    rows = np.flatnonzero((top > confident_wrong) & (argmax != y_true))
    wrong = [
        _worklist_row(
            int(i), *common, f"p({classes[argmax[i]]})={top[i]:.3f} but true {classes[y_true[i]]}", int(argmax[i])
        )
        for i in rows[np.argsort(-top[rows], kind="stable")]
    ]
    return {"missed": missed, "gray_zone": gray, "confident_wrong": wrong}


def _write_worklist_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _contact_sheet(rows: list[dict], image_root: Path, title: str, path: Path) -> None:
    shown = rows[:CONTACT_SHEET_MAX]
    columns = min(CONTACT_SHEET_COLUMNS, len(shown))
    n_rows = int(math.ceil(len(shown) / columns))
    fig, axes = plt.subplots(n_rows, columns, figsize=(columns * 1.7, n_rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown):
        try:
            with Image.open(Path(image_root) / row["relpath"]) as image:
                image.thumbnail((128, 128))
                ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255)
        except (OSError, ValueError):
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
        ax.set_title(f"true {row['true']}\ndecided {row['decided']}\n{row['_key']}", fontsize=6)
    fig.suptitle(f"{title} (first {len(shown)} of {len(rows)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# figures


def _plot_confusion(normalized: list, counts: list, classes: list[str], title: str, path: Path) -> None:
    matrix = np.array(normalized, dtype=np.float64)
    size = max(3.5, 1.2 * len(classes) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(np.nan_to_num(matrix), cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(classes)):
        for j in range(len(classes)):
            share = "n/a" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}"
            dark = not np.isnan(matrix[i, j]) and matrix[i, j] > 0.5
            ax.text(j, i, f"{share}\n({counts[i][j]})", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("decided")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: list[str], auc: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for k, name in enumerate(classes):
        if auc.get(name) is None:
            continue
        fpr, tpr, _ = roc_curve((y_true == k).astype(np.int64), probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc[name]:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, one vs rest (calibrated probabilities)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reliability(probs: np.ndarray, y_true: np.ndarray, n_bins: int, title: str, path: Path) -> None:
    width_curve = reliability_curve(probs, y_true, n_bins, adaptive=False)
    mass_curve = reliability_curve(probs, y_true, n_bins, adaptive=True)
    ece = expected_calibration_error(probs, y_true, n_bins, adaptive=False)
    ece_adaptive = expected_calibration_error(probs, y_true, n_bins, adaptive=True)
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lower, upper = np.array(width_curve["lower"]), np.array(width_curve["upper"])
    ax.bar(lower, width_curve["accuracy"], width=upper - lower, align="edge", alpha=0.6, edgecolor="k",
           label="accuracy (equal-width bins)")
    ax.plot(mass_curve["confidence"], mass_curve["accuracy"], marker="o", color="C1", label="equal-mass bins")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE {ece:.3f} (equal-width), {ece_adaptive:.3f} (adaptive)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax_count.bar(lower, width_curve["count"], width=upper - lower, align="edge", color="grey")
    ax_count.set_xlabel("confidence (top-label probability)")
    ax_count.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_per_source(per_source: dict, classes: list[str], path: Path) -> None:
    sources = list(per_source)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sources) + 2), 4))
    width = 0.8 / max(len(classes), 1)
    for k, name in enumerate(classes):
        values = [per_source[s]["policy"][name]["sensitivity"] for s in sources]
        positions = np.arange(len(sources)) + k * width
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(positions, heights, width, label=name)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(np.arange(len(sources)) + width * (len(classes) - 1) / 2, sources)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("policy sensitivity")
    ax.set_title("Sensitivity per source dataset (policy decisions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    lists = _build_worklists(
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
    columns = _worklist_columns(classes)
    for name in WORKLISTS:
        _write_worklist_csv(lists[name], columns, out_dir / f"worklist_{name}.csv")
        written.append(f"worklist_{name}.csv")
        if image_root is not None and lists[name]:
            _contact_sheet(lists[name], Path(image_root), name.replace("_", " "), out_dir / f"worklist_{name}.png")
            written.append(f"worklist_{name}.png")
    if figures:
        for rule in ("argmax", "policy"):
            _plot_confusion(
                metrics["confusion_matrix"][rule]["normalized"], metrics["confusion_matrix"][rule]["counts"],
                classes, f"Confusion ({rule}), rows normalized", out_dir / f"confusion_matrix_{rule}.png",
            )
        auc = {name: per_class["argmax"][name]["auc"] for name in classes}
        _plot_roc(truth, probs, classes, auc, out_dir / "roc_curves.png")
        _plot_reliability(softmax(scores, 1.0), truth, DEFAULT_N_BINS, "Before temperature scaling (T=1)",
                          out_dir / "reliability_before.png")
        _plot_reliability(probs, truth, DEFAULT_N_BINS, f"After temperature scaling (T={temperature:.3f})",
                          out_dir / "reliability_after.png")
        _plot_per_source(per_source, classes, out_dir / "per_source_sensitivity.png")
        written += [*FIGURES]

    metrics = _jsonable(metrics)
    metrics["files"] = sorted(written)
    write_evaluation_markdown(metrics, out_dir / REPORT_FILE)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(interval) -> str:
    return "" if not interval else f" [{interval[0]:.3f}, {interval[1]:.3f}]"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_evaluation_markdown(metrics: dict, path: Path) -> None:
    """Render the metrics dict as a Markdown report (generated, never hand-edited)."""
    classes = metrics["classes"]
    per_class = metrics["per_class"]
    calibration = metrics["calibration"]
    lines = [
        "# Evaluation",
        "",
        f"{metrics['n']} images; classes {', '.join(classes)}; reference class "
        f"{metrics.get('reference_class') or 'n/a'}; temperature {calibration['temperature']:.3f}. "
        f"Intervals: {metrics['bootstrap']['interval']} bootstrap, {metrics['bootstrap']['n']} resamples "
        f"(seed {metrics['bootstrap']['seed']}).",
        "",
        "## Per class: argmax vs policy",
        "",
    ]
    rows = []
    for name in classes:
        a, p = per_class["argmax"][name], per_class["policy"][name]
        rows.append([
            name, a["support"], _fmt(a["auc"]),
            _fmt(a["sensitivity"]) + _ci(a["sensitivity_ci"]), _fmt(p["sensitivity"]) + _ci(p["sensitivity_ci"]),
            _fmt(a["specificity"]) + _ci(a["specificity_ci"]), _fmt(p["specificity"]) + _ci(p["specificity_ci"]),
            f"{_fmt(a['precision'])} / {_fmt(p['precision'])}", f"{_fmt(a['f1'])} / {_fmt(p['f1'])}",
        ])
    lines += _table(
        ["class", "n", "AUC", "sensitivity argmax", "sensitivity policy", "specificity argmax",
         "specificity policy", "precision argmax / policy", "F1 argmax / policy"],
        rows,
    )
    lines += ["", f"Macro AUC {_fmt(metrics['macro_auc'])}.", ""]
    avg_rows = []
    for kind in ("macro", "weighted"):
        for rule in ("argmax", "policy"):
            values = metrics[kind][rule]
            cells = [_fmt(values.get(key)) for key in ("precision", "sensitivity", "specificity", "f1")]
            avg_rows.append([kind, rule, *cells])
    lines += _table(["average", "decision", "precision", "sensitivity", "specificity", "F1"], avg_rows)

    lines += ["", "## Policy vs argmax", ""]
    rows = []
    for name, gain in metrics["policy_vs_argmax"].items():
        holds = metrics["floor_holds_bootstrap"].get(name, {})
        rows.append([
            name, _fmt(metrics["floors"].get(name)), _fmt(metrics["thresholds"].get(name)),
            f"{_fmt(gain['sensitivity_argmax'])} -> {_fmt(gain['sensitivity_policy'])}",
            _signed(gain["sensitivity_gained"]),
            f"{_fmt(gain['specificity_argmax'])} -> {_fmt(gain['specificity_policy'])}",
            _signed(gain["specificity_given_up"]),
            gain["missed_cases_avoided"], _fmt(holds.get("share")),
        ])
    lines += _table(
        ["class", "floor", "threshold", "sensitivity", "gained", "specificity", "given up", "missed cases avoided",
         "floor holds (share of resamples)"],
        rows,
    ) if rows else ["No disease classes with a floor."]

    lines += ["", "## Calibration", ""]
    lines += _table(
        ["", f"ECE ({calibration['n_bins']} equal-width bins)", "ECE (adaptive bins)", "NLL"],
        [
            ["before (T=1)", _fmt(calibration["ece_before"], 4), _fmt(calibration["adaptive_ece_before"], 4),
             _fmt(calibration["nll_before"], 4)],
            [f"after (T={calibration['temperature']:.3f})", _fmt(calibration["ece_after"], 4),
             _fmt(calibration["adaptive_ece_after"], 4), _fmt(calibration["nll_after"], 4)],
        ],
    )

    lines += ["", "## Per source dataset", ""]
    rows = []
    for source, entry in metrics["per_source"].items():
        for name in classes:
            rows.append([
                source, name, entry["counts"][name],
                _fmt(entry["argmax"][name]["sensitivity"]), _fmt(entry["policy"][name]["sensitivity"]),
                _fmt(entry["argmax"][name]["specificity"]), _fmt(entry["policy"][name]["specificity"]),
                _fmt(entry["auc"].get(name)),
            ])
    lines += _table(
        ["source", "class", "n", "sensitivity argmax", "sensitivity policy", "specificity argmax",
         "specificity policy", "AUC"],
        rows,
    )

    lines += ["", "## Same population (disease vs reference within sources holding both)", ""]
    same = metrics.get("same_population") or {}
    if same:
        rows = [
            [disease, entry["reference"], ", ".join(entry["sources"]) or "none",
             f"{entry['n_disease']} / {entry['n_reference']}", _fmt(entry["auc"]),
             _fmt(entry["policy_sensitivity"]), _fmt(entry["policy_specificity"])]
            for disease, entry in same.items()
        ]
        lines += _table(["disease", "vs", "sources", "n disease / reference", "AUC", "policy sensitivity",
                         "policy specificity"], rows)
    else:
        lines += ["No reference class: same-population view not computed."]

    worklists = metrics["worklists"]
    lines += [
        "",
        "## Worklists",
        "",
        f"- missed (false negatives under the policy): {worklists['missed']} ("
        + (", ".join(f"{k} {v}" for k, v in worklists["missed_per_class"].items()) or "no disease classes")
        + ")",
        f"- gray zone (within {worklists['gray_zone_margin']:g} of a threshold): {worklists['gray_zone']}",
        f"- confident wrong (p > {worklists['confident_wrong_above']:g} and wrong): {worklists['confident_wrong']}",
        "",
    ]
    Path(path).write_text("\n".join(lines))
