"""Who is who in cxr3: age group and hospital of origin of an image, and held-out test sets.

The rules follow ``../shared/data/cxr3/SOURCES.md`` and the manifest (``source_dataset``,
``duplicates_also_in``):

Age group (pediatric vs adult), from the source, never from the pixels:
- pediatric: every ``kermany`` image; every ``kaggle-cxr`` pneumonia image (the Kaggle set's
  pneumonia images are Kermany's, ages 1-5); any image whose manifest lists a Kermany duplicate;
- adult: ``tbx11k``, ``tbdb`` and ``nih-cxr14`` (cxr3 version 2 kept NIH patients aged 18-85 only);
  ``kaggle-cxr`` tuberculosis; ``kaggle-cxr`` normal without a
  Kermany duplicate (SOURCES.md counts these as adult: 986 adult normals = 784 kaggle-cxr + 202
  tbdb; a random contact sheet of them shows adult chests);
- anything else (another data set without these sources): ``unknown``.

Origin: the manifest source plus every source the manifest says held a duplicate of the image.
Holding a source out removes both, so a Kaggle copy of a TBDB image does not leak TBDB into
training (see :class:`training.robustness.config.FoldSpec`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from training.data import Dataset, ImageRecord
from training.robustness.config import FoldSpec

PEDIATRIC = "pediatric"
ADULT = "adult"
UNKNOWN_AGE = "unknown"
PEDIATRIC_SOURCES = frozenset({"kermany"})
ADULT_SOURCES = frozenset({"tbx11k", "tbdb", "nih-cxr14"})
MIXED_SOURCE = "kaggle-cxr"
AGE_RULE = ("pediatric = kermany, kaggle-cxr pneumonia, and any image with a Kermany duplicate; adult = tbx11k, "
            "tbdb, nih-cxr14 (ages 18-85), kaggle-cxr tuberculosis and kaggle-cxr normal without a Kermany duplicate (counted adult by "
            "SOURCES.md; a contact sheet shows adult chests)")


def duplicate_sources(record: ImageRecord) -> set[str]:
    """Sources the manifest says held a (near-)duplicate of this image."""
    raw = record.manifest.get("duplicates_also_in", "") if record.manifest else ""
    return {part for part in re.split(r"[;,|\s]+", raw) if part}


def origin_sources(record: ImageRecord) -> set[str]:
    return {record.source} | duplicate_sources(record)


def age_group(record: ImageRecord) -> str:
    """``pediatric`` / ``adult`` / ``unknown`` by the rule in the module docstring."""
    origins = origin_sources(record)
    if origins & PEDIATRIC_SOURCES:
        return PEDIATRIC
    if record.source == MIXED_SOURCE:
        return PEDIATRIC if record.label == "pneumonia" else ADULT
    if record.source in ADULT_SOURCES:
        return ADULT
    return UNKNOWN_AGE


def kept_for_training(record: ImageRecord, fold: FoldSpec | None) -> bool:
    """Whether a record may be trained on (train/val splits) in ``fold`` (None: every source)."""
    if fold is None:
        return True
    if record.source == fold.holdout:
        return False
    return not (fold.drop_duplicates_of_holdout and fold.holdout in duplicate_sources(record))


def heldout_records(dataset: Dataset, fold: FoldSpec | None, reference_class: str = "normal") -> list[ImageRecord]:
    """The images a fold is tested on.

    ``fold`` None: the standard test split. Otherwise every image of the held-out source, all
    splits (the model never saw any of them); when that source has no ``reference_class`` images
    (tbx11k is tuberculosis only) and ``fold.partner_reference`` is set, its images are tested
    against reference images of the same age group taken from the *test split* of the other
    sources (never trained on), excluding copies of held-out images.
    """
    if fold is None:
        return dataset.split("test")
    own = [r for r in dataset.records if r.source == fold.holdout]
    if not own:
        raise ValueError(f"source {fold.holdout!r} has no images in {dataset.root} (sources: {dataset.sources()})")
    if any(r.label == reference_class for r in own) or not fold.partner_reference:
        return own
    ages = {age_group(r) for r in own}
    partners = [
        r for r in dataset.split("test")
        if r.label == reference_class and r.source != fold.holdout
        and fold.holdout not in duplicate_sources(r) and age_group(r) in ages
    ]
    return own + partners


def describe(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    """Counts per source/label/age group, for reports."""
    records = list(records)
    by_source = Counter(f"{r.source}/{r.label}" for r in records)
    by_age = Counter(f"{age_group(r)}/{r.label}" for r in records)
    return {"source_label": dict(sorted(by_source.items())), "age_label": dict(sorted(by_age.items()))}
