"""Split loading: records -> cached pixel arrays + labels, and the torch Dataset over them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from cxr_core.preprocess import PreprocessConfig, pixels_to_tensor
from training.augment import augment_pixels
from training.cache import load_pixel_array
from training.config import AugmentConfig, SubsetConfig
from training.data import Dataset, ImageRecord, discover_dataset

log = logging.getLogger(__name__)


@dataclass
class SplitArrays:
    """One split in memory: prepared pixels, label indices and the records they came from."""

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    records: list[ImageRecord]

    @property
    def sources(self) -> list[str]:
        return [r.source for r in self.records]

    @property
    def relpaths(self) -> list[str]:
        return [r.relpath for r in self.records]


def sample_per_class(records: list[ImageRecord], limit: int | None, seed: int) -> list[ImageRecord]:
    """Seeded per-class sample (all records when ``limit`` is None), in a stable order."""
    if limit is None:
        return records
    rng = np.random.default_rng(seed)
    chosen: list[ImageRecord] = []
    for label in sorted({r.label for r in records}):
        pool = [r for r in records if r.label == label]
        picks = rng.choice(len(pool), size=min(limit, len(pool)), replace=False)
        chosen.extend(pool[i] for i in sorted(picks))
    return sorted(chosen, key=lambda r: r.relpath)


def open_dataset(data_dir: Path | str, exclusions: str | None) -> Dataset:
    """Discover the data, honouring the audit's exclusions only if they were made for this data."""
    path = Path(exclusions) if exclusions else None
    if path is not None and path.exists():
        manifest_sha = json.loads(path.read_text()).get("manifest_sha256")
        probe = discover_dataset(data_dir)
        if manifest_sha and manifest_sha != probe.manifest_sha256:
            log.warning("exclusions %s were made for another data set; not applied", path)
            return probe
    return discover_dataset(data_dir, exclusions=path if path is not None and path.exists() else None)


def load_split(dataset: Dataset, split: str, preprocess: PreprocessConfig, subset: SubsetConfig, seed: int,
               workers: int = 2) -> SplitArrays:
    records = sample_per_class(dataset.split(split), getattr(subset, split, None), seed)
    pixels = load_pixel_array([r.path for r in records], preprocess, workers=workers, desc=f"loading {split}")
    labels = np.asarray([dataset.classes.index(r.label) for r in records], dtype=np.int64)
    return SplitArrays(name=split, pixels=pixels, labels=labels, records=records)


TRAINING_SPLITS = ("train", "val", "test")


@dataclass
class TrainingData:
    """What :func:`training.train.run_training` trains, calibrates and tests on: its seam.

    ``dataset`` is the data set as discovered (its fingerprint goes into provenance); ``splits``
    are the arrays actually used. Callers that train on a restricted or transformed view
    (leave-one-source-out, mitigations) build it with :func:`load_training_data` and pass it in,
    instead of patching the loader.
    """

    data_dir: Path
    dataset: Dataset
    splits: dict[str, SplitArrays]

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


def load_training_data(data_dir: Path, exclusions: str | Path | None, preprocess: PreprocessConfig,
                       subset: SubsetConfig, seed: int, keep: Callable[[ImageRecord], bool] | None = None,
                       transform: Callable[[SplitArrays], SplitArrays] | None = None) -> TrainingData:
    """Open ``data_dir`` and load train/val/test: ``keep`` filters records first, ``transform`` maps each split."""
    dataset = open_dataset(data_dir, exclusions)
    view = dataset if keep is None else Dataset(
        root=dataset.root, classes=dataset.classes, records=[r for r in dataset.records if keep(r)],
        manifest_sha256=dataset.manifest_sha256, excluded=dataset.excluded)
    splits = {}
    for name in TRAINING_SPLITS:
        arrays = load_split(view, name, preprocess, subset, seed)
        splits[name] = transform(arrays) if transform is not None else arrays
    return TrainingData(data_dir=Path(data_dir), dataset=dataset, splits=splits)


class PixelDataset(TorchDataset):
    """Torch view of a :class:`SplitArrays`, augmenting on the fly when asked to."""

    def __init__(self, split: SplitArrays, preprocess: PreprocessConfig, augment: AugmentConfig | None, seed: int):
        self.split = split
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.split.pixels[index]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))  # reproducible per epoch and item
            pixels = augment_pixels(pixels, self.augment, rng)
        return pixels_to_tensor(pixels, self.preprocess), int(self.split.labels[index])
