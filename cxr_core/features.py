"""Per-request inference features: the row serving logs and monitoring compares.

One definition, so the drift job compares like with like: the serving audit log writes these
columns for every request, and the reference profile stored with a bundle holds the same columns
computed on the model's validation (and test) images.
"""

from __future__ import annotations

from typing import Any

from cxr_core.bundle import Prediction

# Numeric image statistics monitored for input drift.
IMAGE_FEATURES = (
    "mean_intensity", "std_intensity", "dark_fraction", "bright_fraction", "border_ratio",
    "original_width", "original_height", "aspect_ratio",
)
QUALITY_FLAG_FEATURES = ("underexposed", "overexposed", "low_contrast", "has_border")


def probability_column(class_name: str) -> str:
    return f"p_{class_name}"


def prediction_features(prediction: Prediction) -> dict[str, Any]:
    """Flat, JSON-ready feature row of one prediction (no image bytes, no identifiers)."""
    quality = prediction.quality
    row: dict[str, Any] = {name: float(getattr(quality, name)) for name in IMAGE_FEATURES}
    row.update({name: bool(getattr(quality, name)) for name in QUALITY_FLAG_FEATURES})
    row["source_format"] = quality.source_format
    row.update({probability_column(c): round(p, 6) for c, p in prediction.probabilities.items()})
    row["decision"] = prediction.decision.label
    row["triage"] = prediction.decision.triage
    row["confidence"] = round(max(prediction.probabilities.values()), 6)
    return row
