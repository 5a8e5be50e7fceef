"""Dataset layer: discover a folder of chest X-rays in split/class layout.

Layout: ``{train,val,test}/{class}/*.{jpg,jpeg,png}`` (an external evaluation folder may also be
just ``{class}/*``). Classes come from the folder names, never from code: a hospital's set may
have other or fewer classes. ``manifest.csv`` (source dataset, patient id), when present, is joined
by file stem so metrics can be reported per source.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr3"
UNKNOWN_SOURCE = "unknown"


def default_data_dir() -> Path:
    """``DATA_DIR`` from the environment, else the default cxr3 set beside the repository."""
    return Path(os.environ.get("DATA_DIR", DEFAULT_DATA_DIR))


@dataclass(frozen=True)
class ImageRecord:
    """One image file and what is known about it."""

    path: Path
    relpath: str
    split: str
    label: str
    image_id: str
    source: str = UNKNOWN_SOURCE
    patient_id: str = ""
    manifest: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Dataset:
    """All records of a data folder plus the class list discovered from it."""

    root: Path
    classes: list[str]
    records: list[ImageRecord]
    manifest_sha256: str | None
    excluded: dict[str, list[str]] = field(default_factory=dict)

    def split(self, name: str) -> list[ImageRecord]:
        return [record for record in self.records if record.split == name]

    @property
    def splits(self) -> list[str]:
        return sorted({record.split for record in self.records}, key=_split_order)

    def label_index(self, record: ImageRecord) -> int:
        return self.classes.index(record.label)

    def sources(self) -> list[str]:
        return sorted({record.source for record in self.records})


def _split_order(name: str) -> tuple[int, str]:
    return (SPLITS.index(name) if name in SPLITS else len(SPLITS), name)


def _read_manifest(root: Path) -> tuple[dict[str, dict[str, str]], str | None]:
    path = root / "manifest.csv"
    if not path.exists():
        return {}, None
    raw = path.read_bytes()
    rows = csv.DictReader(raw.decode("utf-8").splitlines())
    return {row["id"]: row for row in rows if row.get("id")}, hashlib.sha256(raw).hexdigest()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_exclusions(path: Path | None) -> dict[str, list[str]]:
    """Files the audit said must not be used (relative path -> reasons)."""
    if path is None or not Path(path).exists():
        return {}
    payload = json.loads(Path(path).read_text())
    return {item["relpath"]: item["reasons"] for item in payload.get("excluded", [])}


def discover_dataset(root: Path | str, exclusions: Path | str | None = None) -> Dataset:
    """Scan ``root`` for split/class folders (or class folders only, as split ``all``).

    ``exclusions`` is the JSON list written by ``make audit``; listed files are left out and
    counted, never silently dropped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    manifest, manifest_sha = _read_manifest(root)
    excluded_reasons = load_exclusions(Path(exclusions) if exclusions else None)
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLITS]
    layout: list[tuple[str, Path]] = (
        [(d.name, d) for d in split_dirs] if split_dirs else [("all", root)]
    )
    classes = sorted(
        {c.name for _, split_dir in layout for c in split_dir.iterdir() if c.is_dir() and not c.name.startswith(".")}
    )
    if not classes:
        raise ValueError(f"{root} holds no class folders (expected {{split}}/{{class}}/*.jpg or {{class}}/*.jpg)")
    records: list[ImageRecord] = []
    excluded: dict[str, list[str]] = {}
    for split_name, split_dir in layout:
        for class_name in classes:
            class_dir = split_dir / class_name
            if not class_dir.is_dir():
                continue
            for path in sorted(p for p in class_dir.iterdir() if _is_image(p)):
                relpath = path.relative_to(root).as_posix()
                if relpath in excluded_reasons:
                    excluded[relpath] = excluded_reasons[relpath]
                    continue
                row = manifest.get(path.stem, {})
                records.append(
                    ImageRecord(
                        path=path,
                        relpath=relpath,
                        split=split_name,
                        label=class_name,
                        image_id=path.stem,
                        source=row.get("source_dataset") or UNKNOWN_SOURCE,
                        patient_id=row.get("patient_id_if_known", ""),
                        manifest=row,
                    )
                )
    if excluded:
        log.info("left out %d files listed in %s", len(excluded), exclusions)
    return Dataset(root=root, classes=classes, records=records, manifest_sha256=manifest_sha, excluded=excluded)


def dataset_fingerprint(dataset: Dataset) -> str:
    """Provenance hash: the manifest's sha256 when present, else a hash of the file list."""
    if dataset.manifest_sha256:
        return dataset.manifest_sha256
    listing = "\n".join(f"{r.relpath}:{r.path.stat().st_size}" for r in dataset.records)
    return hashlib.sha256(listing.encode()).hexdigest()
