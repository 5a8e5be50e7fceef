"""Acquisition shifts applied to real radiographs: what a new scanner, site or export step does.

The drift demo and the tests replay real images through a bundle after one of these, to show that
the drift job sees the change in the features it should (and decides ``retrain``):

- ``darken``: under-exposure / a different detector gain -> ``mean_intensity``, ``dark_fraction``;
- ``black_border``: a letterboxing export or scanner frame -> ``border_ratio`` (and the size);
- ``reduce_contrast``: a flat windowing preset -> ``std_intensity``.

:func:`overconfident` acts on a logged feature row instead: it sharpens the class probabilities,
as a lost temperature scaling would, for the calibration (ECE) scenario.

Each takes and returns encoded image bytes (JPEG at quality 90, like the default dataset), so the
shifted image goes through the same decoding and preprocessing as a served request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

JPEG_QUALITY = 90


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("not an image OpenCV can decode")
    return image


def _encode(gray: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", np.clip(gray, 0, 255).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()


def darken(data: bytes, factor: float = 0.6) -> bytes:
    """Scale every pixel by ``factor`` (< 1): an under-exposed acquisition."""
    return _encode(np.rint(_decode(data).astype(np.float32) * factor))


def black_border(data: bytes, fraction: float = 0.1) -> bytes:
    """Pad ``fraction`` of each side with black: a letterboxed export or a scanner frame."""
    gray = _decode(data)
    pad_y, pad_x = (max(1, int(round(side * fraction))) for side in gray.shape)
    return _encode(cv2.copyMakeBorder(gray, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_CONSTANT, value=0))


def reduce_contrast(data: bytes, factor: float = 0.5) -> bytes:
    """Pull every pixel towards the image mean by ``factor`` (< 1): a flat window/level."""
    gray = _decode(data).astype(np.float32)
    mean = float(gray.mean())
    return _encode(np.rint(mean + (gray - mean) * factor))


SHIFTS: dict[str, Callable[[bytes], bytes]] = {
    "darkened": darken,
    "black_border": black_border,
    "low_contrast": reduce_contrast,
}
# The image features each shift moves by construction (the drift job must see these).
AFFECTED_FEATURES: dict[str, tuple[str, ...]] = {
    "darkened": ("mean_intensity", "dark_fraction"),
    "black_border": ("border_ratio",),
    "low_contrast": ("std_intensity",),
}


def overconfident(row: dict[str, Any], sharpness: float = 10.0) -> dict[str, Any]:
    """A feature row whose class probabilities are sharpened: ``p_k ∝ p_k ** sharpness``.

    The same as dividing the bundle's temperature by ``sharpness``: what serving logs when the
    fitted calibration is lost or a new model is over-confident. The argmax (and the logged
    decision) is unchanged; ``confidence`` follows the new probabilities.
    """
    if sharpness <= 0:
        raise ValueError("sharpness must be positive")
    columns = [c for c in row if c.startswith("p_")]
    if not columns:
        raise ValueError("the row has no p_<class> columns")
    logs = np.log(np.clip(np.array([float(row[c]) for c in columns]), 1e-12, 1.0)) * sharpness
    probs = np.exp(logs - logs.max())
    probs /= probs.sum()
    sharpened = dict(row)
    sharpened.update({c: round(float(p), 6) for c, p in zip(columns, probs)})
    sharpened["confidence"] = round(float(probs.max()), 6)
    return sharpened
