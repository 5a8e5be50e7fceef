"""The serving audit log as a per-request feature table, and the time windows the drift job compares.

The audit log (JSON lines of :class:`cxr_core.audit.AuditRecord`, written by serving; ``CXR_AUDIT_LOG``)
holds one line per answered image or refused request: ``request_id``, ``time`` (UTC ISO 8601),
``model_name``, ``model_version``, ``caller_id``, ``latency_ms`` and, for an answered image, the
:func:`cxr_core.features.prediction_features` columns (image statistics, quality flags, calibrated
probability per class, decision, triage, confidence). A refused request (``event: error``) has
no features: it is counted, never compared.

Windows: the last N requests, the last D days before ``now``, or an explicit ``[start, end)`` range;
``offset=1`` gives the window just before (yesterday for a daily CronJob).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from cxr_core.audit import UnsupportedAuditVersion, audit_log_files, iter_audit_lines, parse_audit_line
from cxr_core.features import IMAGE_FEATURES, QUALITY_FLAG_FEATURES

log = logging.getLogger(__name__)

AUDIT_COLUMNS = ("request_id", "time", "model_name", "model_version", "caller_id", "latency_ms")
LABEL_COLUMN = "label"


@dataclass
class FeatureTable:
    """Feature rows (one per answered request) plus what was left out while reading them."""

    frame: pd.DataFrame
    source: str
    files: list[str] = field(default_factory=list)
    n_lines: int = 0
    n_errors: int = 0
    n_malformed: int = 0

    @property
    def classes(self) -> list[str]:
        return probability_classes(self.frame)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "files": len(self.files), "lines": self.n_lines,
                "rows": int(len(self.frame)), "errors": self.n_errors, "malformed": self.n_malformed}


def probability_classes(frame: pd.DataFrame) -> list[str]:
    """Class names from the ``p_<class>`` columns, in column order."""
    return [column[2:] for column in frame.columns if column.startswith("p_")]


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Typed columns: UTC times, float statistics and probabilities, boolean flags, string ids."""
    frame = frame.copy()
    if "time" in frame:
        frame["time"] = pd.to_datetime(frame["time"], utc=True, errors="coerce", format="ISO8601")
    for column in [*IMAGE_FEATURES, "confidence", "latency_ms", *[c for c in frame if c.startswith("p_")]]:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for column in QUALITY_FLAG_FEATURES:
        if column in frame:
            frame[column] = frame[column].map(
                lambda v: v if isinstance(v, bool) else str(v).strip().lower() in ("true", "1")).astype(bool)
    for column in ("request_id", "model_name", "model_version", "caller_id", "decision", "triage"):
        if column in frame:
            frame[column] = frame[column].astype("string")
    if LABEL_COLUMN in frame:
        frame[LABEL_COLUMN] = frame[LABEL_COLUMN].astype("string").replace("", pd.NA)
    if "time" in frame:
        frame = frame.sort_values("time", kind="stable", na_position="first").reset_index(drop=True)
    return frame


def read_audit_log(path: Path | str) -> FeatureTable:
    """Audit log file or folder -> :class:`FeatureTable` of the answered images.

    Every line is read as the shared-core :class:`cxr_core.audit.AuditRecord` (what serving and the
    offline replay write). Error lines (refused requests) are counted, never compared; a line that
    is not a record is counted as malformed and skipped; a line of an unknown schema version stops
    the job with :class:`cxr_core.audit.UnsupportedAuditVersion` (a newer writer: upgrade, do not guess).
    """
    files = audit_log_files(path)
    rows: list[dict[str, Any]] = []
    n_lines = n_errors = n_malformed = 0
    for where, line in iter_audit_lines(path):
        n_lines += 1
        try:
            record = parse_audit_line(line, where)
        except UnsupportedAuditVersion:
            raise
        except ValueError as error:  # JSON or validation error
            n_malformed += 1
            log.warning("%s is not an audit record (%s); skipped", where, type(error).__name__)
            continue
        if record.event == "error":
            n_errors += 1
            continue
        if record.event != "prediction":  # metadata / health requests: no image, nothing to profile
            continue
        if "decision" not in record.features:
            n_malformed += 1
            log.warning("%s is a prediction line without features; skipped", where)
            continue
        rows.append(record.model_dump(mode="json"))
    frame = _normalise(pd.DataFrame(rows)) if rows else pd.DataFrame(columns=list(AUDIT_COLUMNS))
    if n_errors or n_malformed:
        log.info("audit log %s: %d lines, %d error lines, %d malformed", path, n_lines, n_errors, n_malformed)
    return FeatureTable(frame=frame, source=str(path), files=[str(f) for f in files], n_lines=n_lines,
                        n_errors=n_errors, n_malformed=n_malformed)


def read_feature_csv(path: Path | str) -> FeatureTable:
    """A feature table saved as CSV (a bundle's reference profile, an exported window)."""
    frame = pd.read_csv(path, keep_default_na=True, dtype={"request_id": str, LABEL_COLUMN: str})
    return FeatureTable(frame=_normalise(frame), source=str(path), files=[str(path)], n_lines=len(frame))


def load_features(path: Path | str) -> FeatureTable:
    """A CSV feature table, an audit-log file, or a folder of audit logs."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_feature_csv(path)
    return read_audit_log(path)


# --- windows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSpec:
    """Which requests to compare: all, the last N, the last D days, or ``[start, end)``."""

    last_n: int | None = None
    last_days: float | None = None
    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        chosen = sum(x is not None for x in (self.last_n, self.last_days)) + (
            1 if self.start is not None or self.end is not None else 0)
        if chosen > 1:
            raise ValueError("choose one window: last N requests, last D days, or a start/end range")
        if self.last_n is not None and self.last_n < 1:
            raise ValueError("last_n must be at least 1")
        if self.last_days is not None and self.last_days <= 0:
            raise ValueError("last_days must be positive")
        if (self.start is None) != (self.end is None):
            raise ValueError("a range needs both start and end")
        if self.start is not None and self.end is not None and _utc(self.end) <= _utc(self.start):
            raise ValueError("the range end must be after its start")

    @property
    def kind(self) -> Literal["all", "last_n", "last_days", "range"]:
        if self.last_n is not None:
            return "last_n"
        if self.last_days is not None:
            return "last_days"
        if self.start is not None:
            return "range"
        return "all"


@dataclass(frozen=True)
class Window:
    """The requests one window selected, and its bounds (for the report)."""

    frame: pd.DataFrame
    kind: str
    offset: int
    start: datetime | None
    end: datetime | None

    def describe(self) -> dict[str, Any]:
        times = self.frame["time"].dropna() if "time" in self.frame else pd.Series(dtype="datetime64[ns, UTC]")
        return {
            "kind": self.kind,
            "offset": self.offset,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "rows": int(len(self.frame)),
            "first_request": _iso(times.min()) if len(times) else None,
            "last_request": _iso(times.max()) if len(times) else None,
        }


def _utc(value: datetime | str | pd.Timestamp) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _iso(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NaT:
        return None
    return _utc(value).isoformat()


def select_window(frame: pd.DataFrame, spec: WindowSpec, now: datetime | None = None, offset: int = 0) -> Window:
    """The rows of ``spec``'s window; ``offset=k`` shifts it k window lengths back in time.

    ``last_n``: the N most recent requests (offset 1: the N before those). ``last_days``: requests
    with ``now - D days <= time < now`` (``now`` defaults to the current UTC time). A range:
    ``start <= time < end`` (offset 1: the equally long range ending at ``start``).
    """
    if offset < 0:
        raise ValueError("offset must be >= 0")
    kind = spec.kind
    if kind == "all":
        if offset:
            raise ValueError("the whole log has no previous window; choose last N, last D days or a range")
        return Window(frame=frame.reset_index(drop=True), kind=kind, offset=0, start=None, end=None)
    if kind == "last_n":
        ordered = frame.sort_values("time", kind="stable") if "time" in frame else frame
        stop = len(ordered) - offset * spec.last_n
        begin = max(stop - spec.last_n, 0)
        selected = ordered.iloc[begin:max(stop, 0)]
        times = selected["time"] if "time" in selected else pd.Series(dtype=object)
        start = times.min() if len(times) else None
        end = times.max() if len(times) else None
        return Window(frame=selected.reset_index(drop=True), kind=kind, offset=offset, start=start, end=end)
    if "time" not in frame:
        raise ValueError("a time window needs the audit log's 'time' column")
    if kind == "last_days":
        length = pd.Timedelta(days=spec.last_days)
        end = _utc(now or datetime.now(timezone.utc)) - offset * length
        start = end - length
    else:
        start, end = _utc(spec.start), _utc(spec.end)
        length = end - start
        start, end = start - offset * length, end - offset * length
    mask = (frame["time"] >= start) & (frame["time"] < end)
    return Window(frame=frame[mask].reset_index(drop=True), kind=kind, offset=offset, start=start, end=end)


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; naive values are UTC."""
    return _utc(text).to_pydatetime()
