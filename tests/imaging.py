"""Helpers that turn a real radiograph into the other formats hospitals send."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def gray_of(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 95, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def png16_bytes(gray: np.ndarray) -> bytes:
    """16-bit grayscale PNG with the 8-bit values spread over the full 16-bit range."""
    return png_bytes(Image.fromarray(gray.astype(np.uint16) * 257))


def dicom_bytes(
    gray: np.ndarray,
    photometric: str = "MONOCHROME1",
    bits: int = 16,
    window: tuple[float, float] | None = None,
) -> bytes:
    """An uncompressed DICOM of ``gray`` (8-bit) with patient tags, as a PACS would send it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    scale = (2**bits - 1) / 255.0
    values = np.rint(gray.astype(np.float64) * scale)
    if photometric == "MONOCHROME1":
        values = (2**bits - 1) - values
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientName = "Doe^Jane"
    dataset.PatientID = "SECRET-12345"
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = gray.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 0
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    dataset.PixelData = values.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
