"""Grad-CAM / Grad-CAM++ of the decided class, mapped onto the input image, and lung-zone shares."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr_core.bundle import Predictor, load_bundle
from cxr_core.explain import (
    LUNG_ZONES,
    ExplanationUnavailableError,
    ZoneConfig,
    central_chest_box,
    explain_image,
    lung_zone_shares,
)
from tests.imaging import dicom_bytes, gray_of


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def not_square(data_dir):
    for path in sorted((data_dir / "test").glob("*/*.jpg")):
        with Image.open(path) as image:
            if image.width != image.height:
                return path
    pytest.skip("no non-square test image in the default data")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_explanation_of_the_decided_class_at_the_input_size(predictor, not_square, method):
    data = not_square.read_bytes()
    with Image.open(not_square) as original:
        width, height = original.size
    prediction, explanation = explain_image(predictor, data, method)
    assert prediction.decision == predictor.predict_bytes(data).decision
    assert explanation.target_class == prediction.decision.label and explanation.method == method
    assert explanation.heatmap.shape == (height, width)
    assert explanation.heatmap.min() >= 0 and explanation.heatmap.max() <= 1 and explanation.heatmap.max() > 0
    with Image.open(io.BytesIO(explanation.overlay_png)) as overlay:
        overlay.load()
        assert overlay.size == (width, height) and overlay.mode == "RGB"
    shares = explanation.shares
    assert set(shares.zones) == set(LUNG_ZONES)
    assert sum(shares.zones.values()) + shares.outside_chest == pytest.approx(1.0, abs=2e-3)
    assert shares.shortcut_warning == (shares.outside_chest >= ZoneConfig().shortcut_share)


def test_any_class_can_be_explained_and_dicom_too(predictor, data_dir):
    path = sorted((data_dir / "test" / "normal").glob("*.jpg"))[0]
    gray = gray_of(path)
    for data in (path.read_bytes(), dicom_bytes(gray)):
        _, explanation = explain_image(predictor, data, "gradcam", target_class="normal")
        assert explanation.target_class == "normal" and explanation.heatmap.shape == gray.shape
    with pytest.raises(ValueError, match="unknown class"):
        explain_image(predictor, path.read_bytes(), target_class="fracture")


def test_lung_zone_shares_follow_the_heat():
    height, width = 200, 100
    crop = (0, height, 0, width)
    top, bottom, left, right = central_chest_box(crop, ZoneConfig())
    heat = np.zeros((height, width), dtype=np.float32)
    heat[top + 2: top + 20, left + 2: left + 20] = 1.0  # upper part of the image's left half
    shares = lung_zone_shares(heat, crop)
    assert shares.zones["upper_left"] == pytest.approx(1.0) and shares.outside_chest == pytest.approx(0.0)
    assert not shares.shortcut_warning

    corners = np.zeros_like(heat)
    corners[:5, :] = 1.0  # a burnt-in text line along the top border
    corners[-5:, -10:] = 1.0  # a marker in a corner
    shares = lung_zone_shares(corners, crop)
    assert shares.outside_chest == pytest.approx(1.0) and shares.shortcut_warning

    uniform = lung_zone_shares(np.ones_like(heat), crop)
    assert uniform.outside_chest == pytest.approx(1 - 0.8 * 0.9, abs=0.02) and not uniform.shortcut_warning
    assert min(uniform.zones.values()) > 0.1

    empty = lung_zone_shares(np.zeros_like(heat), crop)
    assert empty.empty_heatmap and empty.outside_chest == 0 and not empty.shortcut_warning


def test_black_border_is_outside_the_chest(predictor):
    """Heat mapped back through the border crop lands where the content was, never on the frame."""
    from cxr_core.explain import heatmap_on_original

    small = np.ones((8, 8), dtype=np.float32)
    full = heatmap_on_original(small, (10, 90, 20, 60), width=80, height=100)
    assert full.shape == (100, 80)
    assert full[:10].sum() == 0 and full[:, :20].sum() == 0 and full[10:90, 20:60].min() == pytest.approx(1.0)


def test_hog_bundles_have_no_explanations(predictor, sample_image):
    hog = Predictor(manifest=predictor.manifest.model_copy(
        update={"model": predictor.manifest.model.model_copy(update={"kind": "sklearn_hog", "name": "hog_logreg"})}),
        model=object())
    with pytest.raises(ExplanationUnavailableError, match="explanations not available for this model family"):
        explain_image(hog, sample_image.read_bytes())


def test_explain_cli_writes_the_overlay(tiny_bundle, not_square, tmp_path, capsys):
    from serving.explain import main

    out = tmp_path / "overlay.png"
    main([str(not_square), "--bundle", str(tiny_bundle), "--out", str(out), "--method", "gradcam++"])
    with Image.open(out) as overlay, Image.open(not_square) as original:
        assert overlay.size == original.size
    printed = capsys.readouterr().out
    assert "gradcam++" in printed and "upper_left" in printed and "outside chest" in printed
