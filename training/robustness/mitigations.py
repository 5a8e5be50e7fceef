"""Shortcut mitigations as configuration, and the split transforms that realise them.

A mitigation (:class:`training.robustness.config.MitigationSpec`) is first of all a set of
ordinary TrainConfig overrides, so the winner becomes the default by a config change:

- ``preprocess.clahe: true`` — CLAHE on every image (train, test, serving): exposure standardised;
- ``augment.downscale_probability`` / ``augment.blur_probability`` — resolution and blur
  augmentation (hides the resolution cue: Kermany images were squashed to 224 px, many Kaggle
  TB images are small);
- ``source_balanced_sampler: true`` — every (source, label) group weighs the same.

The scratch / fine-tune loops honour augment and the sampler on the fly. The fast families
(classical HOG, linear probe) fit on a fixed matrix and ignore both, so here they are
materialized on the training split: :func:`source_balanced_resample` (per label, every source
oversampled to the largest source's size) and :func:`add_augmented_copies` (extra copies through
:func:`training.augment.augment_pixels` with only the resolution / blur / CLAHE parts switched
on, so the comparison isolates them). ``chest_crop`` (cut a margin off every side of the prepared
image, every split) is experimental: no PreprocessConfig field carries it into a bundle yet.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from training.augment import augment_pixels
from training.config import AugmentConfig, TrainConfig, deep_merge
from training.datasets import SplitArrays
from training.robustness.config import MitigationSpec

# Training modes whose loop ignores ``augment`` and ``source_balanced_sampler`` (fitted on a fixed
# matrix). LOSO materializes those options for them; when a mode's loop starts calling
# :func:`fixed_matrix_training_split` itself, remove it here so nothing is applied twice.
MATERIALIZED_MODES = ("classical", "probe")


def mitigated_config(base: TrainConfig, mitigation: MitigationSpec, extra: dict[str, Any] | None = None) -> TrainConfig:
    """The family config with the mitigation's overrides (and run-level ``extra``) applied."""
    payload = deep_merge(base.model_dump(mode="json"), mitigation.overrides)
    payload = deep_merge(payload, extra or {})
    return TrainConfig.model_validate(payload)


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
    """Per label, oversample every source (with replacement) to the largest source's count.

    The materialized form of ``source_balanced_sampler`` for families fitted on a fixed matrix:
    the originals are all kept, the extra rows are seeded draws.
    """
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


def crop_toward_chest(pixels: np.ndarray, fraction: float) -> np.ndarray:
    """Cut ``fraction`` of each side off (N, H, W) prepared pixels and resize back to (H, W).

    Removes corners and edges (laterality markers, burnt-in text, collimation) that carry the
    hospital rather than the lungs; the lungs fill the centre of a PA radiograph.
    """
    if fraction <= 0:
        return pixels
    pixels = np.asarray(pixels)
    single = pixels.ndim == 2
    batch = pixels[None] if single else pixels
    _, height, width = batch.shape
    top, left = int(round(fraction * height)), int(round(fraction * width))
    out = np.stack([cv2.resize(np.ascontiguousarray(image[top:height - top, left:width - left]), (width, height),
                               interpolation=cv2.INTER_LINEAR) for image in batch])
    return out[0] if single else out


def fixed_matrix_training_split(split: SplitArrays, config: TrainConfig, copies: int | None = None) -> SplitArrays:
    """The training split a fixed-matrix family (classical, probe) should fit on, from the config alone.

    ``source_balanced_sampler`` -> :func:`source_balanced_resample`; ``augment.downscale_probability``
    > 0 -> ``copies`` (default 1) resolution/blur-augmented copies. With the default config (no
    sampler, no downscaling) the split comes back unchanged, so calling this from
    ``train_classical`` / ``train_linear_probe`` changes nothing until a config asks for it.
    """
    if config.source_balanced_sampler:
        split = source_balanced_resample(split, config.seed)
    copies = (1 if config.augment.downscale_probability > 0 else 0) if copies is None else copies
    if copies:
        split = add_augmented_copies(split, resolution_augment(config.augment), copies, config.seed)
    return split


def transform_split(split: SplitArrays, config: TrainConfig, mitigation: MitigationSpec) -> SplitArrays:
    """What the mitigation does to one loaded split (before the family's own training loop)."""
    if mitigation.chest_crop:
        split = take(split, np.arange(len(split.labels)), pixels=crop_toward_chest(split.pixels, mitigation.chest_crop))
    if split.name != "train" or config.mode not in MATERIALIZED_MODES:
        return split
    return fixed_matrix_training_split(split, config, mitigation.augment_copies)
