"""The audit log: one JSON line per served image or refused request, what monitoring reads.

Each line holds the request id, UTC time, model name and version, caller id (the API-key name the
KServe front authenticated, if any), latency, protocol and the shared feature row of
:func:`cxr_core.features.prediction_features` (calibrated probabilities, decision, triage, quality
flags and image statistics). Refused requests get a line with the error code and HTTP status.
Never image bytes, file names, DICOM tags or anything else that identifies a patient.

Lines are appended with one ``write`` on a file opened ``O_APPEND``, so the TorchServe workers and
the front can share one file without interleaving. The path comes from ``CXR_AUDIT_LOG``
(default ``logs/audit.jsonl``).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from cxr_core.bundle import Prediction
from cxr_core.features import prediction_features

log = logging.getLogger(__name__)

AUDIT_LOG_ENV = "CXR_AUDIT_LOG"
DEFAULT_AUDIT_LOG = "logs/audit.jsonl"


class AuditRecord(BaseModel):
    """The fixed part of a line; prediction lines add the feature columns (``extra``)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    event: Literal["prediction", "error"]
    request_id: str
    time: str
    model_name: str
    model_version: str
    caller_id: str | None = None
    latency_ms: float
    protocol: str
    status: int
    item: int | None = None
    n_items: int | None = None
    batch_size: int | None = None  # requests TorchServe handed the handler together
    stage: Literal["handler", "front"] = "handler"
    error_code: str | None = None
    explained: bool = False


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_log_path() -> Path:
    return Path(os.environ.get(AUDIT_LOG_ENV) or DEFAULT_AUDIT_LOG)


class AuditLog:
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else audit_log_path()

    def write(self, record: AuditRecord) -> None:
        line = (json.dumps(record.model_dump(mode="json"), separators=(",", ":"), allow_nan=False) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(descriptor, line)
            finally:
                os.close(descriptor)
        except OSError:
            log.exception("audit log %s could not be written", self.path)

    def prediction(self, prediction: Prediction, *, request_id: str, model_name: str, model_version: str,
                   caller_id: str | None, latency_ms: float, protocol: str, item: int, n_items: int,
                   explained: bool = False, batch_size: int | None = None) -> None:
        features = prediction_features(prediction)
        features["fired_class"] = prediction.decision.fired_class
        features["gray_zone"] = ",".join(prediction.decision.gray_zone)
        features["gradable"] = prediction.gradable
        features["gate_code"] = prediction.gate.code if prediction.gate is not None else None
        self.write(AuditRecord(event="prediction", request_id=request_id, time=utc_now(), model_name=model_name,
                               model_version=model_version, caller_id=caller_id, latency_ms=round(latency_ms, 3),
                               protocol=protocol, status=200, item=item, n_items=n_items, explained=explained,
                               batch_size=batch_size,
                               **features))

    def error(self, *, request_id: str, model_name: str, model_version: str, caller_id: str | None,
              latency_ms: float, protocol: str, status: int, code: str, stage: str = "handler",
              n_items: int | None = None, batch_size: int | None = None) -> None:
        self.write(AuditRecord(event="error", request_id=request_id, time=utc_now(), model_name=model_name,
                               model_version=model_version, caller_id=caller_id, latency_ms=round(latency_ms, 3),
                               protocol=protocol, status=status, error_code=code, stage=stage,  # type: ignore[arg-type]
                               n_items=n_items, batch_size=batch_size))


def read_audit_log(path: Path | str) -> list[dict[str, Any]]:
    """All lines of an audit log, each validated as an :class:`AuditRecord`."""
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            records.append(AuditRecord.model_validate_json(line).model_dump(mode="json"))
    return records
