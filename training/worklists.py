"""Worklists of one evaluation: the images a person should look at, as CSV and contact sheets.

- missed: cases of a disease class the policy did not call (closest misses first, the ones a
  slightly lower threshold would catch);
- gray zone: probability within the policy's gray-zone margin of a threshold (the shared-core
  rule :func:`cxr_core.policy.near_threshold`, the same one serving uses to ask for review);
- confident wrong: argmax wrong with a top probability above a limit (label errors or shortcuts).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cxr_core.policy import near_threshold
from training.figures import thumbnail_sheet

WORKLISTS = ("missed", "gray_zone", "confident_wrong")
CONTACT_SHEET_MAX = 32
CONTACT_SHEET_COLUMNS = 8


def worklist_columns(classes: list[str]) -> list[str]:
    return ["relpath", "source", "true", "decided", *[f"p_{name}" for name in classes], "argmax", "reason"]


def worklist_row(
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


def build_worklists(
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
            missed.append(worklist_row(int(i), *common, reason, k))
    for name, threshold in thresholds.items():
        k = classes.index(name)
        distance = np.abs(probs[:, k] - threshold)
        rows = np.flatnonzero(near_threshold(probs[:, k], threshold, gray_zone_margin))
        for i in rows[np.argsort(distance[rows], kind="stable")]:
            reason = f"p({name})={probs[i, k]:.3f} within {gray_zone_margin:g} of threshold {threshold:.3f}"
            gray.append(worklist_row(int(i), *common, reason, k))
    top = probs.max(axis=1)
    rows = np.flatnonzero((top > confident_wrong) & (argmax != y_true))
    wrong = [
        worklist_row(
            int(i), *common, f"p({classes[argmax[i]]})={top[i]:.3f} but true {classes[y_true[i]]}", int(argmax[i])
        )
        for i in rows[np.argsort(-top[rows], kind="stable")]
    ]
    return {"missed": missed, "gray_zone": gray, "confident_wrong": wrong}


def write_worklist_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def contact_sheet(rows: list[dict], image_root: Path, title: str, path: Path) -> None:
    shown = rows[:CONTACT_SHEET_MAX]
    thumbnail_sheet([(Path(image_root) / row["relpath"], f"true {row['true']}\ndecided {row['decided']}\n{row['_key']}")
                     for row in shown], f"{title} (first {len(shown)} of {len(rows)})", path, CONTACT_SHEET_COLUMNS)
