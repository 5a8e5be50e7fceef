"""Bytes -> grayscale intensities in [0, 1], for every format a hospital sends.

Why one decoder: training reads JPEGs from disk while serving receives PNG (8 or 16 bit), RGB
screenshots or DICOM from a PACS. If each path decoded differently, the model would see a
different image in production than in validation. Every decoder here maps to the same float
scale (0 = black, 1 = white, full bit depth of the source) so a 16-bit PNG or a MONOCHROME1 DICOM
of the same picture yields the same pixels as the 8-bit JPEG.

DICOM patient tags are never read into logs or error messages: errors name the problem, not the
dataset contents.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxr_core.errors import (
    DecompressionBombError,
    EmptyInputError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageModeError,
)

# A truncated upload must be refused, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own (configurable) pixel limit before decoding; PIL's global one would raise a
# different error type at a different threshold.
Image.MAX_IMAGE_PIXELS = None

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"


@dataclass(frozen=True)
class DecodedImage:
    """Grayscale float32 intensities in [0, 1] and where they came from."""

    pixels: np.ndarray
    source_format: str
    bit_depth: int
    colourfulness: float = 0.0  # mean max-min channel spread, 0-255: radiographs ~0, photographs >> 10

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _safe_token(value: object) -> str:
    """A value read from the caller's file, quoted only when it is a short code (mode, UID, term)."""
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9;._ ]{1,40}", text) else "(not shown)"


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= _DICOM_MAGIC_OFFSET + 4 and data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def decode_grayscale(data: bytes, max_megapixels: float) -> DecodedImage:
    """Decode any supported image bytes to grayscale intensities in [0, 1].

    Raises a subclass of :class:`cxr_core.errors.InputError` with a message a caller can act on.
    """
    if not data:
        raise EmptyInputError("the image is empty (0 bytes)")
    if is_dicom(data):
        return _decode_dicom(data, max_megapixels)
    return _decode_raster(data, max_megapixels)


def _check_pixels(width: int, height: int, max_megapixels: float) -> None:
    megapixels = width * height / 1e6
    if megapixels > max_megapixels:
        raise DecompressionBombError(
            f"the image has {width}x{height} = {megapixels:.1f} megapixels, more than the limit of "
            f"{max_megapixels:g}"
        )


def _decode_raster(data: bytes, max_megapixels: float) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise NotAnImageError(
            "the bytes are not an image in a supported format (JPEG, PNG, BMP, TIFF, DICOM)"
        ) from None
    except Exception as exc:  # PIL raises assorted errors on garbage headers; their text may quote the bytes
        raise NotAnImageError(f"the image header could not be read ({type(exc).__name__})") from None
    _check_pixels(image.width, image.height, max_megapixels)
    if getattr(image, "n_frames", 1) > 1:
        raise UnsupportedImageModeError(
            f"the image has {image.n_frames} frames; send one radiograph per request"
        )
    source_format = (image.format or "unknown").lower()  # exif_transpose returns a copy without it
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except OSError as exc:
        message = str(exc).lower()
        if "truncated" in message or "broken data stream" in message or "unrecognized data stream" in message:
            raise TruncatedImageError("the image data is truncated or corrupt") from None
        raise NotAnImageError(f"the image could not be decoded ({type(exc).__name__})") from None
    except (SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise TruncatedImageError(f"the image data is corrupt ({type(exc).__name__})") from None
    if source_format == "png" and not _png_stream_complete(data):
        raise TruncatedImageError("the PNG's pixel data ends before its last row (incomplete file)")
    if source_format == "jpeg" and _jpeg_padded(image):
        raise TruncatedImageError("the JPEG's data ends early (the decoder padded the missing rows)")
    pixels, bit_depth = _raster_to_unit_gray(image)
    return DecodedImage(pixels=pixels, source_format=source_format, bit_depth=bit_depth,
                        colourfulness=_colourfulness(image))


def _colourfulness(image: Image.Image) -> float:
    """Mean spread between the colour channels (0-255) on a small copy; 0 for grey images."""
    if image.mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "LA"):
        return 0.0
    small = image.copy()
    small.thumbnail((128, 128))
    rgb = np.asarray(small.convert("RGB"), dtype=np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_stream_complete(data: bytes) -> bool:
    """Does the PNG's zlib stream hold every row its header declares? Pillow pads a short stream
    with black without an error; a hospital must get a refusal instead."""
    position, idat, header = 8, [], None
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = data[position + 8: position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        position += 12 + length
    if header is None or len(header) < 13:
        return False
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
    channels = _PNG_CHANNELS.get(colour, 1)

    def row_bytes(pixels: int) -> int:
        return 1 + (pixels * channels * depth + 7) // 8

    if interlace:
        expected = 0
        for x0, y0, dx, dy in _ADAM7:
            columns, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
            expected += rows * row_bytes(columns) if columns > 0 and rows > 0 else 0
    else:
        expected = height * row_bytes(width)
    inflater, produced, stream = zlib.decompressobj(), 0, b"".join(idat)
    try:
        while stream and produced < expected:
            produced += len(inflater.decompress(stream, 1 << 20))
            stream = inflater.unconsumed_tail
    except zlib.error:
        return False
    return produced >= expected


def _jpeg_padded(image: Image.Image) -> bool:
    """libjpeg answers a JPEG cut short (then closed with an EOI marker) with a warning and fills the
    missing blocks with mid-gray (128). Pillow drops the warning; an exactly-128 bottom block row
    right across the image is that padding (no radiograph ends in a flat 128 band)."""
    if image.height < 16:
        return False
    tail = np.asarray(image.crop((0, image.height - 8, image.width, image.height)).convert("L"))
    return bool((tail == 128).all())


def _raster_to_unit_gray(image: Image.Image) -> tuple[np.ndarray, int]:
    """Map a PIL image of any common mode to gray intensities in [0, 1] and its bit depth."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0, 16
    if mode == "I":
        array = np.asarray(image, dtype=np.float64)
        if array.min() < 0:
            raise UnsupportedImageModeError("32-bit images with negative values are not supported")
        # PNG 16-bit grey decodes as 'I' on some Pillow builds; its range tells the depth.
        depth = 8 if array.max() <= 255 else 16
        return (array / (2**depth - 1)).clip(0, 1).astype(np.float32), depth
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():
            raise UnsupportedImageModeError("the floating-point image holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        return ((array - low) / (high - low) if high > low else np.zeros_like(array)), 32
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent areas are shown over black, as a radiograph viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
        mode = image.mode
    if mode in ("L", "1", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        gray = image.convert("RGB").convert("L") if mode not in ("L", "RGB", "RGBA") else image.convert("L")
        return np.asarray(gray, dtype=np.float32) / 255.0, 8
    raise UnsupportedImageModeError(f"image mode {_safe_token(mode)} is not supported")


def _decode_dicom(data: bytes, max_megapixels: float) -> DecodedImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise TruncatedImageError(f"the DICOM file could not be parsed ({type(exc).__name__})") from None
    if "PixelData" not in dataset:
        raise NotAnImageError("the DICOM file holds no pixel data")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    _check_pixels(columns, rows, max_megapixels)
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise UnsupportedImageModeError("multi-frame DICOM is not supported; send one radiograph")
    syntax_uid = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax_uid is not None and not getattr(syntax_uid, "is_compressed", True):
        expected = rows * columns * int(dataset.get("SamplesPerPixel", 1) or 1) * (
            int(dataset.get("BitsAllocated", 8) or 8) // 8)
        if len(dataset.PixelData) < expected:
            raise TruncatedImageError(
                f"the DICOM pixel data is truncated ({len(dataset.PixelData)} of {expected} bytes present)")
    try:
        raw = dataset.pixel_array
    except Exception as exc:
        syntax = _safe_token(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown"))
        raise UnsupportedImageModeError(
            f"the DICOM pixel data could not be decoded (transfer syntax {syntax}: {type(exc).__name__})"
        ) from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits_stored = int(dataset.get("BitsStored", 8))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if raw.ndim == 3 and raw.shape[-1] == 3:
            gray = np.asarray(Image.fromarray(raw.astype(np.uint8)).convert("L"), dtype=np.float32) / 255.0
            return DecodedImage(gray, "dicom", 8)
        raise UnsupportedImageModeError(
            f"DICOM photometric interpretation {_safe_token(photometric)} is not supported")
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    values = apply_modality_lut(raw, dataset).astype(np.float64)
    has_window = "WindowCenter" in dataset or "VOILUTSequence" in dataset
    if has_window:
        # The VOI LUT maps to the stored bit range; that range is the display scale.
        values = apply_voi_lut(values, dataset).astype(np.float64)
    else:
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    unit = ((values - low) / (high - low)).clip(0, 1).astype(np.float32)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1: high values are dark
    return DecodedImage(unit, "dicom", bits_stored)
