"""The drift job's configuration: thresholds and monitored columns, YAML -> pydantic, validated once.

``configs/drift.yaml`` is the default; the CronJob's ``--psi-threshold`` / ``--class-share-threshold``
/ ``--ece-threshold`` flags override the thresholds (the Helm values own them in a cluster).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cxr_core.config import YamlConfig
from cxr_core.features import IMAGE_FEATURES, QUALITY_FLAG_FEATURES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "drift.yaml"
FEEDBACK_DB_ENV = "CXR_FEEDBACK_DB"
DEFAULT_FEEDBACK_DB = "monitoring/feedback.db"


class DriftThresholds(BaseModel):
    """What makes the drift job say ``retrain``; the only input of the decision besides the numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    psi: float = Field(0.2, gt=0, description="PSI above this on a key feature means drift")
    class_share: float = Field(0.15, gt=0, lt=1, description="largest allowed move of a decided class's share")
    ece: float = Field(0.1, gt=0, lt=1, description="top-label ECE above this on confirmed labels")
    ece_binning: Literal["equal_width", "adaptive", "either"] = Field(
        "equal_width", description="which ECE the threshold applies to ('either': the larger of the two)"
    )
    key_features: list[str] = Field(
        default_factory=lambda: ["mean_intensity", "std_intensity", "dark_fraction", "bright_fraction",
                                 "border_ratio", "aspect_ratio", "p_*"],
        description="columns whose PSI can trigger retraining; shell-style patterns (p_* = every class probability)",
    )
    min_rows: int = Field(100, ge=1, description="fewer current requests: PSI and class share do not decide")
    min_labelled: int = Field(30, ge=1, description="fewer confirmed labels: ECE is not computed")

    def is_key(self, column: str) -> bool:
        return any(fnmatch.fnmatchcase(column, pattern) for pattern in self.key_features)


class TriggerConfig(BaseModel):
    """What a ``retrain`` decision starts (see monitoring.trigger)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: str = Field("small", description="training.sweep --budget for the local trigger")
    data_dir: str | None = Field(None, description="sweep data; None: DATA_DIR or ../shared/data/cxr3")
    sweep_args: list[str] = Field(default_factory=list, description="more arguments for training.sweep (local)")
    command: list[str] | None = Field(None, description="local: run this instead of training.sweep (e.g. make sweep)")
    namespace: str | None = Field(None, description="Kubernetes namespace; None: POD_NAMESPACE or the kube context's")


class DriftConfig(YamlConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: DriftThresholds = DriftThresholds()
    numerical_features: list[str] = Field(
        default_factory=lambda: [*IMAGE_FEATURES, "p_*", "confidence"],
        description="columns compared with PSI as numbers (patterns allowed)",
    )
    categorical_features: list[str] = Field(
        default_factory=lambda: ["decision", *QUALITY_FLAG_FEATURES],
        description="columns compared with PSI as categories",
    )
    ece_bins: int = Field(15, ge=2, le=100)
    feedback_db: str = Field(DEFAULT_FEEDBACK_DB, description=f"SQLite feedback store (env {FEEDBACK_DB_ENV} wins)")
    trigger: TriggerConfig = TriggerConfig()

    def with_thresholds(self, **overrides: float | None) -> "DriftConfig":
        """A copy with the given thresholds replaced (None leaves one as configured)."""
        changes = {key: value for key, value in overrides.items() if value is not None}
        if not changes:
            return self
        thresholds = DriftThresholds.model_validate(self.thresholds.model_dump() | changes)
        return self.model_copy(update={"thresholds": thresholds})

    def feedback_db_path(self) -> Path:
        configured = os.environ.get(FEEDBACK_DB_ENV) or self.feedback_db
        path = Path(configured)
        return path if path.is_absolute() else REPO_ROOT / path


def expand_columns(patterns: Iterable[str], available: Iterable[str]) -> list[str]:
    """Columns of ``available`` matching ``patterns``, in pattern order then column order."""
    available = list(available)
    found: list[str] = []
    for pattern in patterns:
        for column in available:
            if fnmatch.fnmatchcase(column, pattern) and column not in found:
                found.append(column)
    return found


def load_config(path: Path | str | None = None) -> DriftConfig:
    """Read and validate a drift YAML file (default ``configs/drift.yaml``; built-in defaults if absent)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        if path == DEFAULT_CONFIG:
            return DriftConfig()
        raise FileNotFoundError(f"drift config {path} not found")
    return DriftConfig.from_yaml(path)
