"""Shortcut mitigations as configuration, and the split transform LOSO applies for them.

A mitigation (:class:`training.robustness.config.MitigationSpec`) is a set of ordinary
TrainConfig overrides, so the winner becomes the default by a config change (it did: the family
configs carry CLAHE + resolution/blur augmentation + source-balanced sampling, see
``configs/robustness.yaml``):

- ``preprocess.clahe`` — CLAHE on every image (train, test, serving): exposure standardised;
- ``augment.downscale_probability`` / ``augment.blur_probability`` — resolution and blur
  augmentation (hides the resolution cue: Kermany images were squashed to 224 px, many Kaggle
  TB images are small);
- ``source_balanced_sampler`` — every (source, label) group weighs the same.

Every training mode honours them itself (fixed-matrix families through
:mod:`training.materialize`), so nothing is materialized here. ``chest_crop`` (cut a margin off
every side of the prepared image, every split) is experimental: no PreprocessConfig field carries
it into a bundle yet, so LOSO applies it to the loaded splits.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from cxr_core.config import deep_merge
from training.config import TrainConfig
from training.datasets import SplitArrays
from training.materialize import take
from training.robustness.config import MitigationSpec


def mitigated_config(base: TrainConfig, mitigation: MitigationSpec, extra: dict[str, Any] | None = None) -> TrainConfig:
    """The family config with the mitigation's overrides (and run-level ``extra``) applied."""
    payload = deep_merge(base.model_dump(mode="json"), mitigation.overrides)
    payload = deep_merge(payload, extra or {})
    return TrainConfig.model_validate(payload)


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


def transform_split(split: SplitArrays, config: TrainConfig, mitigation: MitigationSpec) -> SplitArrays:
    """What the mitigation does to one loaded split (before the family's own training loop)."""
    if mitigation.chest_crop:
        split = take(split, np.arange(len(split.labels)), pixels=crop_toward_chest(split.pixels, mitigation.chest_crop))
    return split
