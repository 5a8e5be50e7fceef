"""Typed training configuration, loaded from YAML (``configs/train/*.yaml``).

Validated once at the edge; the training code below trusts it. The whole config is logged to
MLflow and stored in the bundle's provenance, so every model says how it was made.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxr_core.config import YamlConfig
from cxr_core.hog import HogConfig
from cxr_core.models import list_models, model_kind
from cxr_core.policy import PolicyConfig
from cxr_core.preprocess import PreprocessConfig

TrainingMode = Literal["scratch", "probe", "finetune", "classical"]


class AugmentConfig(BaseModel):
    """On-the-fly augmentation of cached uint8 pixels (training split only)."""

    model_config = ConfigDict(extra="forbid")

    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    rotation_degrees: float = Field(7.0, ge=0, le=30)
    brightness: float = Field(0.1, ge=0, le=0.5, description="max additive shift, fraction of full scale")
    contrast: float = Field(0.1, ge=0, le=0.5, description="max multiplicative change around the mean")
    blur_probability: float = Field(0.1, ge=0, le=1)
    blur_sigma: float = Field(1.0, gt=0)
    clahe_probability: float = Field(0.0, ge=0, le=1, description="probabilistic CLAHE")
    downscale_probability: float = Field(0.0, ge=0, le=1, description="down-and-up resampling (hides resolution)")
    downscale_min: float = Field(0.35, gt=0, lt=1, description="smallest resampling factor")


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0)
    backbone_lr_multiplier: float = Field(0.1, gt=0, le=1, description="fine-tune: backbone lr = lr x this")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.5, ge=0)
    grad_clip: float = Field(1.0, gt=0)


class ClassicalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hog: HogConfig = HogConfig()
    c: float = Field(1.0, gt=0, description="inverse regularisation (logistic regression)")
    hidden: int = Field(128, ge=4, description="MLP hidden units")
    n_estimators: int = Field(300, ge=10, description="random forest trees")


class SubsetConfig(BaseModel):
    """Seeded per-class sampling, for tests and quick sweeps; None = the full split."""

    model_config = ConfigDict(extra="forbid")

    train: int | None = None
    val: int | None = None
    test: int | None = None


class TrainConfig(YamlConfig):
    model_config = ConfigDict(extra="forbid")

    run_name: str = "train"
    model: str = Field("cnn3", description="registry name (cnn3, efficientnet_lite0, resnet18...) or hog_*")
    mode: TrainingMode = "scratch"
    model_kwargs: dict[str, Any] = {}
    pretrained: bool = False
    weights_path: str | None = None
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    classical: ClassicalConfig = ClassicalConfig()
    policy: PolicyConfig = PolicyConfig()
    subset: SubsetConfig = SubsetConfig()
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    label_smoothing: float = Field(0.05, ge=0, lt=0.5)
    class_weighted_loss: bool = True
    weighted_sampler: bool = False
    source_balanced_sampler: bool = False
    augment_copies: int = Field(1, ge=0, le=4, description=(
        "classical / probe: resolution-augmented copies of the training split, made when "
        "augment.downscale_probability > 0 (training.materialize)"))
    patience: int = Field(4, ge=1, description="early stopping: epochs without val macro-F1 gain")
    unfreeze_every: int = Field(1, ge=1, description="fine-tune: epochs between unfreezing backbone stages")
    head_warmup_epochs: int | None = Field(None, ge=0, description=(
        "fine-tune: epochs that train only the new head, then the whole network at once (end to end); "
        "None keeps the stage-by-stage unfreezing of unfreeze_every"))
    samples_per_epoch: int | None = Field(None, ge=1, description=(
        "images drawn per epoch by the (weighted) sampler, with replacement; None = one pass over the split. "
        "Decouples an epoch's cost from the split size, so a CPU run fits its time budget"))
    channels_last: bool = Field(False, description="train in channels_last memory format (faster convolutions on CPU)")
    probe_epochs: int = Field(300, ge=1, description="linear probe head: full-batch steps")
    seed: int = 20240611
    num_threads: int = Field(2, ge=1)
    n_bootstrap: int = Field(1000, ge=0)
    exclusions: str | None = Field("reports/audit/exclusions.json", description="audit exclusion list")
    figures: bool = True
    experiment: str = "cxr-screen"

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        classical = model_kind(self.model) == "sklearn_hog"  # an unknown name is refused here
        if classical and self.mode != "classical":
            raise ValueError(f"{self.model} is a classical model: set mode: classical")
        if self.mode == "classical" and not classical:
            raise ValueError(f"mode classical needs one of {list_models('sklearn_hog')}")
        if self.mode == "probe" and self.model == "cnn3":
            raise ValueError("a linear probe needs a backbone with learned features, not cnn3")
        return self

    @property
    def family(self) -> str:
        """Model family name as reported (e.g. efficientnet_lite0-probe)."""
        return family_name(self.model, self.mode)


def family_name(model: str, mode: str | None) -> str:
    """The family a model is reported under: the model alone when trained from scratch or classical,
    else model-mode (efficientnet_lite0-finetune). One rule for training configs and bundles."""
    return model if mode in (None, "scratch", "classical") else f"{model}-{mode}"
