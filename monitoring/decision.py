"""The retrain decision: a pure function of the drift snapshot's numbers and the thresholds.

``summary_from_snapshot`` reads the numbers out of an Evidently snapshot (``Snapshot.dict()``):
PSI per column, decided-class shares and their shift, ECE. ``decide`` compares them with
:class:`~monitoring.config.DriftThresholds`. Neither touches files, servers or Evidently objects,
so the rule is tested on plain dicts.

Exit status of ``python -m monitoring.drift`` (for a scheduler): 0 = ``ok``, 3 = ``retrain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from monitoring.config import DriftThresholds

EXIT_OK = 0
EXIT_RETRAIN = 3
EXIT_CODES = {"ok": EXIT_OK, "retrain": EXIT_RETRAIN}

_TYPE_PREFIX = "evidently:metric_v2:"


def _metric_type(metric: dict[str, Any]) -> str:
    return str(metric.get("config", {}).get("type", "")).removeprefix(_TYPE_PREFIX)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def summary_from_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a drift snapshot (``Snapshot.dict()``) that the decision reads.

    Returns ``{"psi": {column: value}, "class_share": {class: {"reference", "current", "shift"}},
    "ece": {"current": {"equal_width", "adaptive"} | None, "reference": ... | None}}``.
    """
    psi: dict[str, float] = {}
    shares: dict[str, dict[str, float]] = {}
    ece: dict[str, dict[str, float] | None] = {"current": None, "reference": None}
    for metric in snapshot.get("metrics", []):
        kind, config, value = _metric_type(metric), metric.get("config", {}), metric.get("value")
        if kind == "ValueDrift" and str(config.get("method")) == "psi":
            psi[config["column"]] = _number(value)
        elif kind == "DecidedClassShare":
            for label, share in value.items():
                shares.setdefault(label, {})[config.get("dataset", "current")] = _number(share)
        elif kind == "DecidedClassShareShift":
            for label, shift in value.items():
                shares.setdefault(label, {})["shift"] = _number(shift)
        elif kind == "CalibrationError":
            binning = "adaptive" if config.get("adaptive") else "equal_width"
            slot = ece.setdefault(config.get("dataset", "current"), None) or {}
            slot[binning] = _number(value)
            ece[config.get("dataset", "current")] = slot
    return {"psi": psi, "class_share": shares, "ece": ece}


@dataclass
class Check:
    """One comparison of a number with its threshold."""

    kind: Literal["psi", "class_share", "ece"]
    name: str
    value: float | None
    threshold: float
    exceeded: bool
    key: bool = True
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "value": self.value, "threshold": self.threshold,
                "exceeded": self.exceeded, "key": self.key, **({"note": self.note} if self.note else {})}


@dataclass
class DriftDecision:
    decision: Literal["ok", "retrain"]
    reasons: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.decision]

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "exit_code": self.exit_code, "reasons": self.reasons,
                "notes": self.notes, "checks": [check.as_dict() for check in self.checks]}


def _ece_value(ece: dict[str, float | None], binning: str) -> tuple[str, float | None]:
    if binning == "either":
        values = {k: v for k, v in ece.items() if k in ("equal_width", "adaptive") and v is not None}
        if not values:
            return "either", None
        name = max(values, key=values.get)
        return name, values[name]
    return binning, ece.get(binning)


def decide(summary: dict[str, Any], thresholds: DriftThresholds) -> DriftDecision:
    """``retrain`` when a key feature's PSI, a decided class's share shift or the ECE is over its threshold.

    Reads ``summary["psi"]``, ``summary["class_share"]``, ``summary["ece"]["current"]`` and the row
    counts ``summary["rows"]["current"]`` / ``summary["ece"]["current"]["n_labelled"]``: with fewer
    current rows than ``thresholds.min_rows`` PSI and class share do not decide, with fewer labels
    than ``thresholds.min_labelled`` ECE does not (both leave a note). A threshold is exceeded
    strictly (``value > threshold``).
    """
    checks: list[Check] = []
    notes: list[str] = []
    rows = (summary.get("rows") or {}).get("current")
    enough_rows = rows is None or rows >= thresholds.min_rows
    if not enough_rows:
        notes.append(f"{rows} current requests < min_rows {thresholds.min_rows}: PSI and class share do not decide")

    for column, value in sorted((summary.get("psi") or {}).items()):
        key = thresholds.is_key(column)
        exceeded = value is not None and value > thresholds.psi
        checks.append(Check("psi", column, value, thresholds.psi, exceeded and key and enough_rows, key=key))

    for label, share in sorted((summary.get("class_share") or {}).items()):
        shift = share.get("shift")
        exceeded = shift is not None and abs(shift) > thresholds.class_share
        checks.append(Check("class_share", label, shift, thresholds.class_share, exceeded and enough_rows))

    ece = (summary.get("ece") or {}).get("current")
    if ece:
        n_labelled = ece.get("n_labelled")
        binning, value = _ece_value(ece, thresholds.ece_binning)
        if n_labelled is not None and n_labelled < thresholds.min_labelled:
            notes.append(f"{n_labelled} labelled requests < min_labelled {thresholds.min_labelled}: ECE does not decide")
            checks.append(Check("ece", binning, value, thresholds.ece, False, note="too few labels"))
        else:
            checks.append(Check("ece", binning, value, thresholds.ece, value is not None and value > thresholds.ece))
    else:
        notes.append("no ECE: no (or too few) requests with a confirmed label")

    reasons = []
    for check in checks:
        if not check.exceeded:
            continue
        if check.kind == "psi":
            reasons.append(f"PSI of key feature {check.name} = {check.value:.3f} > {check.threshold}")
        elif check.kind == "class_share":
            reasons.append(f"share of decided class {check.name} moved {check.value:+.3f} (> {check.threshold})")
        else:
            reasons.append(f"ECE ({check.name}) = {check.value:.3f} > {check.threshold} on confirmed labels")
    return DriftDecision("retrain" if reasons else "ok", reasons, checks, notes)
