"""The sweep's clinically meaningful objective, computed on validation.

A screening model is judged by what it costs at the operating point we will actually use: the
specificity each disease class keeps once its threshold is set to reach the sensitivity floor
(tuberculosis first, then pneumonia), over the classes present. Higher-priority classes weigh
more (weights 1, 1/2, 1/4 ..., normalised); a floor the model cannot reach on validation costs a
full point, so such a model never wins; macro AUC breaks ties.

``objective_mode: worst_source`` judges a config instead by its *worst held-out source* under
leave-one-source-out (:mod:`training.robustness.loso`): a model that learned the hospital scores
well on validation and badly on an unseen hospital, and only the second number predicts go-live.
The default (``validation``) is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from cxr_core.policy import FittedPolicy

ObjectiveMode = Literal["validation", "worst_source"]
OBJECTIVE_MODES: tuple[str, ...] = ("validation", "worst_source")
DEFAULT_OBJECTIVE_MODE: ObjectiveMode = "validation"

MISSED_FLOOR_PENALTY = 1.0
AUC_TIE_BREAK = 1e-3


def clinical_objective(policy: FittedPolicy, macro_auc: float | None) -> dict[str, float]:
    ranked = [rule.name for rule in policy.ranked_present if rule.name in policy.fits]
    weights = [0.5**k for k in range(len(ranked))]
    total = sum(weights) or 1.0
    specificity = sum(w * policy.fits[name].validation_specificity for w, name in zip(weights, ranked)) / total
    missed = sum(not policy.fits[name].floor_met for name in ranked)
    objective = specificity - MISSED_FLOOR_PENALTY * missed + AUC_TIE_BREAK * float(macro_auc or 0.0)
    components = {f"val_specificity_{name}": policy.fits[name].validation_specificity for name in ranked}
    return {"objective": round(objective, 6), "weighted_specificity": round(specificity, 6),
            "floors_missed": float(missed), "val_macro_auc": float(macro_auc or 0.0), **components}


def worst_source_objective(heldout: Mapping[str, Mapping[str, Any]], floors: Mapping[str, float]) -> dict[str, float]:
    """Score of the worst (held-out source, disease class) cell at the policy thresholds.

    ``heldout`` maps each held-out source to ``{"sensitivity": {class: v}, "specificity": {class: v},
    "auc": {class: v}}`` (None where the source lacks the class), measured at the thresholds fitted
    on the validation split that remained without that source. ``floors`` are the policy floors.
    Each disease class with positives in a source scores Youden's J at the policy (sensitivity +
    specificity - 1) minus its sensitivity shortfall below the floor, so specificity bought with
    missed cases does not pay; a source scores its worst class, the objective is the worst source.
    A mean over classes or sources would let a good pneumonia result or a good hospital hide the one
    where tuberculosis is missed. The worst source's mean AUC breaks ties. All values are floats
    (logged as metrics); ``heldout_score_<source>`` names the sources.
    """
    if not heldout:
        raise ValueError("worst_source objective needs at least one held-out source")
    scores: dict[str, float] = {}
    aucs: dict[str, float] = {}
    for source, metrics in heldout.items():
        sensitivity, specificity = metrics.get("sensitivity", {}), metrics.get("specificity", {})
        cells = []
        for name, floor in floors.items():
            sens = sensitivity.get(name)
            if sens is None:
                continue
            spec = specificity.get(name)
            cells.append(sens + (spec if spec is not None else 1.0) - 1.0 - max(0.0, floor - sens))
        if cells:
            scores[source] = min(cells)
            present = [v for v in (metrics.get("auc") or {}).values() if v is not None]
            aucs[source] = sum(present) / len(present) if present else 0.0
    if not scores:
        raise ValueError("no held-out source holds a positive of a ranked disease class")
    worst = min(scores, key=lambda s: (scores[s], aucs[s]))
    result: dict[str, float] = {
        "objective": round(scores[worst] + AUC_TIE_BREAK * aucs[worst], 6),
        "worst_source_score": round(scores[worst], 6),
        "mean_source_score": round(sum(scores.values()) / len(scores), 6),
    }
    result.update({f"heldout_score_{source}": round(score, 6) for source, score in scores.items()})
    return result


def select_objective(mode: str, policy: FittedPolicy, macro_auc: float | None,
                     heldout: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """``objective_mode`` dispatch: ``validation`` (the default above) or ``worst_source``."""
    if mode == "validation":
        return clinical_objective(policy, macro_auc)
    if mode == "worst_source":
        if heldout is None:
            raise ValueError("objective_mode worst_source needs leave-one-source-out results (training.robustness.loso)")
        return worst_source_objective(heldout, policy.config.floors)
    raise ValueError(f"unknown objective_mode {mode!r}; use one of {', '.join(OBJECTIVE_MODES)}")
