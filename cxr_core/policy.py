"""Risk-prioritized decision policy: trade specificity for sensitivity on purpose.

A missed tuberculosis case costs far more than a false alarm, so the decision is not argmax.
Classes are ranked (default: tuberculosis, then pneumonia, then normal); each ranked disease
class gets a threshold fitted on validation so that its sensitivity reaches a floor; at inference
the first class in priority order whose calibrated probability reaches its threshold wins, else
the fallback (last) class.

Thresholds are fitted hierarchically: a pneumonia case that the tuberculosis rule captures is a
missed pneumonia, so each class is fitted on what the classes above it leave. A safety rule
(margin or Wilson lower confidence bound) aims above the floor so it still holds on unseen data.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

TriageLevel = Literal["urgent", "review", "routine"]


class ClassRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    min_sensitivity: float | None = Field(None, ge=0, le=1, description="floor; None for the fallback class")
    triage: TriageLevel = "urgent"


class PolicyConfig(BaseModel):
    """Priority order, floors and the safety rule. Lives in the bundle next to the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    priority: list[ClassRule] = [
        ClassRule(name="tuberculosis", min_sensitivity=0.90, triage="urgent"),
        ClassRule(name="pneumonia", min_sensitivity=0.85, triage="urgent"),
        ClassRule(name="normal", min_sensitivity=None, triage="routine"),
    ]
    safety: Literal["none", "margin", "wilson_lcb"] = Field(
        "margin", description="aim above the floor: by a fixed margin or by a lower confidence bound"
    )
    margin: float = Field(0.03, ge=0, le=0.5)
    confidence: float = Field(0.90, gt=0.5, lt=1, description="one-sided level of the Wilson bound")
    gray_zone: float = Field(0.05, ge=0, le=0.5, description="probability distance to a threshold that asks for review")

    @model_validator(mode="after")
    def _check(self) -> "PolicyConfig":
        names = [rule.name for rule in self.priority]
        if len(set(names)) != len(names):
            raise ValueError(f"policy priority lists a class twice: {names}")
        if len(self.priority) < 2:
            raise ValueError("policy needs at least one ranked class and a fallback class")
        if any(rule.min_sensitivity is None for rule in self.priority[:-1]):
            raise ValueError("every class but the last (fallback) needs a min_sensitivity")
        return self

    @property
    def ranked(self) -> list[ClassRule]:
        return self.priority[:-1]

    @property
    def fallback(self) -> ClassRule:
        return self.priority[-1]

    @property
    def floors(self) -> dict[str, float]:
        return {rule.name: float(rule.min_sensitivity) for rule in self.ranked}


class ClassFit(BaseModel):
    threshold: float
    target_sensitivity: float
    validation_sensitivity: float
    validation_specificity: float
    positives: int
    floor_met: bool


class FittedPolicy(BaseModel):
    """A policy with thresholds fitted for a model's classes."""

    model_config = ConfigDict(extra="forbid")

    config: PolicyConfig
    classes: list[str] = Field(description="the model's output classes, in output order")
    thresholds: dict[str, float]
    fits: dict[str, ClassFit] = {}
    missing_classes: list[str] = Field([], description="classes the policy ranks that the model lacks")
    unranked_classes: list[str] = Field([], description="model classes the policy does not rank")
    warnings: list[str] = []

    @property
    def ranked_present(self) -> list[ClassRule]:
        return [rule for rule in self.config.ranked if rule.name in self.classes]

    def fallback_indices(self) -> list[int]:
        """Classes decided by argmax when no threshold fires."""
        names = [self.config.fallback.name] if self.config.fallback.name in self.classes else []
        names += self.unranked_classes
        return [self.classes.index(name) for name in names] or list(range(len(self.classes)))

    def decide_indices(self, probs: np.ndarray) -> np.ndarray:
        """Vectorised hierarchical decision for an (N, C) matrix of calibrated probabilities."""
        probs = np.asarray(probs, dtype=np.float64)
        fallback = np.asarray(self.fallback_indices())
        decision = fallback[np.argmax(probs[:, fallback], axis=1)]
        undecided = np.ones(len(probs), dtype=bool)
        for rule in self.ranked_present:
            index = self.classes.index(rule.name)
            fires = undecided & (probs[:, index] >= self.thresholds[rule.name])
            decision[fires] = index
            undecided &= ~fires
        return decision

    def decide(self, probs: np.ndarray, quality_concern: bool = False) -> "Decision":
        """Decision for one row of calibrated probabilities, with triage level and gray zone."""
        row = np.asarray(probs, dtype=np.float64).reshape(-1)
        index = int(self.decide_indices(row[None, :])[0])
        label = self.classes[index]
        fired = next((r for r in self.ranked_present if r.name == label and row[index] >= self.thresholds[label]), None)
        gray = [
            rule.name
            for rule in self.ranked_present
            if near_threshold(row[self.classes.index(rule.name)], self.thresholds[rule.name], self.config.gray_zone)
        ]
        rules = {rule.name: rule for rule in self.config.priority}
        triage: TriageLevel = rules[label].triage if label in rules else "review"
        if triage == "routine" and (gray or quality_concern):
            triage = "review"
        return Decision(
            label=label,
            index=index,
            fired_class=fired.name if fired else None,
            threshold=self.thresholds.get(fired.name) if fired else None,
            triage=triage,
            gray_zone=gray,
        )


class Decision(BaseModel):
    label: str
    index: int
    fired_class: str | None = Field(description="the class whose threshold fired; None when the fallback decided")
    threshold: float | None
    triage: TriageLevel
    gray_zone: list[str] = Field(description="ranked classes whose probability is near their threshold")


def near_threshold(probabilities: np.ndarray | float, threshold: float, margin: float) -> np.ndarray | bool:
    """The gray zone: a probability within ``margin`` of its class's threshold, on either side.

    Serving asks for review there, and evaluation lists those images; both call this.
    """
    return np.abs(np.asarray(probabilities, dtype=np.float64) - threshold) <= margin


def wilson_lower_bound(successes: int, total: int, confidence: float) -> float:
    """One-sided Wilson score lower bound of a proportion."""
    if total == 0:
        return 0.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(confidence)
    p = successes / total
    denominator = 1 + z * z / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (centre - spread) / denominator


def _meets(captured: int, positives: int, floor: float, config: PolicyConfig) -> bool:
    if config.safety == "wilson_lcb":
        return wilson_lower_bound(captured, positives, config.confidence) >= floor
    target = floor + (config.margin if config.safety == "margin" else 0.0)
    return captured / positives >= min(target, 1.0) - 1e-12


def fit_policy_thresholds(probs: np.ndarray, labels: np.ndarray, classes: list[str], config: PolicyConfig) -> FittedPolicy:
    """Fit one threshold per ranked class on validation: the highest that meets its floor.

    Sequential one-vs-rest sweeps in priority order, each over the rows the classes above leave.
    A floor that cannot be met is reported (``floor_met=False`` and a warning), never hidden.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    policy_names = [rule.name for rule in config.priority]
    missing = [name for name in policy_names if name not in classes]
    unranked = [name for name in classes if name not in policy_names]
    warnings = []
    if missing:
        warnings.append(f"policy ranks classes the model does not have: {missing}")
    if unranked:
        warnings.append(f"model classes the policy does not rank (decided by argmax with the fallback): {unranked}")
    thresholds: dict[str, float] = {}
    fits: dict[str, ClassFit] = {}
    remaining = np.ones(len(labels), dtype=bool)
    for rule in config.ranked:
        if rule.name not in classes:
            continue
        index = classes.index(rule.name)
        is_positive = labels == index
        positives = int(is_positive.sum())
        floor = float(rule.min_sensitivity)
        if positives == 0:
            thresholds[rule.name] = 0.5
            warnings.append(f"{rule.name}: no validation cases, threshold left at 0.5 (floor not verified)")
            fits[rule.name] = ClassFit(threshold=0.5, target_sensitivity=floor, validation_sensitivity=float("nan"),
                                       validation_specificity=float("nan"), positives=0, floor_met=False)
            continue
        candidates = np.sort(np.unique(probs[remaining & is_positive, index]))[::-1]
        chosen = None
        for threshold in candidates:
            captured = int((remaining & is_positive & (probs[:, index] >= threshold)).sum())
            if _meets(captured, positives, floor, config):
                chosen = float(threshold)
                break
        floor_met = chosen is not None
        if chosen is None:
            chosen = float(candidates[-1]) if candidates.size else 0.0
            warnings.append(
                f"{rule.name}: sensitivity floor {floor:.2f} cannot be met on validation "
                f"(higher-priority classes capture too many {rule.name} cases); threshold set to catch all it can"
            )
        fires = remaining & (probs[:, index] >= chosen)
        negatives = ~is_positive
        fits[rule.name] = ClassFit(
            threshold=chosen,
            target_sensitivity=floor,
            validation_sensitivity=float((fires & is_positive).sum() / positives),
            validation_specificity=float((~fires & negatives).sum() / max(int(negatives.sum()), 1)),
            positives=positives,
            floor_met=floor_met,
        )
        thresholds[rule.name] = chosen
        remaining &= ~fires
    for message in warnings:
        log.warning("policy: %s", message)
    return FittedPolicy(
        config=config, classes=list(classes), thresholds=thresholds, fits=fits,
        missing_classes=missing, unranked_classes=unranked, warnings=warnings,
    )
