"""The operating point: temperature plus fitted policy thresholds, fitted together in one place.

Training (on its validation split), site re-calibration (on a hospital's labelled images) and
leave-one-source-out (through training, on what each fold leaves) all fit the same two things in
the same order: the temperature first (validation NLL), then the thresholds on the
*temperature-scaled* probabilities, because the policy reads calibrated probabilities at serving
time. One function keeps that order from drifting apart between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr_core.calibration import fit_temperature, softmax
from cxr_core.policy import FittedPolicy, PolicyConfig, fit_policy_thresholds


@dataclass(frozen=True)
class OperatingPoint:
    temperature: float
    policy: FittedPolicy


def fit_operating_point(logits: np.ndarray, labels: np.ndarray, classes: list[str], config: PolicyConfig,
                        temperature: float | None = None) -> OperatingPoint:
    """Fit the temperature (unless one is given, e.g. kept from the bundle), then the thresholds."""
    if temperature is None:
        temperature = fit_temperature(logits, labels)
    policy = fit_policy_thresholds(softmax(logits, temperature), labels, classes, config)
    return OperatingPoint(temperature=float(temperature), policy=policy)
