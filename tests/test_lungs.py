"""Lung fields: the committed segmenter on real cxr3 images, the chain's lung crop, bundles, training."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch

from cxr_core import lungs
from cxr_core.bundle import LUNG_WEIGHTS, load_bundle, read_manifest
from cxr_core.hog import hog_features
from cxr_core.lungs import DEFAULT_WEIGHTS, LungRules, fields_from_probability, file_sha256, load_segmenter_file
from cxr_core.preprocess import PreprocessConfig, pixels_to_tensor, prepare_gray, prepare_image
from training.config import TrainConfig
from training.lungs_check import content_of

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="models/lungs/segmenter.pt missing")


def _blob(canvas: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> None:
    yy, xx = np.mgrid[: canvas.shape[0], : canvas.shape[1]]
    canvas[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1.0


def test_postprocess_keeps_two_lungs_fills_holes_and_judges():
    probability = np.zeros((128, 128), dtype=np.float32)
    _blob(probability, 64, 40, 36, 16)
    _blob(probability, 64, 88, 36, 16)
    _blob(probability, 120, 120, 3, 3)  # a stray blob: dropped
    probability[60:66, 38:42] = 0.0  # a hole (a cavity the net missed): filled
    fields = fields_from_probability(probability, (256, 512))
    assert fields.ok and len(fields.lung_areas) == 2
    assert fields.mask[62, 40] and not fields.mask[120, 120]
    top, bottom, left, right = fields.box
    assert (top, bottom) == (28 * 2, 101 * 2) and (left, right) == (24 * 4, 105 * 4)

    one = np.zeros_like(probability)
    _blob(one, 64, 40, 36, 16)
    assert fields_from_probability(one, (128, 128)).failure == "one_lung"
    assert fields_from_probability(np.zeros_like(probability), (128, 128)).failure == "empty_mask"
    stacked = np.zeros_like(probability)
    _blob(stacked, 30, 64, 14, 30)
    _blob(stacked, 95, 64, 14, 30)
    assert fields_from_probability(stacked, (128, 128)).failure == "outside_chest"
    huge = np.ones_like(probability)
    huge[:, 62:66] = 0
    assert fields_from_probability(huge, (128, 128)).failure == "implausible_area"


def _images_per_group(data_dir, manifest_rows, per_group: int):
    groups = defaultdict(list)
    for row in manifest_rows:
        if row["split"] == "test" and len(groups[(row["source_dataset"], row["label"])]) < per_group:
            groups[(row["source_dataset"], row["label"])].append(data_dir / "test" / row["label"] / f"{row['id']}.jpg")
    return groups


def test_real_segmenter_finds_two_lungs_on_every_source_and_class(data_dir, manifest_rows):
    segmenter = load_segmenter_file(DEFAULT_WEIGHTS)
    groups = _images_per_group(data_dir, manifest_rows, 3)
    assert len(groups) == 10  # every source x class of cxr3 v2
    results = [(path, segmenter.segment(content_of(path, PreprocessConfig()))) for paths in groups.values()
               for path in paths]
    ok = [(path, fields) for path, fields in results if fields.ok]
    assert len(ok) >= 0.85 * len(results), [(p.name, f.failure) for p, f in results if not f.ok]
    for path, fields in ok:
        height, width = fields.input_shape
        top, bottom, left, right = fields.box
        assert 0 <= top < bottom <= height and 0 <= left < right <= width, path.name
        assert fields.mask.sum() > 0 and len(fields.lung_areas) == 2
        assert 0.06 <= sum(fields.lung_areas) <= 0.7
        # the lungs sit in the chest: the box covers a real share of the image, centred
        assert (bottom - top) > 0.3 * height and (right - left) > 0.4 * width, path.name


def test_lung_crop_in_the_chain(sample_image):
    data = sample_image.read_bytes()
    whole = prepare_image(data, PreprocessConfig(image_size=128))
    crop = prepare_image(data, PreprocessConfig(image_size=128, lung_fields="crop"))
    masked = prepare_image(data, PreprocessConfig(image_size=128, lung_fields="crop_mask"))
    assert not crop.flags.lung_segmentation_failed and crop.flags.lung_failure_reason is None
    assert crop.pixels.shape == whole.pixels.shape == (128, 128)
    area = lambda box: (box[1] - box[0]) * (box[3] - box[2])  # noqa: E731
    assert area(crop.crop_box) < area(whole.crop_box)
    assert masked.crop_box == crop.crop_box
    assert (masked.pixels == 0).mean() > (crop.pixels == 0).mean() + 0.1  # outside the lungs blacked out
    assert np.array_equal(crop.pixels, prepare_image(data, PreprocessConfig(image_size=128, lung_fields="crop")).pixels)
    config = PreprocessConfig(image_size=128, lung_fields="crop")
    assert config.lung_segmenter_sha256 == file_sha256(DEFAULT_WEIGHTS)
    assert config.fingerprint() != PreprocessConfig(image_size=128).fingerprint()


def test_default_config_fingerprint_is_unchanged():
    # values computed by the code before lung fields existed: old caches stay valid
    assert PreprocessConfig().fingerprint() == "00ffe813ce81f082"
    assert PreprocessConfig(clahe=True, image_size=128).fingerprint() == "e0a78df6af3a457d"


@pytest.mark.parametrize("fill", [0, 128])
def test_blank_image_raises_the_lung_flag(fill):
    prepared = prepare_gray(np.full((300, 300), fill, dtype=np.uint8), PreprocessConfig(image_size=64, lung_fields="crop"))
    assert prepared.flags.lung_segmentation_failed
    assert prepared.flags.lung_failure_reason in lungs.FAILURE_REASONS
    assert prepared.pixels.shape == (64, 64) and prepared.crop_box == (0, 300, 0, 300)  # the image as it was
    plain = prepare_gray(np.full((300, 300), fill, dtype=np.uint8), PreprocessConfig(image_size=64))
    assert not plain.flags.lung_segmentation_failed and plain.flags.lung_failure_reason is None


@pytest.fixture(scope="module")
def lung_run(data_dir, tmp_path_factory):
    """A real HOG + logistic regression run with the lung crop on a tiny real subset."""
    from training.train import run_training

    config = TrainConfig(run_name="test-hog-lungs", model="hog_logreg", mode="classical",
                         preprocess={"image_size": 64, "lung_fields": "crop"},
                         subset={"train": 12, "val": 8, "test": 6}, n_bootstrap=0, exclusions=None, figures=False)
    return run_training(config, data_dir, tmp_path_factory.mktemp("lung-runs"), track=False)


def _forget_segmenters(monkeypatch) -> None:
    """What a fresh process on another machine sees: nothing loaded, no default weights file."""
    monkeypatch.setattr(lungs, "_LOADED", {})
    monkeypatch.setattr(lungs, "_candidate_files", lambda: [])


def test_bundle_carries_the_segmenter_and_rebuilds_identical_tensors(lung_run, data_dir, tmp_path, monkeypatch):
    config = lung_run.config
    bundle = tmp_path / "moved-bundle"  # what a registry download holds
    shutil.copytree(lung_run.bundle_dir, bundle)
    manifest = read_manifest(bundle)
    assert manifest.preprocess.lung_fields == "crop"
    assert file_sha256(bundle / LUNG_WEIGHTS) == manifest.preprocess.lung_segmenter_sha256 == file_sha256(DEFAULT_WEIGHTS)
    paths = [p for label in ("normal", "pneumonia", "tuberculosis") for p in sorted((data_dir / "test" / label).glob("*.jpg"))[:2]]
    before = [pixels_to_tensor(prepare_image(p.read_bytes(), config.preprocess).pixels, config.preprocess) for p in paths]
    expected = [lung_run.model.predict_proba(hog_features(prepare_image(p.read_bytes(), config.preprocess).pixels[None],
                                                          config.classical.hog))[0] for p in paths]

    _forget_segmenters(monkeypatch)
    with pytest.raises(lungs.LungSegmenterMissingError):
        prepare_image(paths[0].read_bytes(), manifest.preprocess)
    predictor = load_bundle(bundle)
    after = [pixels_to_tensor(prepare_image(p.read_bytes(), predictor.manifest.preprocess).pixels,
                              predictor.manifest.preprocess) for p in paths]
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    for path, raw in zip(paths, expected):
        prediction = predictor.predict_bytes(path.read_bytes())
        np.testing.assert_allclose([prediction.probabilities_raw[c] for c in predictor.classes], raw, atol=1e-6)

    (bundle / LUNG_WEIGHTS).write_bytes((bundle / LUNG_WEIGHTS).read_bytes() + b"tampered")
    monkeypatch.setattr(lungs, "_LOADED", {})
    with pytest.raises(lungs.LungSegmenterMissingError, match="sha256"):
        load_bundle(bundle)


def test_the_mar_holds_the_segmenter(lung_run, data_dir, tmp_path, monkeypatch):
    """torch-model-archiver's real MAR carries bundle/lungs.pt; the bundle inside it loads on its own."""
    import zipfile

    from serving.mar import build_package

    package = build_package(lung_run.bundle_dir, tmp_path / "package")
    with zipfile.ZipFile(package.mar) as archive:
        assert "bundle/lungs.pt" in archive.namelist()
        archive.extractall(tmp_path / "extracted")
    _forget_segmenters(monkeypatch)
    predictor = load_bundle(tmp_path / "extracted" / "bundle")
    path = sorted((data_dir / "test" / "tuberculosis").glob("*.jpg"))[0]
    got = predictor.predict_bytes(path.read_bytes()).probabilities_raw
    pixels = prepare_image(path.read_bytes(), lung_run.config.preprocess).pixels[None]
    raw = lung_run.model.predict_proba(hog_features(pixels, lung_run.config.classical.hog))[0]
    np.testing.assert_allclose([got[c] for c in predictor.classes], raw, atol=1e-6)


def test_blank_image_is_a_quality_concern_for_a_lung_bundle(lung_run):
    """The flag reaches the decision: a refused mask never yields a routine answer."""
    from PIL import Image

    from tests.imaging import png_bytes

    predictor = load_bundle(lung_run.bundle_dir)
    prediction = predictor.predict_bytes(png_bytes(Image.fromarray(np.full((256, 256), 128, dtype=np.uint8))))
    assert prediction.quality.lung_segmentation_failed
    assert prediction.decision.triage != "routine"
    assert json.loads(prediction.model_dump_json())["quality"]["lung_failure_reason"] in lungs.FAILURE_REASONS


def test_training_smoke(tmp_path):
    from training.train_lungs import DEFAULT_MASK_DIR, main

    code = main(["--data-dir", str(DEFAULT_MASK_DIR), "--epochs", "1", "--limit", "12",
                 "--weights", str(tmp_path / "seg.pt"), "--report-dir", str(tmp_path / "report")])
    assert code == 0
    report = json.loads((tmp_path / "report" / "segmenter.json").read_text())
    assert report["split"] == {"train": 8, "val": 2, "test": 2} and report["epochs"] == 1
    assert 0.0 <= report["test"]["dice_mean"] <= 1.0 and len(report["test"]["per_image"]) == 2
    provenance = json.loads((tmp_path / "seg.json").read_text())
    assert provenance["weights_sha256"] == file_sha256(tmp_path / "seg.pt")
    segmenter = load_segmenter_file(tmp_path / "seg.pt", provenance["weights_sha256"])
    assert segmenter.segment(np.full((200, 200), 90, dtype=np.uint8)).mask.shape == (segmenter.size, segmenter.size)
    assert (tmp_path / "report" / "segmenter.md").read_text().startswith("# Lung segmenter")
    assert LungRules().threshold == 0.5
