"""Lung fields: a small U-Net segmenter, mask post-processing, and a verdict on the mask.

Why: a classifier that sees the whole radiograph learns the hospital (markers, text, collimation,
body size) as readily as the lungs. Cropping to the lungs' box (optionally masking everything
else) is done inside the shared preprocessing chain (:mod:`cxr_core.preprocess`), so training,
serving, triage and drift all apply the identical step with the identical weights.

Weights are identified by the sha256 of their file. A :class:`~cxr_core.preprocess.PreprocessConfig`
that uses lung fields names that sha256; :func:`segmenter_for` resolves it from segmenters already
loaded in this process (every bundle registers the copy it carries), from ``$CXR_LUNG_SEGMENTER``,
or from the default committed file ``models/lungs/segmenter.pt``. Nothing is downloaded.

The verdict (:class:`LungFields.failure`) is what a serving gate can refuse on: ``empty_mask`` (no
lung found), ``one_lung`` (a second lung missing or tiny), ``implausible_area`` (the lungs cover too
little or too much of the image), ``outside_chest`` (the two regions are not side by side in the
middle of the image).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from torch import nn

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "lungs" / "segmenter.pt"
WEIGHTS_ENV = "CXR_LUNG_SEGMENTER"
FailureReason = Literal["empty_mask", "one_lung", "implausible_area", "outside_chest"]
FAILURE_REASONS: tuple[str, ...] = ("empty_mask", "one_lung", "implausible_area", "outside_chest")


class LungSegmenterMissingError(RuntimeError):
    """The preprocessing config names segmenter weights that this process cannot find."""


class LungRules(BaseModel):
    """When a post-processed mask counts as two plausible lungs (fractions of the segmented image).

    Set so that every hand-drawn mask of ``../shared/data/lung-masks`` passes (checked by
    ``make train-lungs``, reported as ``ground_truth_failures``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(0.5, gt=0, lt=1, description="probability above which a pixel is lung")
    min_lung_area: float = Field(0.01, gt=0, description="smallest region counted as a lung")
    min_second_ratio: float = Field(0.2, gt=0, le=1, description="second lung / first lung area, at least")
    min_total_area: float = Field(0.06, gt=0, description="both lungs together, at least")
    max_total_area: float = Field(0.7, gt=0, le=1, description="both lungs together, at most")
    min_separation: float = Field(0.12, ge=0, description="horizontal distance of the two lungs' centroids")
    min_vertical_overlap: float = Field(0.3, ge=0, le=1, description="shared height / the shorter lung's height")
    centre_band: tuple[float, float] = Field((0.2, 0.8), description="where the lungs' box centre must lie")


@dataclass(frozen=True)
class LungFields:
    """The segmenter's answer for one image.

    ``mask`` is boolean at the segmenter's resolution, covering the whole input image (resize it
    with :meth:`mask_at`). ``box`` is (top, bottom, left, right), exclusive ends, in input pixels,
    without margin; None when the segmentation failed. ``lung_areas`` are the kept regions' shares
    of the image, largest first. ``failure`` is None for a usable segmentation.
    """

    mask: np.ndarray
    box: tuple[int, int, int, int] | None
    lung_areas: tuple[float, ...]
    failure: FailureReason | None
    input_shape: tuple[int, int]

    @property
    def ok(self) -> bool:
        return self.failure is None

    def mask_at(self, height: int, width: int) -> np.ndarray:
        """The mask resized (nearest neighbour) to ``height`` x ``width``."""
        return cv2.resize(self.mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


class _Block(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class LungUNet(nn.Module):
    """A four-level U-Net (Ronneberger et al. 2015) with few channels: lungs are large, smooth shapes.

    1-channel standardised input (side divisible by 8) -> 1-channel lung logits, same size.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64)):
        super().__init__()
        self.channels = tuple(channels)
        self.down = nn.ModuleList()
        previous = 1
        for width in self.channels:
            self.down.append(_Block(previous, width))
            previous = width
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for width in reversed(self.channels[:-1]):
            self.up.append(nn.ConvTranspose2d(previous, width, 2, stride=2))
            self.fuse.append(_Block(2 * width, width))
            previous = width
        self.head = nn.Conv2d(previous, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.down):
            x = block(x)
            if index < len(self.down) - 1:
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def standardize(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW -> float32 size x size, zero mean and unit variance (exposure-independent input)."""
    small = cv2.resize(np.ascontiguousarray(gray), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (small - small.mean()) / max(float(small.std()), 1.0)


def postprocess(probability: np.ndarray, rules: LungRules = LungRules()) -> tuple[np.ndarray, tuple[float, ...], list[np.ndarray]]:
    """Threshold, keep the two largest connected regions, fill their holes.

    Returns the cleaned boolean mask, the kept regions' area shares (largest first) and the
    regions themselves. Why: a lung segmenter's stray blobs (bowel gas, shoulders) and holes
    (cavities, consolidation the net has not seen) would move the box; two lungs is the anatomy.
    """
    binary = probability > rules.threshold
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    order = sorted(range(1, count), key=lambda k: -stats[k, cv2.CC_STAT_AREA])[:2]
    regions = [ndimage.binary_fill_holes(labels == k) for k in order]
    total = float(binary.size)
    mask = np.zeros_like(binary)
    for region in regions:
        mask |= region
    return mask, tuple(round(float(r.sum()) / total, 5) for r in regions), regions


def judge(regions: list[np.ndarray], areas: tuple[float, ...], rules: LungRules = LungRules()) -> FailureReason | None:
    """The failure reason of a post-processed mask, or None if it looks like two lungs."""
    if not areas or areas[0] < rules.min_lung_area:
        return "empty_mask"
    if len(areas) < 2 or areas[1] < rules.min_lung_area or areas[1] < rules.min_second_ratio * areas[0]:
        return "one_lung"
    total = areas[0] + areas[1]
    if not rules.min_total_area <= total <= rules.max_total_area:
        return "implausible_area"
    height, width = regions[0].shape
    boxes = [_region_box(r) for r in regions]
    centres_x = [float(np.flatnonzero(r.any(axis=0)).mean()) / width for r in regions]
    overlap = min(boxes[0][1], boxes[1][1]) - max(boxes[0][0], boxes[1][0])
    shorter = min(boxes[0][1] - boxes[0][0], boxes[1][1] - boxes[1][0])
    union = _union_box(boxes)
    centre = ((union[0] + union[1]) / 2 / height, (union[2] + union[3]) / 2 / width)
    low, high = rules.centre_band
    if (abs(centres_x[0] - centres_x[1]) < rules.min_separation or overlap < rules.min_vertical_overlap * shorter
            or not all(low <= c <= high for c in centre)):
        return "outside_chest"
    return None


def _region_box(region: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _union_box(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    return min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes)


class LungSegmenter:
    """A loaded segmenter: weights + input size + the sha256 of the file it came from."""

    def __init__(self, model: LungUNet, size: int, sha256: str, source: Path | None = None,
                 rules: LungRules = LungRules(), metadata: dict[str, Any] | None = None):
        self.model = model.eval()
        self.forward = _onnx_forward(self.model, size)  # None: PyTorch (onnxruntime not installed)
        self.size = size
        self.sha256 = sha256
        self.source = source
        self.rules = rules
        self.metadata = metadata or {}
        self._lock = threading.Lock()  # handler threads may share one instance

    @classmethod
    def from_file(cls, path: Path | str) -> "LungSegmenter":
        path = Path(path)
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = LungUNet(tuple(payload["channels"]))
        model.load_state_dict(payload["state_dict"])
        return cls(model, int(payload["size"]), file_sha256(path), path, metadata=payload.get("metadata", {}))

    def save(self, path: Path | str, metadata: dict[str, Any] | None = None) -> str:
        """Write the weights file; returns its sha256 (the identity configs refer to)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": self.model.state_dict(), "channels": list(self.model.channels), "size": self.size,
                    "metadata": metadata or {}}, path)
        return file_sha256(path)

    def probability(self, gray: np.ndarray) -> np.ndarray:
        """uint8 HxW -> lung probability at size x size."""
        tensor = torch.from_numpy(standardize(gray, self.size))[None, None]
        if self.forward is not None:
            logits = torch.from_numpy(self.forward(tensor)[0])
            return torch.sigmoid(logits)[0, 0].numpy()
        with self._lock, torch.inference_mode():
            return torch.sigmoid(self.model(tensor))[0, 0].numpy()

    def segment(self, gray: np.ndarray) -> LungFields:
        """uint8 HxW (the content region of a radiograph) -> :class:`LungFields`."""
        return fields_from_probability(self.probability(gray), gray.shape, self.rules)


def _onnx_forward(model: LungUNet, size: int):
    """The segmenter in ONNX Runtime wherever it is installed (half the time of PyTorch eager on a
    2-core CPU, cxr_core.runtime): training's crops, serving and the drift job all take this path,
    so the lung step stays identical everywhere."""
    from cxr_core.runtime import OnnxForward, onnxruntime_available

    if not onnxruntime_available():
        return None
    return OnnxForward.export(model, torch.zeros(1, 1, size, size), ["logits"])


def fields_from_probability(probability: np.ndarray, input_shape: tuple[int, int],
                            rules: LungRules = LungRules()) -> LungFields:
    """Post-process and judge a probability map that covers an image of ``input_shape``."""
    mask, areas, regions = postprocess(probability, rules)
    failure = judge(regions, areas, rules)
    box = None
    if failure is None:
        size_y, size_x = mask.shape
        top, bottom, left, right = _union_box([_region_box(r) for r in regions])
        height, width = input_shape
        box = (int(np.floor(top * height / size_y)), int(np.ceil(bottom * height / size_y)),
               int(np.floor(left * width / size_x)), int(np.ceil(right * width / size_x)))
    return LungFields(mask=mask, box=box, lung_areas=areas, failure=failure, input_shape=tuple(input_shape))


def expand_box(box: tuple[int, int, int, int], margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """Grow a (top, bottom, left, right) box by ``margin`` of its height/width per side, clipped."""
    top, bottom, left, right = box
    dy, dx = int(round(margin * (bottom - top))), int(round(margin * (right - left)))
    return max(0, top - dy), min(height, bottom + dy), max(0, left - dx), min(width, right + dx)


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_LOADED: dict[str, LungSegmenter] = {}
_REGISTRY_LOCK = threading.Lock()


def register_segmenter(segmenter: LungSegmenter) -> LungSegmenter:
    """Make ``segmenter`` the one this process uses for configs naming its sha256."""
    with _REGISTRY_LOCK:
        return _LOADED.setdefault(segmenter.sha256, segmenter)


def load_segmenter_file(path: Path | str, expected_sha256: str | None = None) -> LungSegmenter:
    """Load and register a weights file, refusing it if its sha256 is not the expected one."""
    sha = file_sha256(path)
    if expected_sha256 and sha != expected_sha256:
        raise LungSegmenterMissingError(f"lung segmenter {path} has sha256 {sha[:12]}..., expected "
                                        f"{expected_sha256[:12]}...")
    with _REGISTRY_LOCK:
        if sha in _LOADED:
            return _LOADED[sha]
    return register_segmenter(LungSegmenter.from_file(path))


def _candidate_files() -> list[Path]:
    candidates = [Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []
    return candidates + [DEFAULT_WEIGHTS]


def segmenter_for(sha256: str) -> LungSegmenter:
    """The loaded segmenter with these weights (a bundle's copy, ``$CXR_LUNG_SEGMENTER`` or the default)."""
    with _REGISTRY_LOCK:
        if sha256 in _LOADED:
            return _LOADED[sha256]
    for path in _candidate_files():
        if path.exists() and _cached_sha(str(path), path.stat().st_mtime_ns) == sha256:
            return load_segmenter_file(path, sha256)
    raise LungSegmenterMissingError(
        f"no lung segmenter with sha256 {sha256[:12]}... is loaded: load the bundle that carries it "
        f"(load_bundle), set {WEIGHTS_ENV}=<weights file>, or retrain with `make train-lungs`")


@lru_cache(maxsize=16)
def _cached_sha(path: str, mtime_ns: int) -> str:
    return file_sha256(path)


def default_segmenter_sha256() -> str:
    """sha256 of the segmenter a config gets when it asks for lung fields without naming weights."""
    for path in _candidate_files():
        if path.exists():
            return _cached_sha(str(path), path.stat().st_mtime_ns)
    raise LungSegmenterMissingError(f"lung fields need segmenter weights: {DEFAULT_WEIGHTS} is missing "
                                    f"(run `make train-lungs`, or set {WEIGHTS_ENV})")
