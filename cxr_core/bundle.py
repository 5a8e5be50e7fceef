"""The model bundle: a directory that holds everything serving needs, validated on load.

Training writes it; serving, evaluation, triage and monitoring only read it. Like a MONAI bundle
or torchxrayvision's weights table, the operating point (temperature, policy thresholds) ships
with the weights, so a model can never be served with another model's thresholds.

Layout::

    bundle.json      BundleManifest (schema_version, model spec, classes, preprocess, temperature,
                     fitted policy, metrics, provenance, reference profile)
    weights.pt       torch state dict            (neural families)
    model.joblib     fitted scikit-learn model   (HOG families)
    lungs.pt         lung segmenter weights      (when preprocess.lung_fields is not "none";
                     its sha256 is preprocess.lung_segmenter_sha256)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxr_core.calibration import softmax
from cxr_core.errors import InputError
from cxr_core.gate import GATE_ARRAYS, Gate, GateConfig, GateVerdict
from cxr_core.hog import HogConfig
from cxr_core.models import WEIGHTS_FILES, ModelKind, load_weights, model_kind, model_logits, model_outputs, save_weights
from cxr_core.policy import Decision, FittedPolicy
from cxr_core.preprocess import PreprocessConfig, QualityFlags, prepare_image
from cxr_core.runtime import OnnxForward, Runtime, classifier_forward

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "bundle.json"
TORCH_WEIGHTS = WEIGHTS_FILES["torch"]
SKLEARN_MODEL = WEIGHTS_FILES["sklearn_hog"]
UNGRADABLE = "ungradable"
LUNG_WEIGHTS = "lungs.pt"


class UnsupportedBundleError(ValueError):
    """The bundle was written by a schema this code does not understand."""


class ModelSpec(BaseModel):
    """How to rebuild the model: registry name + kwargs (neural) or HOG config (classical)."""

    model_config = ConfigDict(extra="forbid")

    kind: ModelKind = Field(description="the registry's kind of the family (cxr_core.models.model_kind)")
    name: str = Field(description="registry name (cnn3, efficientnet_lite0...) or hog_<classifier>")
    kwargs: dict[str, Any] = {}
    training_mode: Literal["scratch", "probe", "finetune", "classical"]
    hog: HogConfig | None = None

    @model_validator(mode="after")
    def _kind_matches_the_registry(self) -> "ModelSpec":
        if model_kind(self.name) != self.kind:
            raise ValueError(f"model {self.name!r} is a {model_kind(self.name)} family, not {self.kind}")
        return self


class Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")

    data_dir: str = ""
    data_manifest_sha256: str | None = None
    git_commit: str = "unknown"
    mlflow_run_id: str | None = None
    created_at: str = ""
    packages: dict[str, str] = {}
    train_config: dict[str, Any] = {}
    seed: int | None = None


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    model: ModelSpec
    classes: list[str]
    preprocess: PreprocessConfig
    temperature: float = Field(1.0, gt=0)
    policy: FittedPolicy
    metrics: dict[str, Any] = {}
    provenance: Provenance = Provenance()
    reference_profile: dict[str, Any] | None = Field(None, description="drift reference (monitoring)")
    gate: GateConfig | None = Field(None, description="gradability gate (cxr_core.gate); arrays in gate.npz")
    runtime: Runtime = Field("torch", description=(
        "what runs the network's forward pass when the bundle is loaded: PyTorch eager, or ONNX Runtime on a "
        "graph exported from weights.pt at load (cxr_core.runtime; same decisions on the test split, "
        "tests/test_runtime.py). Grad-CAM always uses PyTorch."))


class Prediction(BaseModel):
    """One image's answer, in the shared vocabulary every protocol translates."""

    classes: list[str]
    probabilities_raw: dict[str, float]
    probabilities: dict[str, float] = Field(description="calibrated (temperature-scaled)")
    decision: Decision
    quality: QualityFlags
    gate: GateVerdict | None = Field(None, description="the gradability gate's verdict; None without a gate")

    @property
    def gradable(self) -> bool:
        return self.gate is None or self.gate.gradable


@dataclass(frozen=True)
class BatchScores:
    """What a bundle says about a batch: (N, C) logits and probabilities, (N,) decided class indices,
    and the (N, D) features the classifier read (the gate scores them without a second pass)."""

    logits: np.ndarray
    probabilities_raw: np.ndarray
    probabilities: np.ndarray = field(repr=False)
    decisions: np.ndarray = field(repr=False)
    features: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Predictor:
    """A loaded bundle: preprocessing, model, temperature and policy behind one call."""

    manifest: BundleManifest
    model: Any = None
    path: Path | None = None
    gate: Gate | None = None
    engine: OnnxForward | None = None  # the network in ONNX Runtime (manifest.runtime); None: PyTorch

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def torch_model(self) -> torch.nn.Module | None:
        """The network, for explainers and audits that need feature maps; None for HOG families."""
        return self.model if isinstance(self.model, torch.nn.Module) else None

    @property
    def sklearn_model(self) -> Any:
        """The fitted scikit-learn pipeline of a HOG family; None for networks."""
        return None if isinstance(self.model, torch.nn.Module) else self.model

    def logits_from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 prepared pixels -> (N, C) logits."""
        return model_outputs(self.model, pixels, self.manifest.preprocess, self.manifest.model.hog,
                             engine=self.engine)[0]

    def probabilities(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw and calibrated probabilities of a logits matrix."""
        return softmax(logits, 1.0), softmax(logits, self.manifest.temperature)

    def score(self, pixels: np.ndarray) -> "BatchScores":
        """(N, H, W) prepared pixels -> logits, raw and calibrated probabilities and policy decisions, together.

        The batch API that evaluation, the robustness audits and serving share, so nobody composes
        ``logits -> softmax(T) -> decide`` by hand. The gate is not applied here (offline
        evaluation measures the model on every image; :meth:`predict_prepared` adds the gate).
        """
        logits, features = model_outputs(self.model, pixels, self.manifest.preprocess, self.manifest.model.hog,
                                         engine=self.engine)
        raw, calibrated = self.probabilities(logits)
        return BatchScores(logits=logits, probabilities_raw=raw, probabilities=calibrated,
                           decisions=self.manifest.policy.decide_indices(calibrated), features=features)

    def gate_verdicts(self, pixels: np.ndarray, flags: list[QualityFlags],
                      colourfulness: list[float] | None = None,
                      features: np.ndarray | None = None) -> list[GateVerdict | None]:
        """The gate's verdict per prepared image (``None`` each without a gate): the one call serving,
        the triage CLI and offline evaluation make, so all three refuse the same images. ``features``
        (:attr:`BatchScores.features` of the same pixels) saves the gate its own forward pass."""
        if self.gate is None:
            return [None] * len(flags)
        return self.gate.verdicts(self, pixels, [quality.aspect_ratio for quality in flags], colourfulness,
                                  [quality.lung_segmentation_failed for quality in flags],
                                  [min(quality.original_width, quality.original_height) for quality in flags],
                                  features=features)

    def predict_prepared(self, pixels: np.ndarray, flags: list[QualityFlags],
                         colourfulness: list[float] | None = None) -> list[Prediction]:
        scores = self.score(pixels)
        raw, calibrated = scores.probabilities_raw, scores.probabilities
        verdicts = self.gate_verdicts(pixels, flags, colourfulness, features=scores.features)
        results = []
        for row_raw, row_cal, quality, verdict in zip(raw, calibrated, flags, verdicts):
            probabilities_raw = {c: float(p) for c, p in zip(self.classes, row_raw)}
            probabilities = {c: float(p) for c, p in zip(self.classes, row_cal)}
            if verdict is not None and not verdict.gradable:  # no diagnosis: human review
                decision = Decision(label=UNGRADABLE, index=-1, fired_class=None, threshold=None, triage="review",
                                    gray_zone=[])
            else:
                concern = (quality.underexposed or quality.overexposed or quality.low_contrast
                           or quality.lung_segmentation_failed)
                decision = self.manifest.policy.decide(row_cal, quality_concern=concern)
            results.append(Prediction(classes=self.classes, probabilities_raw=probabilities_raw,
                                      probabilities=probabilities, decision=decision, quality=quality, gate=verdict))
        return results

    def predict_bytes(self, data: bytes) -> Prediction:
        """Bytes -> Prediction; raises :class:`InputError` for bad input."""
        prepared = prepare_image(data, self.manifest.preprocess)
        return self.predict_prepared(prepared.pixels[None], [prepared.flags], [prepared.colourfulness])[0]

    def predict_many(self, items: list[bytes]) -> list[Prediction | InputError]:
        """Batch prediction; a bad item yields its error in place, the others still run."""
        prepared, slots = [], []
        results: list[Prediction | InputError | None] = [None] * len(items)
        for position, data in enumerate(items):
            try:
                prepared.append(prepare_image(data, self.manifest.preprocess))
                slots.append(position)
            except InputError as error:
                results[position] = error
        if prepared:
            predictions = self.predict_prepared(np.stack([p.pixels for p in prepared]), [p.flags for p in prepared],
                                                [p.colourfulness for p in prepared])
            for position, prediction in zip(slots, predictions):
                results[position] = prediction
        return results  # type: ignore[return-value]


def save_bundle(path: Path | str, manifest: BundleManifest, model: Any) -> Path:
    """Write a bundle directory (manifest + the model, stored the way its kind is)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model, manifest.model.kind, path)
    save_lung_segmenter(path, manifest.preprocess)
    (path / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1) + "\n")
    return path


def save_lung_segmenter(path: Path, preprocess: PreprocessConfig) -> None:
    """Copy the segmenter the config names into the bundle, so the bundle needs nothing beside it."""
    if preprocess.lung_fields == "none":
        return
    from cxr_core.lungs import file_sha256, segmenter_for

    segmenter = segmenter_for(preprocess.lung_segmenter_sha256 or "")
    if segmenter.source is None or not segmenter.source.exists():
        raise ValueError(f"lung segmenter {segmenter.sha256[:12]}... was not loaded from a file; save it first")
    target = path / LUNG_WEIGHTS
    if segmenter.source.resolve() != target.resolve():
        target.write_bytes(segmenter.source.read_bytes())
    if file_sha256(target) != preprocess.lung_segmenter_sha256:
        raise RuntimeError(f"{target} does not hold the lung segmenter the preprocessing config names")


def load_lung_segmenter(path: Path, preprocess: PreprocessConfig) -> None:
    """Register the bundle's own segmenter copy (checked against the manifest's sha256)."""
    if preprocess.lung_fields == "none":
        return
    from cxr_core.lungs import load_segmenter_file

    weights = path / LUNG_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"bundle {path} uses lung fields but has no {LUNG_WEIGHTS}")
    load_segmenter_file(weights, preprocess.lung_segmenter_sha256)


def read_manifest(path: Path | str) -> BundleManifest:
    """Parse and validate ``bundle.json``; refuses unknown schema versions with a clear message."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path} is not a cxr-screen bundle (no {MANIFEST_NAME})")
    payload = json.loads(manifest_path.read_text())
    version = payload.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UnsupportedBundleError(
            f"bundle {path} has schema_version {version!r}; this cxr-screen understands {SCHEMA_VERSION}. "
            "Re-export the model with a matching cxr-screen version."
        )
    return BundleManifest.model_validate(payload)


def load_bundle(path: Path | str, gate: bool = True, runtime: Runtime | None = None) -> Predictor:
    """Load a bundle directory into a :class:`Predictor` (eval mode, CPU), with its gate if it has one.

    ``runtime`` overrides the manifest's (the benchmark and the parity test compare both).
    """
    path = Path(path)
    manifest = read_manifest(path)
    load_lung_segmenter(path, manifest.preprocess)
    fitted_gate = Gate.load(path, manifest.gate) if gate and manifest.gate and (path / GATE_ARRAYS).exists() else None
    spec = manifest.model
    model = load_weights(path, spec.kind, spec.name, len(manifest.classes), spec.kwargs)
    engine = None
    if (runtime or manifest.runtime) == "onnxruntime" and isinstance(model, torch.nn.Module):
        engine = classifier_forward(model, manifest.preprocess.image_size)
    return Predictor(manifest=manifest, model=model, path=path, gate=fitted_gate, engine=engine)
