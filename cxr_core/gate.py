"""The gradability gate: no diagnosis for what is not a gradable chest radiograph.

A classifier gives a confident answer for anything: an all-black PNG, uniform noise, a cat. The
gate runs before the policy and answers ``ungradable`` with a reason instead. It has two parts:

- **image statistics** with fixed, physical limits: a blank or uniform image (no contrast), pixel
  noise (neighbouring pixels as different as random ones), a strip (aspect ratio beyond any
  detector);
- **out-of-distribution scores** learned from the training images, in two spaces: the model's own
  features (HOG descriptors for the classical families, the pooled pre-logit features for the
  neural ones) and an 8x8 contrast-normalised thumbnail (chest layout). (An intensity histogram
  was tried as a third space: its heavy tail on real images spent the 1% budget and let more
  garbage through.) Each is a probabilistic
  PCA negative log-likelihood (Mahalanobis distance in the top principal components plus the
  residual off them), fitted on the training split, scaled by its validation 95th percentile; the
  largest scaled score must stay under a threshold set as the ``1 - target_refusal`` quantile of
  the validation split, so the gate refuses about ``target_refusal`` (1%) of real radiographs;
- a colour check: a colour photograph is no radiograph (the decoder measures channel spread).

The fitted gate lives in the bundle: :class:`GateConfig` in ``bundle.json`` (thresholds, refusal
rates) and the PCA arrays in ``gate.npz``. :meth:`cxr_core.bundle.Predictor.predict_prepared`
applies it, so serving, the triage CLI and evaluation refuse the same images.

    python -m cxr_core.gate fit --bundle DIR [--data-dir ../shared/data/cxr3]   # (re)fit on any bundle
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

GATE_ARRAYS = "gate.npz"
SPACES = ("model_features", "thumbnail")
THUMBNAIL_SIDE = 8


class GateConfig(BaseModel):
    """The fitted gate as ``bundle.json`` stores it; the PCA arrays are in ``gate.npz``."""

    model_config = ConfigDict(extra="forbid")

    min_std: float = Field(6.0, description="0-255 std of the prepared image below which it is blank/uniform")
    max_noise: float = Field(0.75, description="mean |neighbour difference| / std above which it is noise "
                                               "(iid noise: about 1.1; radiographs: under 0.3)")
    max_aspect_ratio: float = Field(3.0, description="longer / shorter side of the original image (the data's "
                                                     "radiographs reach 2.7: cropped paediatric films)")
    max_colour: float = Field(12.0, description="mean per-pixel channel spread (0-255) above which the image is a "
                                                "colour photograph; radiographs are grey (JPEG chroma noise < 3)")
    min_side: int = Field(100, description="shorter side of the original image, in pixels, below which it cannot "
                                           "show the lung detail a reader grades (detectors give 2000+ px; the "
                                           "data's own downscaled films reach 118 px, a third of one ~80 px)")
    scales: dict[str, float] = Field(description="per space: the validation 95th percentile of its OOD score")
    ood_threshold: float = Field(description="limit of the combined score max_space(score / scale), set as the "
                                             "(1 - target_refusal) quantile of validation")
    lung_failure_threshold: float | None = Field(None, description=(
        "bundles that crop to the lung fields: an image whose lungs could not be found is refused when its "
        "combined score passes this lower limit (a corner of a radiograph or a photograph, cropped to a "
        "'lung box', can look like lung tissue; the failed segmentation is the tell). Set on validation: "
        "the failed images take at most lung_failure_budget_share of the refusal budget"))
    lung_failure_budget_share: float = Field(0.5, ge=0, le=1)
    target_refusal: float = 0.01
    refusal_rates: dict[str, float] = Field({}, description="share refused per split when fitted")
    n_fit: int = 0


class GateVerdict(BaseModel):
    """Why an image was (not) graded; the response and the audit log carry it."""

    gradable: bool
    code: str | None = Field(None, description="blank, noise, aspect_ratio, colour_photo, not_a_chest_radiograph")
    reason: str | None = None
    scores: dict[str, float] = {}


REASONS = {
    "blank": "the image is blank or uniform (no contrast to read)",
    "noise": "the image is noise, not a radiograph",
    "aspect_ratio": "the image is a strip (aspect ratio beyond any chest detector)",
    "too_small": "the image is too small to grade (its shorter side is under the gate's minimum)",
    "colour_photo": "the image is a colour photograph, not a radiograph",
    "not_a_chest_radiograph": "the image does not look like the chest radiographs the model was trained on",
    "lungs_not_found": "no lung fields were found and the image looks unlike the chest radiographs the model was "
                       "trained on",
}


def image_statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 -> (std, noise ratio) per image."""
    values = np.asarray(pixels, dtype=np.float32)
    std = values.std(axis=(1, 2))
    horizontal = np.abs(np.diff(values, axis=2)).mean(axis=(1, 2))
    vertical = np.abs(np.diff(values, axis=1)).mean(axis=(1, 2))
    noise = (horizontal + vertical) / 2.0 / np.maximum(std, 1e-3)
    return std, noise


def thumbnails(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 64) contrast-normalised 8x8 thumbnails (the image's coarse layout: two
    lung fields, mediastinum, diaphragm; a corner crop or a photograph has another)."""
    rows = []
    for image in np.asarray(pixels):
        small = cv2.resize(image, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
        small = (small - small.mean()) / max(float(small.std()), 1.0)
        rows.append(small.reshape(-1))
    return np.asarray(rows, dtype=np.float32)


def model_features(predictor, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's own features: HOG descriptors, or the pooled features the classifier reads."""
    from cxr_core.models import model_outputs

    manifest = predictor.manifest
    return model_outputs(predictor.model, pixels, manifest.preprocess, manifest.model.hog, batch_size)[1]


@dataclass
class PpcaScore:
    """Probabilistic PCA: Mahalanobis distance in the top components + residual off them."""

    mean: np.ndarray
    components: np.ndarray  # (k, d)
    variances: np.ndarray  # (k,)
    residual_variance: float

    @classmethod
    def fit(cls, features: np.ndarray, max_components: int = 32) -> "PpcaScore":
        features = np.asarray(features, dtype=np.float64)
        mean = features.mean(axis=0)
        centred = features - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        eigen = singular**2 / max(len(features) - 1, 1)
        k = int(min(max_components, len(features) - 1, features.shape[1]))
        total = float(centred.var(axis=0).sum())
        rest = max(total - float(eigen[:k].sum()), 0.0) / max(features.shape[1] - k, 1)
        floor = max(1e-6 * total / features.shape[1], 1e-12)
        return cls(mean=mean, components=vt[:k], variances=np.maximum(eigen[:k], floor),
                   residual_variance=max(rest, floor))

    def score(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float64) - self.mean
        projected = centred @ self.components.T
        inside = (projected**2 / self.variances).sum(axis=1)
        residual = (centred**2).sum(axis=1) - (projected**2).sum(axis=1)
        dims = max(self.mean.shape[0] - self.components.shape[0], 1)
        return (inside + np.maximum(residual, 0.0) / self.residual_variance) / (self.components.shape[0] + dims)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.components": self.components,
                f"{prefix}.variances": self.variances, f"{prefix}.residual": np.asarray([self.residual_variance])}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "PpcaScore":
        return cls(mean=arrays[f"{prefix}.mean"], components=arrays[f"{prefix}.components"],
                   variances=arrays[f"{prefix}.variances"], residual_variance=float(arrays[f"{prefix}.residual"][0]))


@dataclass
class Gate:
    config: GateConfig
    scorers: dict[str, PpcaScore]

    def scores(self, predictor, pixels: np.ndarray, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per space, the OOD score of each image; ``features`` are the model's (computed here when None)."""
        if features is None:
            features = model_features(predictor, pixels)
        return {"model_features": self.scorers["model_features"].score(features),
                "thumbnail": self.scorers["thumbnail"].score(thumbnails(pixels))}

    def combined(self, predictor, pixels: np.ndarray, features: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        scores = self.scores(predictor, pixels, features)
        relative = np.stack([scores[space] / self.config.scales[space] for space in SPACES], axis=1)
        return relative.max(axis=1), scores

    def verdicts(self, predictor, pixels: np.ndarray, aspect_ratios: list[float],
                 colourfulness: list[float] | None = None,
                 lung_failed: list[bool] | None = None, min_sides: list[int] | None = None,
                 features: np.ndarray | None = None) -> list[GateVerdict]:
        """One verdict per prepared image; the first failing check names the reason."""
        pixels = np.asarray(pixels)
        std, noise = image_statistics(pixels)
        combined, scores = self.combined(predictor, pixels, features)
        colourfulness = colourfulness or [0.0] * len(pixels)
        lung_failed = lung_failed or [False] * len(pixels)
        min_sides = min_sides or [None] * len(pixels)
        config = self.config
        verdicts = []
        for index, aspect in enumerate(aspect_ratios):
            row = {"std": round(float(std[index]), 3), "noise": round(float(noise[index]), 4),
                   "colour": round(float(colourfulness[index]), 3), "ood": round(float(combined[index]), 4),
                   **{space: round(float(scores[space][index]), 4) for space in SPACES}}
            code = None
            if std[index] < config.min_std:
                code = "blank"
            elif noise[index] > config.max_noise:
                code = "noise"
            elif aspect > config.max_aspect_ratio:
                code = "aspect_ratio"
            elif min_sides[index] is not None and min_sides[index] < config.min_side:
                code = "too_small"
            elif colourfulness[index] > config.max_colour:
                code = "colour_photo"
            elif combined[index] > config.ood_threshold:
                code = "not_a_chest_radiograph"
            elif (lung_failed[index] and config.lung_failure_threshold is not None
                  and combined[index] > config.lung_failure_threshold):
                code = "lungs_not_found"
            verdicts.append(GateVerdict(gradable=code is None, code=code, reason=REASONS.get(code or ""), scores=row))
        return verdicts

    def save(self, bundle_dir: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        for space, scorer in self.scorers.items():
            arrays.update(scorer.arrays(space))
        np.savez(Path(bundle_dir) / GATE_ARRAYS, **arrays)

    @classmethod
    def load(cls, bundle_dir: Path, config: GateConfig) -> "Gate":
        with np.load(Path(bundle_dir) / GATE_ARRAYS) as arrays:
            return cls(config=config, scorers={space: PpcaScore.from_arrays(arrays, space) for space in SPACES})


def fit_gate(predictor, train_pixels: np.ndarray, val_pixels: np.ndarray, target_refusal: float = 0.01,
             extra_splits: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
             val_lung_failed: np.ndarray | None = None) -> Gate:
    """Fit on the training images, set thresholds on validation (``target_refusal`` in all)."""
    scorers = {"model_features": PpcaScore.fit(model_features(predictor, train_pixels), max_components=16),
               "thumbnail": PpcaScore.fit(thumbnails(train_pixels), max_components=48)}
    provisional = Gate(GateConfig(scales={space: 1.0 for space in SPACES}, ood_threshold=float("inf")), scorers)
    val_scores = provisional.scores(predictor, val_pixels)
    scales = {space: float(np.quantile(val_scores[space], 0.95)) for space in SPACES}
    gate = Gate(GateConfig(scales=scales, ood_threshold=float("inf"), target_refusal=target_refusal,
                           n_fit=len(train_pixels)), scorers)
    set_thresholds(gate, predictor, val_pixels, val_lung_failed)
    rates = {}
    for name, (pixels, failed) in {"val": (val_pixels, val_lung_failed), **(extra_splits or {})}.items():
        square = [1.0] * len(pixels)  # prepared pixels are square; aspect is checked on the original
        flags = None if failed is None else [bool(f) for f in failed]
        rates[name] = round(float(np.mean([not v.gradable for v in gate.verdicts(predictor, pixels, square, None, flags)])), 4)
    gate.config.refusal_rates = rates
    return gate


def set_thresholds(gate: Gate, predictor, val_pixels: np.ndarray, val_lung_failed: np.ndarray | None = None) -> None:
    """Set the OOD limits on validation radiographs so that all rules together refuse at most the budget.

    The image-statistics rules take their share first; where the bundle crops to the lungs and
    some validation images' lungs were not found, those images get ``lung_failure_budget_share``
    of what is left under a lower limit (only failed images can be refused by it), the rest goes
    to the plain OOD limit. Scorers and scales are not touched, so a bundle's thresholds can be
    re-set without refitting (:func:`main` ``thresholds``).
    """
    config = gate.config
    combined, _ = gate.combined(predictor, val_pixels)
    std, noise = image_statistics(val_pixels)
    by_rules = float(np.mean((std < config.min_std) | (noise > config.max_noise)))
    budget = max(config.target_refusal - by_rules, config.target_refusal / 4)
    failed = np.zeros(len(combined), bool) if val_lung_failed is None else np.asarray(val_lung_failed, bool)
    lung_share = config.lung_failure_budget_share if failed.any() else 0.0
    config.ood_threshold = float(np.quantile(combined, 1.0 - budget * (1.0 - lung_share), method="higher"))
    config.lung_failure_threshold = None
    if lung_share > 0:
        candidates = np.sort(combined[failed & (combined <= config.ood_threshold)])[::-1]
        allowed = int(lung_share * budget * len(combined))
        config.lung_failure_threshold = float(candidates[allowed]) if allowed < len(candidates) else 0.0


def lung_failures(records, preprocess) -> np.ndarray | None:
    """Per record: were its lung fields not found? None when the bundle does not crop to the lungs."""
    if preprocess.lung_fields == "none":
        return None
    from cxr_core.preprocess import prepare_image

    return np.asarray([prepare_image(r.path.read_bytes(), preprocess).flags.lung_segmentation_failed for r in records])


def attach_gate(bundle_dir: Path | str, gate: Gate) -> None:
    """Write ``gate.npz`` and the gate's config into an existing bundle."""
    from cxr_core.bundle import MANIFEST_NAME, read_manifest

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    manifest.gate = gate.config
    gate.save(bundle_dir)
    (bundle_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1) + "\n")


def split_arrays(data_dir: Path, preprocess, split: str, limit: int | None = None, exclusions=None):
    """Prepared pixels and records of one split (through the training cache)."""
    from training.config import SubsetConfig
    from training.datasets import load_split, open_dataset

    dataset = open_dataset(Path(data_dir), exclusions)
    return load_split(dataset, split, preprocess, SubsetConfig(**{split: limit}), 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cxr_core.gate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit the gate of a bundle on its training data and store it in the bundle")
    thresholds = sub.add_parser("thresholds", help="re-set only the limits of a bundle's fitted gate on validation "
                                                   "(after a rule change; scorers untouched)")
    for command in (fit, thresholds):
        command.add_argument("--bundle", type=Path, required=True)
        command.add_argument("--data-dir", type=Path, default=None, help="default: the bundle's provenance data_dir")
        command.add_argument("--target-refusal", type=float, default=0.01)
        command.add_argument("--limit", type=int, default=None, help="at most this many images per split (quick fits)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from cxr_core.bundle import load_bundle

    keep_gate = args.command == "thresholds"
    predictor = load_bundle(args.bundle, gate=keep_gate)  # fit: whatever gate it had is replaced
    data_dir = args.data_dir or Path(predictor.manifest.provenance.data_dir)
    preprocess = predictor.manifest.preprocess
    splits = {split: split_arrays(data_dir, preprocess, split, args.limit) for split in ("val", "test")
              + (() if keep_gate else ("train",))}
    failed = {name: lung_failures(split.records, preprocess) for name, split in splits.items()}
    if keep_gate:
        if predictor.gate is None:
            raise SystemExit(f"{args.bundle} has no fitted gate: run 'fit' first")
        gate = predictor.gate
        gate.config.target_refusal = args.target_refusal
        set_thresholds(gate, predictor, splits["val"].pixels, failed["val"])
        gate.config.refusal_rates = {
            name: round(float(np.mean([not v.gradable for v in gate.verdicts(
                predictor, split.pixels, [1.0] * len(split.pixels), None,
                None if failed[name] is None else [bool(f) for f in failed[name]])])), 4)
            for name, split in splits.items()}
    else:
        gate = fit_gate(predictor, splits["train"].pixels, splits["val"].pixels, args.target_refusal,
                        {"test": (splits["test"].pixels, failed["test"])}, val_lung_failed=failed["val"])
    attach_gate(args.bundle, gate)
    print(json.dumps({"bundle": str(args.bundle), **gate.config.model_dump(mode="json")}, indent=1))


if __name__ == "__main__":
    main()
