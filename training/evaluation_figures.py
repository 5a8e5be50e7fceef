"""The figures of one evaluation: confusion matrices, ROC, reliability diagrams, per-source sensitivity.

Pictures of numbers that :mod:`training.evaluate` has already computed (AUCs, confusion counts);
only the ROC and reliability curves are derived here, with scikit-learn and the shared-core
calibration code, so a figure can never disagree with the report beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from cxr_core.calibration import expected_calibration_error, reliability_curve
from training.figures import plt, save_figure

FIGURES = (
    "confusion_matrix_argmax.png",
    "confusion_matrix_policy.png",
    "roc_curves.png",
    "reliability_before.png",
    "reliability_after.png",
    "per_source_sensitivity.png",
)


def plot_confusion(normalized: list, counts: list, classes: list[str], title: str, path: Path) -> None:
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
    save_figure(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: list[str], auc: dict, path: Path) -> None:
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
    save_figure(fig, path)


def plot_reliability(probs: np.ndarray, y_true: np.ndarray, n_bins: int, title: str, path: Path) -> None:
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
    save_figure(fig, path)


def plot_per_source(per_source: dict, classes: list[str], path: Path) -> None:
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
    save_figure(fig, path)
