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
- a colour check: a colour photograph is no radiograph (the decoder measures channel spread);
- a **crop discriminator**: a corner of a radiograph, cropped to a "lung box", shares the model's
  features with a whole chest and slips under the OOD limit. A logistic regression on the same
  features plus the thumbnail, trained on the training radiographs against corners cut from them
  (outlier exposure: the only kind of garbage that is learned, because it is the only kind the
  unsupervised scores miss), refuses what looks like part of a chest; its limit also comes out of
  the validation budget.

The fitted gate lives in the bundle: :class:`GateConfig` in ``bundle.json`` (thresholds, refusal
rates) and the PCA and crop-discriminator arrays in ``gate.npz``. :meth:`cxr_core.bundle.Predictor.predict_prepared`
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
    crop_threshold: float | None = Field(None, description=(
        "limit of the crop discriminator's logit (part of a chest radiograph vs a whole one); None when the "
        "gate has no crop discriminator. Set on validation after the other rules: it may refuse what is left "
        "of the budget, at most crop_budget_share of it"))
    crop_budget_share: float = Field(0.5, ge=0, le=1)
    target_refusal: float = 0.01
    refusal_rates: dict[str, float] = Field({}, description="share refused per split when fitted")
    n_fit: int = 0


class GateVerdict(BaseModel):
    """Why an image was (not) graded; the response and the audit log carry it."""

    gradable: bool
    code: str | None = Field(None, description="blank, noise, aspect_ratio, too_small, colour_photo, "
                                               "not_a_chest_radiograph, lungs_not_found, cropped")
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
    "cropped": "the image shows part of a chest radiograph (a crop or a corner), not the whole chest",
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
class CropScore:
    """Logistic regression, whole chest radiograph (0) vs part of one (1), on standardised features.

    Stored as plain arrays (mean, scale, coefficients, intercept) so the bundle needs no pickle and
    scoring is one dot product per image."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, whole: np.ndarray, parts: np.ndarray, c: float = 0.01, seed: int = 0) -> "CropScore":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        features = np.vstack([whole, parts]).astype(np.float64)
        labels = np.r_[np.zeros(len(whole)), np.ones(len(parts))]
        scaler = StandardScaler().fit(features)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
        model.fit((features - scaler.mean_) / scale, labels)
        return cls(mean=scaler.mean_, scale=scale, coef=model.coef_[0], intercept=float(model.intercept_[0]))

    def score(self, features: np.ndarray) -> np.ndarray:
        """The logit that the image is a part of a radiograph."""
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale, f"{prefix}.coef": self.coef,
                f"{prefix}.intercept": np.asarray([self.intercept])}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "CropScore":
        return cls(mean=arrays[f"{prefix}.mean"], scale=arrays[f"{prefix}.scale"], coef=arrays[f"{prefix}.coef"],
                   intercept=float(arrays[f"{prefix}.intercept"][0]))


CROP = "crop"


def crop_features(model_feature_rows: np.ndarray, thumbnail_rows: np.ndarray) -> np.ndarray:
    """What the crop discriminator reads: the model's features and the 8x8 layout thumbnail."""
    return np.hstack([np.asarray(model_feature_rows, dtype=np.float32), thumbnail_rows])


def cut_corner(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random corner of a radiograph: any of the four, 25-55% of each side (what the crop
    discriminator learns from, and what the gate report tests it on, on other images)."""
    height, width = gray.shape
    fraction_h, fraction_w = rng.uniform(0.25, 0.55, 2)
    crop_h, crop_w = max(1, int(height * fraction_h)), max(1, int(width * fraction_w))
    corner = int(rng.integers(4))
    top = 0 if corner < 2 else height - crop_h
    left = 0 if corner % 2 == 0 else width - crop_w
    return np.ascontiguousarray(gray[top:top + crop_h, left:left + crop_w])


def corner_crops(paths: list[Path], preprocess, count: int, seed: int = 0) -> np.ndarray:
    """Prepared pixels of ``count`` corners cut from the radiographs at ``paths`` (the crop
    discriminator's negatives): any of the four corners, 25-55% of each side, half of them
    upscaled to a radiograph's size (the size rule alone must not be what refuses a corner).
    Corners the preprocessing refuses (too small to prepare) are skipped."""
    import io

    from PIL import Image

    from cxr_core.errors import InputError
    from cxr_core.preprocess import prepare_image

    rng = np.random.default_rng(seed)
    rows = []
    for index in rng.choice(len(paths), size=min(count, len(paths)), replace=False):
        image = Image.fromarray(cut_corner(np.asarray(Image.open(paths[index]).convert("L")), rng))
        if rng.random() < 0.5:
            scale = 320 / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        try:
            rows.append(prepare_image(buffer.getvalue(), preprocess).pixels)
        except InputError:
            continue
    side = preprocess.image_size
    return np.stack(rows) if rows else np.zeros((0, side, side), np.uint8)


@dataclass
class Gate:
    config: GateConfig
    scorers: dict[str, PpcaScore]
    crop: CropScore | None = None

    def scores(self, predictor, pixels: np.ndarray, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per space, the OOD score of each image; ``features`` are the model's (computed here when None)."""
        if features is None:
            features = model_features(predictor, pixels)
        layout = thumbnails(pixels)
        scores = {"model_features": self.scorers["model_features"].score(features),
                  "thumbnail": self.scorers["thumbnail"].score(layout)}
        if self.crop is not None:
            scores[CROP] = self.crop.score(crop_features(features, layout))
        return scores

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
                   **{space: round(float(values[index]), 4) for space, values in scores.items()}}
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
            elif config.crop_threshold is not None and CROP in scores and scores[CROP][index] > config.crop_threshold:
                code = "cropped"
            verdicts.append(GateVerdict(gradable=code is None, code=code, reason=REASONS.get(code or ""), scores=row))
        return verdicts

    def save(self, bundle_dir: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        for space, scorer in self.scorers.items():
            arrays.update(scorer.arrays(space))
        if self.crop is not None:
            arrays.update(self.crop.arrays(CROP))
        np.savez(Path(bundle_dir) / GATE_ARRAYS, **arrays)

    @classmethod
    def load(cls, bundle_dir: Path, config: GateConfig) -> "Gate":
        with np.load(Path(bundle_dir) / GATE_ARRAYS) as arrays:
            crop = CropScore.from_arrays(arrays, CROP) if f"{CROP}.coef" in arrays.files else None
            return cls(config=config, scorers={space: PpcaScore.from_arrays(arrays, space) for space in SPACES},
                       crop=crop)


def fit_gate(predictor, train_pixels: np.ndarray, val_pixels: np.ndarray, target_refusal: float = 0.01,
             extra_splits: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
             val_lung_failed: np.ndarray | None = None, crop_negatives: np.ndarray | None = None) -> Gate:
    """Fit on the training images, set thresholds on validation (``target_refusal`` in all).

    ``crop_negatives``: prepared corners of training radiographs (:func:`corner_crops`); with them
    the gate also gets its crop discriminator."""
    train_features, train_layout = model_features(predictor, train_pixels), thumbnails(train_pixels)
    scorers = {"model_features": PpcaScore.fit(train_features, max_components=16),
               "thumbnail": PpcaScore.fit(train_layout, max_components=48)}
    crop = None
    if crop_negatives is not None and len(crop_negatives) >= 10:
        crop = CropScore.fit(crop_features(train_features, train_layout),
                             crop_features(model_features(predictor, crop_negatives), thumbnails(crop_negatives)))
    provisional = Gate(GateConfig(scales={space: 1.0 for space in SPACES}, ood_threshold=float("inf")), scorers)
    val_scores = provisional.scores(predictor, val_pixels)
    scales = {space: float(np.quantile(val_scores[space], 0.95)) for space in SPACES}
    gate = Gate(GateConfig(scales=scales, ood_threshold=float("inf"), target_refusal=target_refusal,
                           n_fit=len(train_pixels)), scorers, crop)
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

    The image-statistics rules take their share first. Of what is left, the crop discriminator (when
    the gate has one) is kept ``crop_budget_share``; where the bundle crops to the lungs and some
    validation images' lungs were not found, those images get ``lung_failure_budget_share`` of the
    rest under a lower limit (only failed images can be refused by it); the plain OOD limit gets
    the remainder. The crop limit is set last, on the images the other rules let through, so it
    spends exactly what they left. Scorers and scales are not touched, so a bundle's thresholds can
    be re-set without refitting (:func:`main` ``thresholds``).
    """
    config = gate.config
    combined, scores = gate.combined(predictor, val_pixels)
    std, noise = image_statistics(val_pixels)
    by_rules_mask = (std < config.min_std) | (noise > config.max_noise)
    budget = max(config.target_refusal - float(np.mean(by_rules_mask)), config.target_refusal / 4)
    crop_share = config.crop_budget_share if gate.crop is not None else 0.0
    failed = np.zeros(len(combined), bool) if val_lung_failed is None else np.asarray(val_lung_failed, bool)
    lung_share = config.lung_failure_budget_share if failed.any() else 0.0
    unsupervised = budget * (1.0 - crop_share)
    config.ood_threshold = float(np.quantile(combined, 1.0 - unsupervised * (1.0 - lung_share), method="higher"))
    config.lung_failure_threshold = None
    if lung_share > 0:
        candidates = np.sort(combined[failed & (combined <= config.ood_threshold)])[::-1]
        allowed = int(lung_share * unsupervised * len(combined))
        config.lung_failure_threshold = float(candidates[allowed]) if allowed < len(candidates) else 0.0
    config.crop_threshold = None
    if gate.crop is not None:
        refused = by_rules_mask | (combined > config.ood_threshold)
        if config.lung_failure_threshold is not None:
            refused |= failed & (combined > config.lung_failure_threshold)
        allowed = max(int(np.floor((budget + float(np.mean(by_rules_mask))) * len(combined) + 1e-9))
                      - int(refused.sum()), 0)
        candidates = np.sort(scores[CROP][~refused])[::-1]
        config.crop_threshold = float(candidates[allowed]) if allowed < len(candidates) else float(candidates.min()) - 1.0


def lung_failures(records, preprocess) -> np.ndarray | None:
    """Per record: were its lung fields not found? None when the bundle does not crop to the lungs."""
    if preprocess.lung_fields == "none":
        return None
    from cxr_core.preprocess import prepare_image

    return np.asarray([prepare_image(r.path.read_bytes(), preprocess).flags.lung_segmentation_failed for r in records])


CROP_NEGATIVES = 1500


def train_corners(records, preprocess, count: int = CROP_NEGATIVES, seed: int = 0) -> np.ndarray | None:
    """The crop discriminator's negatives from a training split's records: at most ``count`` corners,
    one per radiograph and at most a third of the split (small test fits stay small); None for 0."""
    count = min(count, len(records) // 3)
    if count < 10:
        return None
    return corner_crops([record.path for record in records], preprocess, count, seed)


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
    fit.add_argument("--crop-negatives", type=int, default=CROP_NEGATIVES,
                     help="corners cut from training radiographs for the crop discriminator (0: none)")
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
        negatives = train_corners(splits["train"].records, preprocess, args.crop_negatives)
        gate = fit_gate(predictor, splits["train"].pixels, splits["val"].pixels, args.target_refusal,
                        {"test": (splits["test"].pixels, failed["test"])}, val_lung_failed=failed["val"],
                        crop_negatives=negatives)
    attach_gate(args.bundle, gate)
    print(json.dumps({"bundle": str(args.bundle), **gate.config.model_dump(mode="json")}, indent=1))


if __name__ == "__main__":
    main()
