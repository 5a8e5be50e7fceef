"""The drift reference profile: the audit log's feature row, computed on a model's own held-out data.

The drift job compares what serving logs (one :func:`cxr_core.features.prediction_features` row
per request) with what the same model produced on its validation (and test) images. Both sides
come from the same code, so a difference is a difference in the data, never in the feature code.
The profile is a CSV stored inside the bundle directory and named in ``bundle.json``
(``reference_profile``), so every model version carries its own reference; the registration step
calls :func:`write_reference_profile` before it logs the bundle.

    python -m cxr_core.reference --bundle runs/.../bundle --data-dir ../shared/data/cxr3

Depends on the shared core and the dataset layout only (no pandas, no Evidently).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr_core.batching import predict_in_batches
from cxr_core.bundle import MANIFEST_NAME, Predictor, load_bundle, read_manifest
from cxr_core.errors import InputError
from cxr_core.features import prediction_features

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_profile.csv"
LABEL_COLUMN = "label"
DEFAULT_SPLITS = ("val", "test")
BATCH_SIZE = 64


def reference_rows(predictor: Predictor, items: Iterable[tuple[str, bytes, str | None]],
                   batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """One row per image: the audit-log feature columns (``prediction_features``) plus ``label``.

    ``items`` yields ``(image_id, bytes, label or None)``. Images the preprocessing refuses are
    logged by id and left out (serving would have answered them with a 4xx and logged no features).
    """
    rows: list[dict[str, Any]] = []
    for (image_id, _, label), prediction, _ in predict_in_batches(predictor, items, lambda item: item[1], batch_size):
        if isinstance(prediction, InputError):
            log.warning("reference: %s refused by preprocessing (%s)", image_id, prediction.code)
            continue
        rows.append({**prediction_features(prediction), LABEL_COLUMN: label})
    return rows


def write_rows_csv(rows: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """Write feature rows as CSV (columns in first-row order); ``None`` becomes an empty cell."""
    path = Path(path)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def dataset_items(data_dir: Path | str, splits: Sequence[str],
                  max_per_class: int | None = None) -> list[tuple[str, bytes, str | None]]:
    """``(image_id, bytes, label)`` of every image in ``splits`` (optionally the first N per class)."""
    from training.data import discover_dataset  # the dataset layout lives with training

    dataset = discover_dataset(data_dir)
    missing = [s for s in splits if s not in dataset.splits]
    if missing:
        raise ValueError(f"{data_dir} has no split(s) {missing}; it has {dataset.splits}")
    items: list[tuple[str, bytes, str | None]] = []
    for split in splits:
        taken: dict[str, int] = {}
        for record in dataset.split(split):
            if max_per_class is not None and taken.get(record.label, 0) >= max_per_class:
                continue
            taken[record.label] = taken.get(record.label, 0) + 1
            items.append((record.image_id, record.path.read_bytes(), record.label))
    return items


def write_reference_profile(bundle_dir: Path | str, data_dir: Path | str,
                            splits: Sequence[str] = DEFAULT_SPLITS,
                            max_per_class: int | None = None) -> dict[str, Any]:
    """Compute the profile on ``splits`` of ``data_dir``, store it in the bundle, name it in bundle.json.

    Returns the ``reference_profile`` entry written to the manifest. The manifest is re-read and
    validated (``read_manifest``) after the write, so a bundle never carries a profile it can't load.
    """
    bundle_dir = Path(bundle_dir)
    predictor = load_bundle(bundle_dir)
    items = dataset_items(data_dir, splits, max_per_class)
    rows = reference_rows(predictor, items)
    unknown = sorted({row[LABEL_COLUMN] for row in rows} - set(predictor.classes))
    if unknown:
        raise ValueError(f"{data_dir} has classes {unknown} that the bundle does not know ({predictor.classes})")
    write_rows_csv(rows, bundle_dir / REFERENCE_FILE)
    entry = {
        "file": REFERENCE_FILE,
        "n": len(rows),
        "splits": list(splits),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_dir": str(Path(data_dir)),
        "n_refused": len(items) - len(rows),
    }
    manifest = read_manifest(bundle_dir).model_copy(update={"reference_profile": entry})
    manifest_path = bundle_dir / MANIFEST_NAME
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=1) + "\n")
    tmp.replace(manifest_path)
    reread = read_manifest(bundle_dir)
    if reread.reference_profile != entry:
        raise RuntimeError(f"{manifest_path} did not keep the reference profile entry")
    log.info("reference profile: %d rows from %s %s -> %s", len(rows), data_dir, list(splits),
             bundle_dir / REFERENCE_FILE)
    return entry


def reference_profile_path(bundle_dir: Path | str) -> Path:
    """The profile CSV a bundle names in its manifest; a clear error when it has none."""
    bundle_dir = Path(bundle_dir)
    entry = read_manifest(bundle_dir).reference_profile
    if not entry or not entry.get("file"):
        raise FileNotFoundError(
            f"bundle {bundle_dir} carries no reference profile; run "
            f"`python -m cxr_core.reference --bundle {bundle_dir} --data-dir DATA_DIR`"
        )
    path = bundle_dir / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"bundle {bundle_dir} names reference profile {entry['file']} but it is missing")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_core.reference",
        description="Compute a bundle's drift reference profile (the serving audit-log feature columns "
                    "plus the true label, on its validation/test images), write reference_profile.csv "
                    "into the bundle and name it in bundle.json.",
    )
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory (bundle.json)")
    parser.add_argument("--data-dir", required=True, type=Path, help="dataset root ({split}/{class}/*.jpg)")
    parser.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="splits to profile (default: val test)")
    parser.add_argument("--max-per-class", type=int, default=None, help="first N images per class and split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    entry = write_reference_profile(args.bundle, args.data_dir, args.splits, args.max_per_class)
    print(f"{args.bundle / entry['file']}: {entry['n']} rows from {', '.join(entry['splits'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
