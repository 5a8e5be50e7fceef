"""The sweep's clinically meaningful objective, computed on validation.

A screening model is judged by what it costs at the operating point we will actually use: the
specificity each disease class keeps once its threshold is set to reach the sensitivity floor
(tuberculosis first, then pneumonia), over the classes present. Higher-priority classes weigh
more (weights 1, 1/2, 1/4 ..., normalised); a floor the model cannot reach on validation costs a
full point, so such a model never wins; macro AUC breaks ties.
"""

from __future__ import annotations

from cxr_core.policy import FittedPolicy

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
