"""HOG features for the classical model family (HOG + logistic regression / MLP / random forest).

In the shared core because serving must compute exactly the features the classifier was fitted on.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from skimage.feature import hog


class HogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    orientations: int = Field(9, ge=2)
    pixels_per_cell: int = Field(16, ge=4)
    cells_per_block: int = Field(2, ge=1)


def hog_features(pixels: np.ndarray, config: HogConfig) -> np.ndarray:
    """(N, H, W) uint8 prepared pixels -> (N, F) float32 HOG descriptors."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    rows = [
        hog(
            image,
            orientations=config.orientations,
            pixels_per_cell=(config.pixels_per_cell, config.pixels_per_cell),
            cells_per_block=(config.cells_per_block, config.cells_per_block),
            block_norm="L2-Hys",
            feature_vector=True,
        )
        for image in pixels
    ]
    return np.asarray(rows, dtype=np.float32)
