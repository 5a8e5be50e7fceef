"""``make audit``: find what must not be trained on before anything is trained.

Flags undecodable, tiny and extreme-aspect files, exposure/contrast/border problems, and exact
and near duplicates within and across splits (leakage) and across classes (the same radiograph
under two labels). Writes ``audit.json``, ``summary.md``, figures, and ``exclusions.json`` — the
list the dataset loader honours.

    python -m training.audit --data-dir ../shared/data/cxr3 --out reports/audit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field
from tqdm import tqdm

from cxr_core.config import YamlConfig
from cxr_core.decode import decode_grayscale
from cxr_core.errors import InputError
from cxr_core.preprocess import PreprocessConfig, QualityFlags, compute_quality_flags, find_content_box, to_uint8
from training.data import Dataset, ImageRecord, default_data_dir, discover_dataset
from training.duplicates import ImageFingerprint, cluster_pairs, fingerprint_gray, near_duplicate_pairs
from cxr_core.reporting import markdown_table

log = logging.getLogger("training.audit")

QUALITY_FLAGS = ("underexposed", "overexposed", "low_contrast", "has_border")
# Flags that make a file unusable for training (the rest are reported, and monitored in serving).
EXCLUDING_FLAGS = ("undecodable", "too_small", "label_conflict", "cross_split_duplicate", "duplicate_copy")


class AuditConfig(YamlConfig):
    """Thresholds of the audit; YAML-loadable."""

    model_config = ConfigDict(extra="forbid")

    min_side: int = Field(100, description="shorter side below this is flagged too_small")
    max_aspect: float = Field(3.0, description="longer/shorter side above this is extreme_aspect")
    max_hamming: int = Field(24, description="16x16 average-hash bits that may differ for a near duplicate")
    min_correlation: float = Field(0.98, description="32x32 thumbnail correlation confirming a near duplicate")
    preprocess: PreprocessConfig = PreprocessConfig()

    @classmethod
    def from_yaml(cls, path: Path | str | None, overrides: dict[str, Any] | None = None) -> "AuditConfig":
        """The file's thresholds; the defaults when no file is named."""
        if path is None:
            return cls.validate_or_explain(overrides or {}, "audit defaults")
        return super().from_yaml(path, overrides)


@dataclass
class ImageScan:
    """Everything the audit needs from one file, computed in a worker process."""

    index: int
    sha256: str
    error: str | None = None
    error_message: str | None = None
    flags: QualityFlags | None = None
    fingerprint: ImageFingerprint | None = None


def scan_image(task: tuple[int, str, str]) -> ImageScan:
    index, path, config_json = task
    config = PreprocessConfig.model_validate_json(config_json)
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_grayscale(data, config.max_megapixels)
    except InputError as exc:
        return ImageScan(index=index, sha256=digest, error=exc.code, error_message=str(exc))
    gray = to_uint8(decoded.pixels)
    box = find_content_box(gray, config)
    flags = compute_quality_flags(gray, box, decoded.source_format, decoded.bit_depth, config)
    return ImageScan(index=index, sha256=digest, flags=flags, fingerprint=fingerprint_gray(gray))


def scan_all(records: list[ImageRecord], config: AuditConfig, workers: int) -> list[ImageScan]:
    config_json = config.preprocess.model_dump_json()
    tasks = [(i, str(r.path), config_json) for i, r in enumerate(records)]
    progress = dict(total=len(tasks), desc="audit: scanning images", unit="img", file=sys.stderr)
    if workers <= 1:
        return [scan_image(t) for t in tqdm(tasks, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(scan_image, tasks, chunksize=32), **progress))


def _describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {
        "min": float(array.min()),
        "p05": float(np.percentile(array, 5)),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
        "mean": round(float(array.mean()), 3),
    }


def group_statistics(records: list[ImageRecord], scans: list[ImageScan], key) -> dict[str, dict]:
    """Counts, resolution and intensity distribution per group (split, class, source...)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[key(record)].append(i)
    stats = {}
    for name, indices in sorted(groups.items()):
        ok = [scans[i].flags for i in indices if scans[i].flags is not None]
        stats[name] = {
            "count": len(indices),
            "width": _describe([f.original_width for f in ok]),
            "height": _describe([f.original_height for f in ok]),
            "shorter_side": _describe([min(f.original_width, f.original_height) for f in ok]),
            "mean_intensity": _describe([f.mean_intensity for f in ok]),
            "std_intensity": _describe([f.std_intensity for f in ok]),
        }
    return stats


def _duplicate_clusters(records: list[ImageRecord], scans: list[ImageScan], config: AuditConfig) -> list[dict]:
    """Exact (same bytes) and near duplicate clusters with what they span."""
    usable = [s.index for s in scans if s.fingerprint is not None]
    by_sha: dict[str, list[int]] = defaultdict(list)
    for scan in scans:
        by_sha[scan.sha256].append(scan.index)
    exact_pairs = [(m[0], other) for m in by_sha.values() if len(m) > 1 for other in m[1:]]
    near = near_duplicate_pairs(
        [scans[i].fingerprint for i in usable], config.max_hamming, config.min_correlation
    )
    near_pairs = [(usable[i], usable[j]) for i, j, _ in near]
    clusters = []
    for members in cluster_pairs(len(records), exact_pairs + near_pairs):
        clusters.append(
            {
                "members": [records[i].relpath for i in members],
                "indices": members,
                "exact": len({scans[i].sha256 for i in members}) == 1,
                "splits": sorted({records[i].split for i in members}),
                "labels": sorted({records[i].label for i in members}),
                "sources": sorted({records[i].source for i in members}),
            }
        )
    return clusters


def _copies_to_exclude(cluster: dict, records: list[ImageRecord], scans: list[ImageScan]) -> dict[int, str]:
    """Which members of a duplicate cluster must go, and why.

    Label conflicts: every copy (we cannot know which label is right). Cross-split: keep the
    copies in the most held-out split (test, then val) so evaluation sets stay intact. Within a
    split: keep the highest-resolution copy.
    """
    members = cluster["indices"]
    if len(cluster["labels"]) > 1:
        return {i: "label_conflict" for i in members}
    order = {"test": 0, "val": 1, "train": 2}
    keep_split = min(cluster["splits"], key=lambda s: order.get(s, 3))
    drop: dict[int, str] = {}
    kept_one = False
    def resolution(index: int) -> int:
        flags = scans[index].flags
        return flags.original_width * flags.original_height if flags else 0

    for i in sorted(members, key=lambda m: (-resolution(m), records[m].relpath)):
        if records[i].split != keep_split:
            drop[i] = "cross_split_duplicate"
        elif kept_one:
            drop[i] = "duplicate_copy"
        else:
            kept_one = True
    return drop


def run_audit(dataset: Dataset, config: AuditConfig, workers: int = 2) -> tuple[dict, list[ImageScan]]:
    """Scan every file of ``dataset`` and return the audit document (JSON-ready) and raw scans."""
    records = dataset.records
    scans = scan_all(records, config, workers)
    per_file_flags: dict[int, set[str]] = defaultdict(set)
    for scan in scans:
        if scan.error:
            per_file_flags[scan.index].add("undecodable")
            continue
        flags = scan.flags
        if min(flags.original_width, flags.original_height) < config.min_side:
            per_file_flags[scan.index].add("too_small")
        if flags.aspect_ratio > config.max_aspect:
            per_file_flags[scan.index].add("extreme_aspect")
        for name in QUALITY_FLAGS:
            if getattr(flags, name):
                per_file_flags[scan.index].add(name)
    clusters = _duplicate_clusters(records, scans, config)
    exclusions: dict[int, set[str]] = defaultdict(set)
    for cluster in clusters:
        for index in cluster["indices"]:
            per_file_flags[index].add("exact_duplicate" if cluster["exact"] else "near_duplicate")
            if len(cluster["splits"]) > 1:
                per_file_flags[index].add("cross_split_leak")
            if len(cluster["labels"]) > 1:
                per_file_flags[index].add("label_conflict")
        for index, reason in _copies_to_exclude(cluster, records, scans).items():
            exclusions[index].add(reason)
    for index, flags in per_file_flags.items():
        exclusions[index].update(flags & {"undecodable", "too_small"})
    exclusions = {i: r for i, r in exclusions.items() if r}

    flag_counts = Counter(flag for flags in per_file_flags.values() for flag in flags)
    document = {
        "data_dir": str(dataset.root),
        "manifest_sha256": dataset.manifest_sha256,
        "config": config.model_dump(mode="json"),
        "classes": dataset.classes,
        "total_images": len(records),
        "counts": {
            split: {label: sum(1 for r in records if r.split == split and r.label == label) for label in dataset.classes}
            for split in dataset.splits
        },
        "flag_counts": {name: flag_counts.get(name, 0) for name in sorted(set(flag_counts) | set(QUALITY_FLAGS) | {
            "undecodable", "too_small", "extreme_aspect", "exact_duplicate", "near_duplicate",
            "cross_split_leak", "label_conflict"})},
        "duplicates": {
            "clusters": len(clusters),
            "exact_clusters": sum(c["exact"] for c in clusters),
            "near_clusters": sum(not c["exact"] for c in clusters),
            "cross_split_clusters": sum(len(c["splits"]) > 1 for c in clusters),
            "cross_class_clusters": sum(len(c["labels"]) > 1 for c in clusters),
            "cross_source_clusters": sum(len(c["sources"]) > 1 for c in clusters),
            "list": [{k: v for k, v in c.items() if k != "indices"} for c in clusters],
        },
        "exclusions": {
            "count": len(exclusions),
            "by_reason": dict(Counter(reason for reasons in exclusions.values() for reason in reasons)),
        },
        "stats": {
            "per_split": group_statistics(records, scans, lambda r: r.split),
            "per_class": group_statistics(records, scans, lambda r: r.label),
            "per_source": group_statistics(records, scans, lambda r: r.source),
            "per_split_class": group_statistics(records, scans, lambda r: f"{r.split}/{r.label}"),
        },
        "flagged_files": [
            {"relpath": records[i].relpath, "flags": sorted(flags)}
            for i, flags in sorted(per_file_flags.items())
        ],
        "errors": [
            {"relpath": records[s.index].relpath, "error": s.error, "message": s.error_message}
            for s in scans if s.error
        ],
        "excluded": [
            {"relpath": records[i].relpath, "reasons": sorted(reasons)} for i, reasons in sorted(exclusions.items())
        ],
    }
    return document, scans


def write_exclusions(document: dict, path: Path) -> None:
    """The file ``discover_dataset(..., exclusions=path)`` reads."""
    payload = {
        "data_dir": document["data_dir"],
        "manifest_sha256": document["manifest_sha256"],
        "excluded": document["excluded"],
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


def write_summary(document: dict, path: Path, figures: list[str]) -> None:
    """Human-readable Markdown summary; generated, never hand-edited."""
    lines = [
        "# Data audit",
        "",
        f"Data: `{document['data_dir']}` — {document['total_images']} images, classes "
        f"{', '.join(document['classes'])}. Manifest sha256 `{document['manifest_sha256']}`.",
        "",
        "## Counts",
        "",
    ]
    lines += markdown_table(["split", *document["classes"]],
                            [[split, *(counts[c] for c in document["classes"])] for split, counts in document["counts"].items()])
    lines += ["", "## Flags", ""]
    lines += markdown_table(["flag", "files"], document["flag_counts"].items())
    dup = document["duplicates"]
    lines += [
        "",
        "## Duplicates",
        "",
        f"{dup['clusters']} clusters ({dup['exact_clusters']} exact, {dup['near_clusters']} near); "
        f"{dup['cross_split_clusters']} span splits (leakage), {dup['cross_class_clusters']} span classes "
        f"(label conflicts), {dup['cross_source_clusters']} span sources.",
        "",
        "## Exclusions",
        "",
        f"{document['exclusions']['count']} files excluded from training: "
        + (", ".join(f"{k} {v}" for k, v in sorted(document["exclusions"]["by_reason"].items())) or "none"),
        "",
        "## Per source",
        "",
    ]
    lines += markdown_table(
        ["source", "images", "median shorter side", "mean intensity (median)", "intensity std (median)"],
        [[source, stats["count"], stats["shorter_side"].get("median", "n/a"),
          f"{stats['mean_intensity'].get('median', 'n/a'):.1f}", f"{stats['std_intensity'].get('median', 'n/a'):.1f}"]
         for source, stats in document["stats"]["per_source"].items()])
    lines += ["", "## Figures", ""] + [f"- `{name}`" for name in figures] + [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("reports/audit"))
    parser.add_argument("--config", type=Path, default=None, help="YAML with AuditConfig fields")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = AuditConfig.from_yaml(args.config)
    dataset = discover_dataset(args.data_dir)
    document, scans = run_audit(dataset, config, args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    if not args.no_figures:
        from training.audit_figures import write_audit_figures

        figures = write_audit_figures(document, dataset, scans, args.out)
    (args.out / "audit.json").write_text(json.dumps(document, indent=1) + "\n")
    write_exclusions(document, args.out / "exclusions.json")
    write_summary(document, args.out / "summary.md", figures)
    print(f"audit: {document['total_images']} images, flags {document['flag_counts']}")
    print(
        f"audit: {document['duplicates']['clusters']} duplicate clusters, "
        f"{document['exclusions']['count']} exclusions"
    )
    print(f"audit: report written to {args.out / 'summary.md'} (JSON: {args.out / 'audit.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
