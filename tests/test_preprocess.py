"""The shared preprocessing chain on real radiographs in every format a hospital sends."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_core import errors
from cxr_core.decode import decode_grayscale
from cxr_core.preprocess import PreprocessConfig, find_content_box, pixels_to_tensor, prepare_image, preprocess
from tests.imaging import dicom_bytes, gray_of, jpeg_bytes, png16_bytes, png_bytes
from training.cache import PreprocessedCache, load_pixel_array

CONFIG = PreprocessConfig()


@pytest.fixture(scope="module")
def original(sample_image):
    data = sample_image.read_bytes()
    tensor, flags = preprocess(data, CONFIG)
    return {"bytes": data, "gray": gray_of(sample_image), "tensor": tensor, "flags": flags}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_tensor_shape_and_determinism(original):
    tensor, flags = preprocess(original["bytes"], CONFIG)
    assert tensor.shape == (1, 224, 224) and tensor.dtype == torch.float32
    assert torch.equal(tensor, original["tensor"])
    assert flags == original["flags"]
    assert flags.original_width == original["gray"].shape[1]
    assert flags.source_format == "jpeg" and flags.bit_depth == 8


def test_16bit_png_gives_the_same_tensor(original):
    decoded = decode_grayscale(png16_bytes(original["gray"]), 60)
    assert decoded.bit_depth == 16
    tensor, _ = preprocess(png16_bytes(original["gray"]), CONFIG)
    assert torch.equal(tensor, original["tensor"])


def test_rgba_and_rgb_and_palette_give_the_same_tensor(original):
    rgba = Image.fromarray(original["gray"]).convert("RGBA")
    for variant in (rgba, rgba.convert("RGB"), Image.fromarray(original["gray"]).convert("P")):
        tensor, _ = preprocess(png_bytes(variant), CONFIG)
        assert _max_diff(tensor, original["tensor"]) < 1e-6, variant.mode


def test_exif_orientation_is_applied(original):
    # Stored rotated 90 degrees counter-clockwise; EXIF orientation 6 tells viewers to rotate back.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(original["gray"], k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    tensor, flags = preprocess(png_bytes(stored, exif=exif.tobytes()), CONFIG)
    assert torch.equal(tensor, original["tensor"])
    assert (flags.original_width, flags.original_height) == (original["gray"].shape[1], original["gray"].shape[0])
    jpeg_tensor, _ = preprocess(jpeg_bytes(stored, quality=97, exif=exif.tobytes()), CONFIG)
    assert float((jpeg_tensor - original["tensor"]).abs().mean()) < 0.02  # JPEG re-encoding only


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_16bit_gives_the_same_tensor(original, photometric):
    data = dicom_bytes(original["gray"], photometric=photometric, bits=16)
    tensor, flags = preprocess(data, CONFIG)
    assert flags.source_format == "dicom" and flags.bit_depth == 16
    assert torch.equal(tensor, original["tensor"])


def test_dicom_12bit_with_full_range_window(original):
    data = dicom_bytes(original["gray"], photometric="MONOCHROME2", bits=12, window=(2047.5, 4096))
    tensor, _ = preprocess(data, CONFIG)
    assert _max_diff(tensor, original["tensor"]) <= 1.01 / 255 / CONFIG.normalize_std


def test_dicom_patient_tags_never_reach_errors(original):
    data = dicom_bytes(original["gray"])
    with pytest.raises(errors.InputError) as caught:
        preprocess(data[: len(data) // 2], CONFIG)
    assert "Doe" not in str(caught.value) and "SECRET" not in str(caught.value)


def test_black_frame_is_cropped_back(original):
    gray = original["gray"]
    frame = 40
    framed = np.zeros((gray.shape[0] + 2 * frame, gray.shape[1] + 3 * frame), dtype=np.uint8)
    framed[frame : frame + gray.shape[0], 2 * frame : 2 * frame + gray.shape[1]] = gray
    inner = find_content_box(gray, CONFIG)
    box = find_content_box(framed, CONFIG)
    expected = (inner[0] + frame, inner[1] + frame, inner[2] + 2 * frame, inner[3] + 2 * frame)
    assert max(abs(a - b) for a, b in zip(box, expected)) <= 3, (box, expected)
    prepared = prepare_image(png_bytes(Image.fromarray(framed)), CONFIG)
    assert prepared.flags.has_border and prepared.flags.border_ratio > 0.3
    assert float(np.abs(prepared.pixels.astype(int) - prepare_image(original["bytes"], CONFIG).pixels).mean()) < 3


def test_clahe_changes_pixels_deterministically(original):
    config = PreprocessConfig(clahe=True)
    a = prepare_image(original["bytes"], config).pixels
    assert np.array_equal(a, prepare_image(original["bytes"], config).pixels)
    assert not np.array_equal(a, prepare_image(original["bytes"], CONFIG).pixels)
    assert config.fingerprint() != CONFIG.fingerprint()


def _bomb_png() -> bytes:
    return png_bytes(Image.new("1", (12000, 12000)))


def _multi_frame_tiff(gray) -> bytes:
    buffer = io.BytesIO()
    frames = [Image.fromarray(gray), Image.fromarray(255 - gray)]
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make, error, phrase",
    [
        (lambda o: b"", errors.EmptyInputError, "empty"),
        (lambda o: b"this is a clinical note, not an image" * 10, errors.NotAnImageError, "not an image"),
        (lambda o: b"%PDF-1.7\n" + bytes(range(256)) * 8, errors.NotAnImageError, "not an image"),
        (lambda o: o["bytes"][: len(o["bytes"]) // 2], errors.TruncatedImageError, "truncated"),
        (lambda o: png16_bytes(o["gray"])[:-200], errors.TruncatedImageError, "truncated"),
        (lambda o: _bomb_png(), errors.DecompressionBombError, "megapixels"),
        (lambda o: png_bytes(Image.fromarray(o["gray"][:40, :40])), errors.ImageTooSmallError, "at least"),
        (lambda o: _multi_frame_tiff(o["gray"]), errors.UnsupportedImageModeError, "frames"),
    ],
    ids=["empty", "text", "pdf", "truncated-jpeg", "truncated-png", "bomb", "tiny", "multi-frame"],
)
def test_bad_input_raises_typed_error(original, make, error, phrase):
    with pytest.raises(error) as caught:
        preprocess(make(original), CONFIG)
    assert phrase in str(caught.value)
    assert isinstance(caught.value, errors.InputError) and caught.value.code


def test_cache_gives_the_same_tensor_as_the_uncached_path(data_dir, tmp_path):
    paths = sorted((data_dir / "val" / "pneumonia").glob("*.jpg"))[:6]
    cache = PreprocessedCache(CONFIG, tmp_path)
    for path in paths:
        direct = pixels_to_tensor(prepare_image(path.read_bytes(), CONFIG).pixels, CONFIG)
        cold = pixels_to_tensor(cache.pixels(path), CONFIG)
        warm = pixels_to_tensor(cache.pixels(path), CONFIG)
        assert torch.equal(direct, cold) and torch.equal(direct, warm)
    assert len(list(cache.directory.glob("*.npy"))) == len(paths)
    stacked = load_pixel_array(paths, CONFIG, tmp_path, workers=2)
    assert stacked.shape == (6, 224, 224) and stacked.dtype == np.uint8
    other = PreprocessedCache(PreprocessConfig(image_size=128), tmp_path)
    assert other.directory != cache.directory and other.pixels(paths[0]).shape == (128, 128)
