"""``make lungs-check``: how the lung segmenter holds on the classifier's own images.

    python -m training.lungs_check [--data-dir ../shared/data/cxr3] [--split test]
        [--weights models/lungs/segmenter.pt] [--out reports/lungs] [--per-group 6]

The segmenter learned from adult normals of one teaching website; the classifier's images are
children, tuberculosis, pneumonia and other hospitals. This runs the segmenter exactly as the
preprocessing chain does (decode, black-border crop, segment, post-process, judge) on every image
of the split, counts the failure verdicts per source x class, and draws a contact sheet (masks and
boxes on sample images of every group, then failures) for a person to look at.
Writes ``<out>/cxr3-check.{json,md}`` and ``<out>/cxr3-contact-sheet.png`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cxr_core.decode import decode_grayscale
from cxr_core.lungs import DEFAULT_WEIGHTS, FAILURE_REASONS, LungFields, load_segmenter_file
from cxr_core.preprocess import PreprocessConfig, find_content_box, to_uint8
from cxr_core.reporting import markdown_table
from training.data import default_data_dir, discover_dataset
from training.provenance import git_commit, utc_now

TILE = 150


def content_of(path: Path, config: PreprocessConfig) -> np.ndarray:
    """The content region the chain hands to the segmenter."""
    gray = to_uint8(decode_grayscale(path.read_bytes(), config.max_megapixels).pixels)
    top, bottom, left, right = find_content_box(gray, config)
    return np.ascontiguousarray(gray[top:bottom, left:right])


def tile(content: np.ndarray, fields: LungFields, caption: str) -> np.ndarray:
    """One contact-sheet cell: the image, the mask's outline, the box, a caption."""
    image = cv2.cvtColor(cv2.resize(content, (TILE, TILE), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    mask = fields.mask_at(TILE, TILE).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    colour = (0, 200, 0) if fields.ok else (0, 0, 255)
    cv2.drawContours(image, contours, -1, (255, 200, 0), 1)
    if fields.box is not None:
        h, w = fields.input_shape
        top, bottom, left, right = fields.box
        cv2.rectangle(image, (int(left * TILE / w), int(top * TILE / h)),
                      (int(right * TILE / w) - 1, int(bottom * TILE / h) - 1), colour, 1)
    cv2.rectangle(image, (0, TILE - 14), (TILE, TILE), (0, 0, 0), -1)
    cv2.putText(image, caption[:26], (2, TILE - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.33, colour, 1, cv2.LINE_AA)
    return image


def sheet(rows: list[tuple[str, list[np.ndarray]]], columns: int) -> np.ndarray:
    """Labelled rows of tiles -> one BGR image."""
    label_width = 170
    canvas = np.full((len(rows) * TILE, label_width + columns * TILE, 3), 40, dtype=np.uint8)
    for r, (label, tiles) in enumerate(rows):
        for line, text in enumerate(label.split("\n")):
            cv2.putText(canvas, text, (4, r * TILE + 20 + 16 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                        (255, 255, 255), 1, cv2.LINE_AA)
        for c, cell in enumerate(tiles[:columns]):
            canvas[r * TILE:(r + 1) * TILE, label_width + c * TILE:label_width + (c + 1) * TILE] = cell
    return canvas


def run_check(data_dir: Path, split: str, weights: Path, out: Path, per_group: int, seed: int = 20240611) -> dict[str, Any]:
    segmenter = load_segmenter_file(weights)
    config = PreprocessConfig()
    records = [r for r in discover_dataset(data_dir).records if r.split == split]
    groups: dict[tuple[str, str], list] = defaultdict(list)
    results = []
    started = time.perf_counter()
    for index, record in enumerate(records):
        content = content_of(record.path, config)
        fields = segmenter.segment(content)
        groups[(record.source, record.label)].append((record, content, fields))
        results.append({"relpath": record.relpath, "source": record.source, "label": record.label,
                        "failure": fields.failure, "lung_areas": list(fields.lung_areas)})
        if (index + 1) % 100 == 0:
            print(f"lungs-check: {index + 1}/{len(records)} images", file=sys.stderr)
    seconds = time.perf_counter() - started
    table = []
    for (source, label), items in sorted(groups.items()):
        counts = {reason: sum(f.failure == reason for _, _, f in items) for reason in FAILURE_REASONS}
        failed = sum(counts.values())
        table.append({"source": source, "label": label, "n": len(items), **counts, "failed": failed,
                      "failure_rate": round(failed / len(items), 4)})
    total_failed = sum(row["failed"] for row in table)
    rng = np.random.default_rng(seed)
    rows = []
    for (source, label), items in sorted(groups.items()):
        picks = rng.choice(len(items), size=min(per_group, len(items)), replace=False)
        rows.append((f"{source}\n{label}\nfailed {sum(f.failure is not None for _, _, f in items)}/{len(items)}",
                     [tile(items[i][1], items[i][2], items[i][2].failure or "ok") for i in sorted(picks)]))
    failures = [(r, c, f) for items in groups.values() for r, c, f in items if f.failure]
    for start in range(0, min(len(failures), 3 * per_group), per_group):
        chunk = failures[start:start + per_group]
        rows.append(("failures", [tile(c, f, f"{r.source[:9]} {r.label[:4]} {f.failure}") for r, c, f in chunk]))
    out.mkdir(parents=True, exist_ok=True)
    sheet_path = out / "cxr3-contact-sheet.png"
    cv2.imwrite(str(sheet_path), sheet(rows, per_group))
    return {
        "created_at": utc_now(), "git_commit": git_commit(), "data_dir": str(data_dir), "split": split,
        "weights": str(weights), "weights_sha256": segmenter.sha256, "n_images": len(records),
        "failed": total_failed, "failure_rate": round(total_failed / max(len(records), 1), 4),
        "failures_by_reason": {reason: sum(row[reason] for row in table) for reason in FAILURE_REASONS},
        "per_source_class": table, "seconds": round(seconds, 1),
        "ms_per_image": round(1000 * seconds / max(len(records), 1), 2),
        "contact_sheet": str(sheet_path), "per_image": results,
    }


def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        "# Lung segmenter on cxr3 (`make lungs-check`)",
        "",
        f"Generated by `python -m training.lungs_check` at {report['created_at']} (commit {report['git_commit'][:10]}); "
        f"segmenter `{report['weights']}` (sha256 {report['weights_sha256'][:12]}).",
        "",
        f"Every {report['split']} image ({report['n_images']}), segmented as the preprocessing chain does "
        f"(black-border crop, segmenter, two largest regions, holes filled, plausibility rules); "
        f"{report['ms_per_image']} ms per image including decoding.",
        f"Failed: {report['failed']} ({100 * report['failure_rate']:.1f}%) — "
        + ", ".join(f"{k} {v}" for k, v in report["failures_by_reason"].items()) + ".",
        "",
        *markdown_table(
            ["source", "class", "n", "empty mask", "one lung", "implausible area", "outside chest", "failure rate"],
            [[row["source"], row["label"], row["n"], row["empty_mask"], row["one_lung"], row["implausible_area"],
              row["outside_chest"], f"{100 * row['failure_rate']:.1f}%"] for row in report["per_source_class"]]),
    ]
    lines += ["", "Verdicts: `empty_mask` no region of at least 1% of the image; `one_lung` the second region is "
              "missing or under 20% of the first; `implausible_area` both lungs together under 6% or over 70% of "
              "the image; `outside_chest` the two regions are not side by side (centroids under 12% of the width "
              "apart, or sharing under 30% of their height) or their box is off-centre.",
              "", f"Contact sheet (regenerated, not committed): `{report['contact_sheet']}`.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.lungs_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--split", default="test")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--out", type=Path, default=Path("reports/lungs"))
    parser.add_argument("--per-group", type=int, default=6)
    args = parser.parse_args(argv)
    report = run_check(args.data_dir, args.split, args.weights, args.out, args.per_group)
    (args.out / "cxr3-check.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.out / "cxr3-check.md")
    print(f"lungs-check: {report['failed']}/{report['n_images']} failed ({100 * report['failure_rate']:.1f}%); "
          f"report {args.out / 'cxr3-check.md'}; contact sheet {report['contact_sheet']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
