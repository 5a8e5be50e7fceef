"""Figures for the data audit: what a reviewer would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import Dataset
from training.figures import plt, save_figure, thumbnail_sheet

CONTACT_SHEET_MAX = 48


def _class_distribution(document: dict, path: Path) -> None:
    classes = document["classes"]
    splits = list(document["counts"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(classes), 1)
    for k, label in enumerate(classes):
        values = [document["counts"][s][label] for s in splits]
        positions = np.arange(len(splits)) + k * width
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(np.arange(len(splits)) + width * (len(classes) - 1) / 2, splits)
    ax.set_ylabel("images")
    ax.set_title("Class distribution per split")
    ax.legend()
    save_figure(fig, path)


def _resolution_histogram(dataset: Dataset, scans, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    by_source: dict[str, list[int]] = {}
    for record, scan in zip(dataset.records, scans):
        if scan.flags is not None:
            by_source.setdefault(record.source, []).append(
                min(scan.flags.original_width, scan.flags.original_height)
            )
    bins = np.linspace(0, max((max(v) for v in by_source.values()), default=1), 40)
    for source, values in sorted(by_source.items()):
        ax.hist(values, bins=bins, alpha=0.5, label=f"{source} (n={len(values)})")
    ax.set_xlabel("shorter side of the stored image (px)")
    ax.set_ylabel("images")
    ax.set_title("Resolution by source (a shortcut risk when it differs by class)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _intensity_by_class(dataset: Dataset, scans, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dataset.classes:
        flags = [s.flags for r, s in zip(dataset.records, scans) if r.label == label and s.flags is not None]
        axes[0].hist([f.mean_intensity for f in flags], bins=40, alpha=0.5, label=label)
        axes[1].hist([f.std_intensity for f in flags], bins=40, alpha=0.5, label=label)
    axes[0].set_xlabel("mean intensity (content region)")
    axes[1].set_xlabel("intensity std (content region)")
    for ax in axes:
        ax.set_ylabel("images")
        ax.legend()
    fig.suptitle("Intensity distribution per class")
    save_figure(fig, path)


def _contact_sheet(document: dict, dataset: Dataset, path: Path) -> None:
    flagged = document["flagged_files"][:CONTACT_SHEET_MAX]
    thumbnail_sheet([(dataset.root / item["relpath"], "\n".join(item["flags"][:2])) for item in flagged],
                    f"Flagged images (first {len(flagged)} of {len(document['flagged_files'])})", path)


def write_audit_figures(document: dict, dataset: Dataset, scans, out: Path) -> list[str]:
    """Write the audit's PNG figures into ``out``; returns their file names."""
    out.mkdir(parents=True, exist_ok=True)
    _class_distribution(document, out / "class_distribution.png")
    _resolution_histogram(dataset, scans, out / "resolution_by_source.png")
    _intensity_by_class(dataset, scans, out / "intensity_by_class.png")
    _contact_sheet(document, dataset, out / "flagged_contact_sheet.png")
    return sorted(p.name for p in out.glob("*.png"))
