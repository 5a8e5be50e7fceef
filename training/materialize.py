"""Sampling and augmentation for the families that fit on a fixed matrix (classical HOG, linear probe).

The scratch / fine-tune loops honour ``augment`` and ``source_balanced_sampler`` on the fly. A
classical classifier or a linear probe sees each training image once, as a row of a matrix, so
the same options are realised here on the training split before fitting:

- ``source_balanced_sampler`` -> :func:`source_balanced_resample` (per label, every source
  oversampled to the largest source's count; the originals are all kept);
- ``augment.downscale_probability > 0`` -> ``augment_copies`` extra copies of every image through
  :func:`training.augment.augment_pixels` with only the resolution / blur / CLAHE parts switched on
  (a flip or a rotation does not move HOG or probe features toward a new hospital; resolution does).

These are the shortcut mitigations of issue 9 (``reports/robustness/loso.md``); the family configs
turn them on by default. Everything is seeded from ``config.seed``.
"""

from __future__ import annotations

import numpy as np

from training.augment import augment_pixels
from training.config import AugmentConfig, TrainConfig
from training.datasets import SplitArrays


def take(split: SplitArrays, indices: np.ndarray, pixels: np.ndarray | None = None) -> SplitArrays:
    """A new split made of rows ``indices`` of ``split`` (optionally with replaced pixels)."""
    indices = np.asarray(indices, dtype=np.int64)
    return SplitArrays(
        name=split.name,
        pixels=split.pixels[indices] if pixels is None else pixels,
        labels=split.labels[indices],
        records=[split.records[i] for i in indices],
    )


def concat(first: SplitArrays, second: SplitArrays) -> SplitArrays:
    return SplitArrays(name=first.name, pixels=np.concatenate([first.pixels, second.pixels]),
                       labels=np.concatenate([first.labels, second.labels]), records=first.records + second.records)


def source_balanced_resample(split: SplitArrays, seed: int) -> SplitArrays:
    """Per label, oversample every source (with replacement) to the largest source's count."""
    rng = np.random.default_rng(seed)
    sources = np.asarray(split.sources, dtype=object)
    extra: list[np.ndarray] = []
    for label in np.unique(split.labels):
        groups = [np.flatnonzero((split.labels == label) & (sources == s)) for s in np.unique(sources[split.labels == label])]
        target = max(len(g) for g in groups)
        extra += [rng.choice(g, size=target - len(g), replace=True) for g in groups if len(g) < target]
    if not extra:
        return split
    return take(split, np.concatenate([np.arange(len(split.labels)), *extra]))


def resolution_augment(augment: AugmentConfig) -> AugmentConfig:
    """The config's augmentation with only the resolution / blur / CLAHE parts kept."""
    return augment.model_copy(update={"hflip": 0.0, "rotation_degrees": 0.0, "brightness": 0.0, "contrast": 0.0})


def add_augmented_copies(split: SplitArrays, augment: AugmentConfig, copies: int, seed: int) -> SplitArrays:
    """``split`` plus ``copies`` augmented copies of every image (seeded per copy and row)."""
    if copies <= 0:
        return split
    result = split
    for copy in range(copies):
        pixels = np.stack([augment_pixels(p, augment, np.random.default_rng((seed, 7919, copy, i)))
                           for i, p in enumerate(split.pixels)])
        result = concat(result, take(split, np.arange(len(split.labels)), pixels=pixels))
    return result


def source_label_counts(split: SplitArrays) -> dict[str, int]:
    """Rows per ``source/label`` of a split: what a fixed-matrix family was actually fitted on
    (recorded in the bundle's training info, so a report can show the balancing happened)."""
    counts: dict[str, int] = {}
    for record in split.records:
        key = f"{record.source}/{record.label}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def fixed_matrix_training_split(split: SplitArrays, config: TrainConfig) -> SplitArrays:
    """The training split a fixed-matrix family should fit on, from the config alone.

    With no sampler and no downscaling the split comes back unchanged (the same object).
    """
    if config.source_balanced_sampler:
        split = source_balanced_resample(split, config.seed)
    if config.augment.downscale_probability > 0 and config.augment_copies:
        split = add_augmented_copies(split, resolution_augment(config.augment), config.augment_copies, config.seed)
    return split
