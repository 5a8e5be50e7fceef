"""Explanations: where the model looked for the class it decided, and whether that was the chest.

Grad-CAM (Selvaraju et al., 2017) and Grad-CAM++ (Chattopadhay et al., 2018), computed by the
maintained ``pytorch-grad-cam`` library on the last convolutional feature map that
:func:`cxr_core.models.gradcam_target_layer` names for every family. The heatmap is computed on
the model's input (the border-cropped, resized radiograph) and mapped back onto the original
image, so the overlay, the lung-zone shares and the shortcut warning refer to the pixels the
caller sent.

Lung zones split the *central chest region* of the content box (the image without its black
border) into upper / middle / lower x left / right, left and right as seen on the image (for a
standard PA display the image's left is the patient's right). Heat outside the central chest
region (borders, corners, burnt-in text, laterality markers) is reported on its own: a model that
looks there has likely learned a shortcut, not the disease, and ``shortcut_warning`` says so.
HOG models have no feature maps: asking them for an explanation raises
:class:`ExplanationUnavailableError`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cxr_core.bundle import Prediction, Predictor
from cxr_core.decode import decode_grayscale
from cxr_core.models import gradcam_target_layer
from cxr_core.preprocess import PreparedImage, pixels_to_tensor, prepare_image, to_uint8

ExplainMethod = Literal["gradcam", "gradcam++"]
EXPLAIN_METHODS: tuple[str, ...] = ("gradcam", "gradcam++")
LUNG_ZONES = ("upper_left", "upper_right", "middle_left", "middle_right", "lower_left", "lower_right")


class ExplanationUnavailableError(ValueError):
    """The bundle's model family has no feature maps to explain (HOG + scikit-learn)."""

    code = "explanations_unavailable"


class ZoneConfig(BaseModel):
    """Where the central chest region lies inside the content box, as fractions of its sides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    left: float = Field(0.10, ge=0, lt=0.5)
    right: float = Field(0.90, gt=0.5, le=1)
    top: float = Field(0.05, ge=0, lt=0.5)
    bottom: float = Field(0.95, gt=0.5, le=1)
    shortcut_share: float = Field(
        0.40, gt=0, le=1,
        description="warn when at least this share of the heat lies outside the central chest region "
                    "(a uniform heatmap puts about 0.28 there with the default region)",
    )


class ZoneShares(BaseModel):
    """Share of the heatmap's total mass in each lung zone and outside the central chest region."""

    zones: dict[str, float] = Field(description="upper/middle/lower x left/right of the central chest region")
    outside_chest: float = Field(description="share outside the central chest region (borders, text, markers)")
    shortcut_warning: bool
    empty_heatmap: bool = Field(False, description="the heatmap is zero everywhere: shares are all 0")


@dataclass(frozen=True)
class Explanation:
    method: str
    target_class: str
    target_index: int
    heatmap: np.ndarray  # float32 in [0, 1] at the original image size (H x W)
    shares: ZoneShares
    overlay_png: bytes  # RGB overlay of the heatmap on the original image, original size

    @property
    def overlay_png_base64(self) -> str:
        return base64.b64encode(self.overlay_png).decode("ascii")

    @property
    def width(self) -> int:
        return int(self.heatmap.shape[1])

    @property
    def height(self) -> int:
        return int(self.heatmap.shape[0])


def _reshape_transform(model: torch.nn.Module):
    """Token or channels-last feature maps (Swin) -> NCHW, as pytorch-grad-cam expects."""
    channels = getattr(model, "num_features", None)

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 3:  # (B, tokens, C)
            side = int(round(tensor.shape[1] ** 0.5))
            tensor = tensor.reshape(tensor.shape[0], side, side, tensor.shape[2])
            return tensor.permute(0, 3, 1, 2)
        if tensor.ndim == 4 and channels and tensor.shape[-1] == channels and tensor.shape[1] != channels:
            return tensor.permute(0, 3, 1, 2)
        return tensor

    return transform


def cam_heatmap(model: torch.nn.Module, tensor: torch.Tensor, class_index: int,
                method: ExplainMethod = "gradcam") -> np.ndarray:
    """(1, 1, h, w) model input -> (h, w) float32 heatmap in [0, 1] for ``class_index``."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in EXPLAIN_METHODS:
        raise ValueError(f"unknown explanation method {method!r}; use one of {', '.join(EXPLAIN_METHODS)}")
    cam_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
    model.eval()
    with torch.inference_mode(False), torch.enable_grad():
        cam = cam_class(model=model, target_layers=[gradcam_target_layer(model)],
                        reshape_transform=_reshape_transform(model))
        try:  # not the context manager: its __exit__ swallows IndexError
            heat = cam(input_tensor=tensor.clone(), targets=[ClassifierOutputTarget(int(class_index))])
        finally:
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)
    heat = np.nan_to_num(np.asarray(heat[0], dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(heat, 0.0, 1.0)


def heatmap_on_original(heatmap: np.ndarray, crop_box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Model-resolution heatmap of the cropped content -> original-size canvas (zero on the border)."""
    top, bottom, left, right = crop_box
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top:bottom, left:right] = cv2.resize(heatmap.astype(np.float32), (right - left, bottom - top),
                                                interpolation=cv2.INTER_LINEAR)
    return np.clip(canvas, 0.0, 1.0)


def central_chest_box(crop_box: tuple[int, int, int, int], zones: ZoneConfig) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the central chest region inside the content box."""
    top, bottom, left, right = crop_box
    height, width = bottom - top, right - left
    return (top + int(round(zones.top * height)), top + int(round(zones.bottom * height)),
            left + int(round(zones.left * width)), left + int(round(zones.right * width)))


def lung_zone_shares(heatmap: np.ndarray, crop_box: tuple[int, int, int, int],
                     zones: ZoneConfig = ZoneConfig()) -> ZoneShares:
    """Heat share per lung zone (3 rows x 2 columns of the central chest region) and outside it."""
    total = float(heatmap.sum())
    if total <= 0.0:
        return ZoneShares(zones={name: 0.0 for name in LUNG_ZONES}, outside_chest=0.0,
                          shortcut_warning=False, empty_heatmap=True)
    top, bottom, left, right = central_chest_box(crop_box, zones)
    rows = np.linspace(top, bottom, 4).round().astype(int)
    middle = int(round((left + right) / 2))
    shares: dict[str, float] = {}
    inside = 0.0
    for row_name, (start, stop) in zip(("upper", "middle", "lower"), zip(rows[:-1], rows[1:])):
        for side, (col_start, col_stop) in (("left", (left, middle)), ("right", (middle, right))):
            mass = float(heatmap[start:stop, col_start:col_stop].sum())
            shares[f"{row_name}_{side}"] = round(mass / total, 4)
            inside += mass
    outside = round(max(0.0, 1.0 - inside / total), 4)
    return ZoneShares(zones=shares, outside_chest=outside, shortcut_warning=outside >= zones.shortcut_share)


def overlay_png(gray: np.ndarray, heatmap: np.ndarray, strength: float = 0.5) -> bytes:
    """Jet-coloured heatmap blended onto the grayscale radiograph (both H x W) -> PNG bytes."""
    heat8 = to_uint8(heatmap)
    colour = cv2.applyColorMap(heat8, cv2.COLORMAP_JET).astype(np.float32)  # BGR
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).astype(np.float32)
    weight = (strength * heatmap.astype(np.float32))[..., None]
    blended = np.clip(base * (1.0 - weight) + colour * weight, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("PNG encoding of the overlay failed")
    return encoded.tobytes()


def require_explainable(predictor: Predictor) -> torch.nn.Module:
    """The bundle's torch model, or :class:`ExplanationUnavailableError` for HOG families."""
    if predictor.torch_model is None:
        raise ExplanationUnavailableError(
            f"explanations not available for this model family ({predictor.manifest.model.name}: "
            "HOG features have no convolutional feature maps for Grad-CAM)"
        )
    return predictor.torch_model


def explain_prepared(predictor: Predictor, data: bytes, prepared: PreparedImage, prediction: Prediction,
                     method: ExplainMethod = "gradcam", target_class: str | None = None,
                     zones: ZoneConfig = ZoneConfig()) -> Explanation:
    """Explanation of an already prepared and predicted image (what serving calls after a batch)."""
    model = require_explainable(predictor)
    label = target_class or prediction.decision.label
    if label not in predictor.classes:
        raise ValueError(f"unknown class {label!r}; the model's classes are {predictor.classes}")
    index = predictor.classes.index(label)
    tensor = pixels_to_tensor(prepared.pixels, predictor.manifest.preprocess)[None]  # 1 x 1 x h x w
    small = cam_heatmap(model, tensor, index, method)
    width, height = prepared.flags.original_width, prepared.flags.original_height
    heatmap = heatmap_on_original(small, prepared.crop_box, width, height)
    gray = to_uint8(decode_grayscale(data, predictor.manifest.preprocess.max_megapixels).pixels)
    return Explanation(method=method, target_class=label, target_index=index, heatmap=heatmap,
                       shares=lung_zone_shares(heatmap, prepared.crop_box, zones),
                       overlay_png=overlay_png(gray, heatmap))


def explain_image(predictor: Predictor, data: bytes, method: ExplainMethod = "gradcam",
                  target_class: str | None = None, zones: ZoneConfig = ZoneConfig()) -> tuple[Prediction, Explanation]:
    """Bytes -> (prediction, explanation of the decided class, or of ``target_class``).

    Raises :class:`cxr_core.errors.InputError` for bad bytes and
    :class:`ExplanationUnavailableError` for model families without feature maps.
    """
    require_explainable(predictor)
    prepared = prepare_image(data, predictor.manifest.preprocess)
    prediction = predictor.predict_prepared(prepared.pixels[None], [prepared.flags])[0]
    return prediction, explain_prepared(predictor, data, prepared, prediction, method, target_class, zones)
