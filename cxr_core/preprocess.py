"""The one preprocessing chain: bytes -> model tensor + quality flags.

Training (through the cache), evaluation, the TorchServe handler, the triage CLI and the drift
job all call :func:`prepare_image` / :func:`preprocess`. The :class:`PreprocessConfig` travels in
every model bundle, so serving rebuilds exactly the pixels the model was validated on.

The chain is split at a uint8 array at model resolution (:class:`PreparedImage`) because that is
what the training cache stores: decoding JPEGs every epoch is the slowest step, and the cached
array plus :func:`pixels_to_tensor` must give the same tensor as the uncached path.

Lung fields (``PreprocessConfig.lung_fields``, :mod:`cxr_core.lungs`) are one more step of the same
chain, after the black-border crop: so every caller gets them, with the weights the config names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxr_core.decode import decode_grayscale
from cxr_core.errors import ImageTooSmallError

cv2.setNumThreads(1)  # deterministic and friendly to the worker processes that call us


class QualityThresholds(BaseModel):
    """Where an image stops looking like a usable radiograph. Defaults follow the audit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dark_level: int = Field(25, description="8-bit intensity at or below which a pixel counts as dark")
    bright_level: int = Field(230, description="8-bit intensity at or above which a pixel counts as bright")
    underexposed_mean: float = 50.0
    underexposed_dark_fraction: float = 0.6
    overexposed_mean: float = 205.0
    overexposed_bright_fraction: float = 0.4
    low_contrast_std: float = 40.0
    border_ratio: float = Field(0.05, description="share of the area cropped as black border to flag it")


class PreprocessConfig(BaseModel):
    """Parameters of the chain. Part of every bundle: change it and the model must be retrained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(224, ge=16, le=1024, description="square model input side, pixels")
    crop_black_border: bool = True
    border_threshold: int = Field(10, ge=0, le=254, description="8-bit level counted as black border")
    border_min_content_fraction: float = Field(
        0.05, gt=0, lt=1, description="a row/column is content if more than this share is brighter"
    )
    border_min_kept_area: float = Field(
        0.25, gt=0, le=1, description="never crop away more than this share (guards very dark images)"
    )
    clahe: bool = False
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    resize_interpolation: Literal["area", "linear"] = "area"
    normalize_mean: float = 0.5
    normalize_std: float = 0.25
    max_megapixels: float = Field(60.0, gt=0, description="refuse larger images (decompression bombs)")
    min_side: int = Field(64, ge=1, description="refuse images whose shorter side is smaller")
    quality: QualityThresholds = QualityThresholds()
    lung_fields: Literal["none", "crop", "crop_mask"] = Field(
        "none", description="crop to the lungs' box (cxr_core.lungs); crop_mask also blacks out what is not lung")
    lung_margin: float = Field(0.08, ge=0, le=0.5, description="lung box grown by this share of its side, per side")
    lung_segmenter_sha256: str | None = Field(
        None, description="sha256 of the segmenter weights; filled with the default file's when lung_fields is set")

    @model_validator(mode="before")
    @classmethod
    def _name_the_segmenter(cls, data):
        """A config that asks for lung fields names its weights, so caches and bundles know which ones."""
        if isinstance(data, dict) and data.get("lung_fields", "none") != "none" and not data.get("lung_segmenter_sha256"):
            from cxr_core.lungs import default_segmenter_sha256

            data = {**data, "lung_segmenter_sha256": default_segmenter_sha256()}
        return data

    def fingerprint(self) -> str:
        """Stable hash of the parameters, used to key caches of preprocessed pixels.

        Without lung fields the lung options are left out, so caches made before they existed stay valid.
        """
        dumped = self.model_dump(mode="json")
        if self.lung_fields == "none":
            for key in ("lung_fields", "lung_margin", "lung_segmenter_sha256"):
                dumped.pop(key)
        payload = json.dumps(dumped, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


class QualityFlags(BaseModel):
    """What monitoring and the response report about the input image itself."""

    model_config = ConfigDict(extra="forbid")

    original_width: int
    original_height: int
    aspect_ratio: float = Field(description="longer side / shorter side of the original")
    source_format: str
    bit_depth: int
    mean_intensity: float = Field(description="0-255 mean of the content region (after border crop)")
    std_intensity: float
    dark_fraction: float
    bright_fraction: float
    border_ratio: float = Field(description="share of the original area cropped as black border")
    underexposed: bool
    overexposed: bool
    low_contrast: bool
    has_border: bool
    lung_segmentation_failed: bool = Field(False, description="lung fields asked for, but the mask was refused")
    lung_failure_reason: str | None = Field(
        None, description="empty_mask, one_lung, implausible_area or outside_chest (cxr_core.lungs)")


@dataclass(frozen=True)
class PreparedImage:
    """uint8 pixels at model resolution (what the cache stores) plus the quality flags."""

    pixels: np.ndarray
    flags: QualityFlags
    crop_box: tuple[int, int, int, int]  # top, bottom (exclusive), left, right (exclusive)
    colourfulness: float = 0.0  # from the decoder; the gradability gate refuses colour photographs


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding, so 8-bit sources survive a 16-bit round trip exactly."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def find_content_box(gray: np.ndarray, config: PreprocessConfig) -> tuple[int, int, int, int]:
    """Bounding box of the non-border region: rows/columns with enough non-black pixels.

    Black frames come from scanners, letterboxing and screenshots; a model that sees them learns
    the hospital, not the lungs.
    """
    height, width = gray.shape
    full = (0, height, 0, width)
    if not config.crop_black_border:
        return full
    bright = gray > config.border_threshold
    rows = np.flatnonzero(bright.mean(axis=1) > config.border_min_content_fraction)
    cols = np.flatnonzero(bright.mean(axis=0) > config.border_min_content_fraction)
    if rows.size == 0 or cols.size == 0:
        return full
    box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    kept = (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)
    return box if kept >= config.border_min_kept_area else full


def compute_quality_flags(
    gray: np.ndarray, box: tuple[int, int, int, int], source_format: str, bit_depth: int, config: PreprocessConfig
) -> QualityFlags:
    """Exposure, contrast and border statistics from the 8-bit image and its content box."""
    thresholds = config.quality
    height, width = gray.shape
    content = gray[box[0] : box[1], box[2] : box[3]]
    mean = float(content.mean())
    std = float(content.std())
    dark = float((content <= thresholds.dark_level).mean())
    bright = float((content >= thresholds.bright_level).mean())
    border_ratio = 1.0 - (content.shape[0] * content.shape[1]) / float(height * width)
    return QualityFlags(
        original_width=width,
        original_height=height,
        aspect_ratio=round(max(width, height) / float(min(width, height)), 4),
        source_format=source_format,
        bit_depth=bit_depth,
        mean_intensity=round(mean, 3),
        std_intensity=round(std, 3),
        dark_fraction=round(dark, 4),
        bright_fraction=round(bright, 4),
        border_ratio=round(border_ratio, 4),
        underexposed=mean < thresholds.underexposed_mean or dark > thresholds.underexposed_dark_fraction,
        overexposed=mean > thresholds.overexposed_mean or bright > thresholds.overexposed_bright_fraction,
        low_contrast=std < thresholds.low_contrast_std,
        has_border=border_ratio > thresholds.border_ratio,
    )


def apply_clahe(pixels: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (standardises exposure across sites)."""
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid)).apply(pixels)


def resize_square(pixels: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    flag = cv2.INTER_AREA if interpolation == "area" else cv2.INTER_LINEAR
    if pixels.shape == (size, size):
        return pixels.copy()
    return cv2.resize(pixels, (size, size), interpolation=flag)


def prepare_gray(gray: np.ndarray, config: PreprocessConfig, source_format: str = "array", bit_depth: int = 8) -> PreparedImage:
    """8-bit grayscale array -> cropped, equalised, resized uint8 pixels + quality flags."""
    height, width = gray.shape
    if min(height, width) < config.min_side:
        raise ImageTooSmallError(
            f"the image is {width}x{height} pixels; the shorter side must be at least {config.min_side}"
        )
    box = find_content_box(gray, config)
    flags = compute_quality_flags(gray, box, source_format, bit_depth, config)
    content = gray[box[0] : box[1], box[2] : box[3]]
    lung_mask = None
    if config.lung_fields != "none":
        content, box, lung_mask, failure = crop_to_lungs(np.ascontiguousarray(content), box, config)
        if failure:
            flags = flags.model_copy(update={"lung_segmentation_failed": True, "lung_failure_reason": failure})
    if config.clahe:
        content = apply_clahe(np.ascontiguousarray(content), config.clahe_clip_limit, config.clahe_tile_grid)
    pixels = resize_square(np.ascontiguousarray(content), config.image_size, config.resize_interpolation)
    if lung_mask is not None and config.lung_fields == "crop_mask":
        size = (config.image_size, config.image_size)
        pixels[cv2.resize(lung_mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) == 0] = 0
    return PreparedImage(pixels=pixels, flags=flags, crop_box=box)


def crop_to_lungs(content: np.ndarray, box: tuple[int, int, int, int], config: PreprocessConfig
                  ) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray | None, str | None]:
    """Segment the lungs in the content region and crop to their box plus the margin.

    Returns the cropped pixels, the crop box in original coordinates, the lung mask over the crop
    and the failure reason. A refused mask leaves the content region as it was (and no mask): the
    image still gets an answer, and the quality flag lets the serving gate refuse it.
    """
    from cxr_core.lungs import expand_box, segmenter_for

    fields = segmenter_for(config.lung_segmenter_sha256 or "").segment(content)
    if not fields.ok or fields.box is None:
        return content, box, None, fields.failure
    height, width = content.shape
    top, bottom, left, right = expand_box(fields.box, config.lung_margin, height, width)
    mask = fields.mask_at(height, width)[top:bottom, left:right]
    crop_box = (box[0] + top, box[0] + bottom, box[2] + left, box[2] + right)
    return content[top:bottom, left:right], crop_box, mask, None


def prepare_image(data: bytes, config: PreprocessConfig) -> PreparedImage:
    """Bytes (JPEG, PNG, BMP, TIFF, DICOM) -> :class:`PreparedImage`. Raises InputError subclasses."""
    decoded = decode_grayscale(data, config.max_megapixels)
    prepared = prepare_gray(to_uint8(decoded.pixels), config, decoded.source_format, decoded.bit_depth)
    return replace(prepared, colourfulness=decoded.colourfulness)


def pixels_to_tensor(pixels: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """uint8 HxW (or NxHxW) -> normalised float tensor 1xHxW (or Nx1xHxW)."""
    array = pixels.astype(np.float32) / 255.0
    array = (array - config.normalize_mean) / config.normalize_std
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(-3)


def preprocess(data: bytes, config: PreprocessConfig) -> tuple[torch.Tensor, QualityFlags]:
    """The full chain used at inference: bytes -> (1xHxW tensor, quality flags)."""
    prepared = prepare_image(data, config)
    return pixels_to_tensor(prepared.pixels, config), prepared.flags
