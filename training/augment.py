"""Augmentation of prepared uint8 pixels (the cache's format), training split only.

Works on numpy arrays so it runs after the cache and before :func:`pixels_to_tensor`: the
tensor path stays the one serving uses.
"""

from __future__ import annotations

import cv2
import numpy as np

from cxr_core.preprocess import apply_clahe
from training.config import AugmentConfig


def augment_pixels(pixels: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Return an augmented copy of one (H, W) uint8 image."""
    image = pixels
    height, width = image.shape
    if config.clahe_probability and rng.random() < config.clahe_probability:
        image = apply_clahe(np.ascontiguousarray(image), 2.0, 8)
    if config.downscale_probability and rng.random() < config.downscale_probability:
        factor = rng.uniform(config.downscale_min, 1.0)
        small = cv2.resize(image, (max(8, int(width * factor)), max(8, int(height * factor))), interpolation=cv2.INTER_AREA)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    if config.hflip and rng.random() < config.hflip:
        image = image[:, ::-1]
    if config.rotation_degrees:
        angle = rng.uniform(-config.rotation_degrees, config.rotation_degrees)
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (width, height),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if config.blur_probability and rng.random() < config.blur_probability:
        image = cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), config.blur_sigma)
    if config.brightness or config.contrast:
        values = image.astype(np.float32)
        scale = 1.0 + rng.uniform(-config.contrast, config.contrast)
        shift = rng.uniform(-config.brightness, config.brightness) * 255.0
        mean = float(values.mean())
        image = np.clip((values - mean) * scale + mean + shift, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)
