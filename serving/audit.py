"""The serving side of the audit log: one line per served image, refused request or
metadata/health request; what monitoring reads.

The record type, the writer and the reader are the shared core's (:mod:`cxr_core.audit`); this
module adds where serving writes (``CXR_AUDIT_LOG``) and one helper per event.

Each line holds the request id, UTC time, model name and version, caller id (the API-key name the
KServe front authenticated, if any), latency, protocol and the shared feature row of
:func:`cxr_core.features.prediction_features` (calibrated probabilities, decision, triage, quality
flags and image statistics). Refused requests get a line with the error code and HTTP status.
Never image bytes, file names, DICOM tags or anything else that identifies a patient.

The path comes from ``CXR_AUDIT_LOG`` (default ``logs/audit.jsonl``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cxr_core.audit import (AuditLogWriter, error_record, prediction_record, read_audit_records, request_record,
                            utc_timestamp)
from cxr_core.bundle import Prediction

log = logging.getLogger(__name__)

AUDIT_LOG_ENV = "CXR_AUDIT_LOG"
DEFAULT_AUDIT_LOG = "logs/audit.jsonl"


def utc_now() -> str:
    return utc_timestamp()


def audit_log_path() -> Path:
    return Path(os.environ.get(AUDIT_LOG_ENV) or DEFAULT_AUDIT_LOG)


class AuditLog(AuditLogWriter):
    """The serving writer: the shared-core record and writer, with one helper per event."""

    def __init__(self, path: Path | str | None = None):
        super().__init__(path if path is not None else audit_log_path())

    def prediction(self, prediction: Prediction, *, request_id: str, model_name: str, model_version: str,
                   caller_id: str | None, latency_ms: float, protocol: str, item: int, n_items: int,
                   explained: bool = False, batch_size: int | None = None) -> None:
        self.write(prediction_record(prediction, request_id=request_id, time=utc_now(), model_name=model_name,
                                     model_version=model_version, caller_id=caller_id, latency_ms=latency_ms,
                                     protocol=protocol, item=item, n_items=n_items, explained=explained,
                                     batch_size=batch_size))

    def error(self, *, request_id: str, model_name: str, model_version: str, caller_id: str | None,
              latency_ms: float, protocol: str, status: int, code: str, stage: str = "handler",
              n_items: int | None = None, batch_size: int | None = None, route: str | None = None) -> None:
        self.write(error_record(request_id=request_id, time=utc_now(), model_name=model_name,
                                model_version=model_version, caller_id=caller_id, latency_ms=latency_ms,
                                protocol=protocol, status=status, code=code, stage=stage, n_items=n_items,
                                batch_size=batch_size, route=route))

    def request(self, *, request_id: str, model_name: str, model_version: str, caller_id: str | None,
                latency_ms: float, protocol: str, status: int, route: str) -> None:
        """A request the front answered without the model (metadata, readiness, health)."""
        self.write(request_record(request_id=request_id, time=utc_now(), model_name=model_name,
                                  model_version=model_version, caller_id=caller_id, latency_ms=latency_ms,
                                  protocol=protocol, status=status, route=route))


def read_audit_log(path: Path | str) -> list[dict[str, Any]]:
    """All lines of an audit log as dicts, each validated as the shared-core :class:`AuditRecord`."""
    return [record.model_dump(mode="json") for record in read_audit_records(path)]
