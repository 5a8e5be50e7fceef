"""Settings of the robustness suite, loaded from ``configs/robustness.yaml``.

Validated once here; the modules below trust them. Every field has a default, so an empty file
(or no file) runs the documented protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxr_core.config import YamlConfig

DEFAULT_CONFIG_PATH = Path("configs/robustness.yaml")


class FoldSpec(BaseModel):
    """One leave-one-source-out fold: train without ``holdout``, test on it."""

    model_config = ConfigDict(extra="forbid")

    holdout: str = Field(description="manifest source_dataset to hold out")
    drop_duplicates_of_holdout: bool = Field(
        True, description="also leave out training images whose manifest says a copy existed in the held-out source",
    )
    partner_reference: bool = Field(
        True, description="if the held-out source has no reference-class (normal) images, test its positives "
                          "against same-age-group reference images from the other sources' test split",
    )
    note: str = ""


class LosoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folds: list[FoldSpec] = [
        FoldSpec(holdout="tbx11k"), FoldSpec(holdout="tbdb"), FoldSpec(holdout="kaggle-cxr"),
        FoldSpec(holdout="kermany", drop_duplicates_of_holdout=False),
    ]
    include_all_sources: bool = Field(True, description="also train on every source (standard splits): test AUC, bundles")
    run_overrides: dict[str, Any] = Field(
        {"figures": False, "n_bootstrap": 0}, description="TrainConfig overrides for every LOSO run (speed)",
    )
    reference_class: str = "normal"
    target_class: str = Field("tuberculosis", description="the class whose worst-source sensitivity is headlined")


class MitigationSpec(BaseModel):
    """A shortcut mitigation, as data: TrainConfig overrides plus what a wrapper must materialize.

    ``overrides`` are ordinary TrainConfig fields (``preprocess.clahe``, ``augment.*``,
    ``source_balanced_sampler``, ``augment_copies``) — deployable by a config change; every training
    mode honours them (classical and probe through :mod:`training.materialize`). ``chest_crop``
    (fraction cut from every side of the prepared image, all splits) is experimental: no
    PreprocessConfig field carries it into a bundle yet.
    """

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    overrides: dict[str, Any] = {}
    chest_crop: float = Field(0.0, ge=0.0, lt=0.3)

    @property
    def deployable(self) -> bool:
        return self.chest_crop == 0.0


class PerturbConfig(BaseModel):
    """Graded severities per perturbation; the first level of each must be the identity."""

    model_config = ConfigDict(extra="forbid")

    severities: dict[str, list[float]] = {
        "gaussian_noise": [0, 4, 8, 16, 32],          # sigma, 8-bit levels
        "blur": [0, 1, 2, 4, 8],                      # Gaussian sigma, pixels at a 256 px shorter side
        "jpeg": [0, 75, 50, 25, 10],                  # re-compression quality (0 = none)
        "gamma_dark": [1, 1.25, 1.5, 2.0, 2.5],       # gamma > 1 darkens
        "gamma_bright": [1, 0.8, 0.67, 0.5, 0.4],     # gamma < 1 brightens
        "contrast": [1, 0.8, 0.6, 0.4, 0.25],         # factor around the mean
        "rotation": [0, 2.5, 5, 7.5, 10],             # degrees
        "black_border": [0, 0.05, 0.1, 0.15, 0.2],    # frame width, fraction of each side
        "burned_text": [0, 1, 2, 3, 4],               # marker + annotation size (0 = none)
        "resample": [1, 0.75, 0.5, 0.35, 0.25],       # down-and-up factor of the original size
    }
    sensitivity_floor: float = Field(0.90, gt=0, le=1, description="report the first severity below this")
    drop_margin: float = Field(0.05, gt=0, le=1, description="and the first severity losing this much")

    @field_validator("severities")
    @classmethod
    def _identity_first(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        from training.robustness.perturb import IDENTITY, PERTURBATIONS

        for name, levels in value.items():
            if name not in PERTURBATIONS:
                raise ValueError(f"unknown perturbation {name!r}; known: {sorted(PERTURBATIONS)}")
            if not levels or levels[0] != IDENTITY[name]:
                raise ValueError(f"perturbation {name!r} must start at its identity level {IDENTITY[name]}")
        return value


class ShortcutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    probe_splits: list[str] = Field(["val", "test"], description="images the linear probes are fitted on (CV)")
    cv_folds: int = Field(5, ge=2)
    probe_c: float = Field(0.1, gt=0, description="inverse L2 strength of the probe's logistic regression")
    mask_split: str = "test"
    gradcam_split: str = "test"
    gradcam_per_class: int = Field(60, ge=1, description="Grad-CAM images per class (CPU cost)")


class RobustnessConfig(YamlConfig):
    model_config = ConfigDict(extra="forbid")

    loso: LosoConfig = LosoConfig()
    mitigations: dict[str, MitigationSpec] = {"baseline": MitigationSpec(description="the family config as is")}
    perturb: PerturbConfig = PerturbConfig()
    shortcuts: ShortcutConfig = ShortcutConfig()

    @model_validator(mode="after")
    def _check(self) -> "RobustnessConfig":
        if "baseline" not in self.mitigations:
            raise ValueError("mitigations must include 'baseline' (the unchanged family config)")
        return self

    @classmethod
    def from_yaml(cls, path: Path | str | None, overrides: dict[str, Any] | None = None) -> "RobustnessConfig":
        """The file's config; the built-in defaults where there is no file (a checkout without one)."""
        if path is None or not Path(path).exists():
            return cls.validate_or_explain(overrides or {}, "robustness defaults")
        return super().from_yaml(path, overrides)
