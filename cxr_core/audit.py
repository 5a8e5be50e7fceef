"""The audit record: one versioned type that serving writes and monitoring reads.

Every HTTP request gets its accounting in the log: an answered image gets a ``prediction`` line (a
request with n images gets n, ``item`` i of ``n_items``), a refused request exactly one ``error``
line, and a request the front answers itself without the model (metadata, readiness, health) one
``request`` line naming its ``route`` (a route name, never the caller's raw path). The TorchServe handler and the KServe front
write it (:mod:`serving.audit`), the offline replay writes the same lines (:mod:`monitoring.replay`),
and the drift job, the feedback store and the review pages read it back through
:func:`parse_audit_line` / :func:`read_audit_records` — so a field renamed on one side fails the
other side's tests instead of silently turning lines into "malformed" ones.

What a line may hold: request id, UTC time, model name and version, the caller id (the API-key
name, never a person), latency, protocol, HTTP status and, for an answered image, the feature row of
:func:`cxr_core.features.prediction_features` (calibrated probabilities, decision, triage, quality
flags, image statistics) as extra fields. Never image bytes, file names, DICOM tags or anything
else that identifies a patient.

Versioning: ``schema_version`` is written on every line. Version 2 added the ``request`` event and
the ``route`` field; version 1 lines read unchanged. A reader accepts the versions it knows
(lines from before the field existed count as version 1) and refuses any other with
:class:`UnsupportedAuditVersion`, naming the file and line, rather than guessing.

Lines are appended with one ``write`` on a file opened ``O_APPEND``, so the TorchServe workers
and the front can share one file without interleaving.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from cxr_core.bundle import Prediction

log = logging.getLogger(__name__)

AUDIT_SCHEMA_VERSION = 2
KNOWN_VERSIONS = frozenset({1, 2})
LOG_PATTERNS = ("*.jsonl", "*.jsonl.gz")


class UnsupportedAuditVersion(ValueError):
    """A line written by a newer (or unknown) schema: upgrade the reader, do not guess."""


class AuditRecord(BaseModel):
    """The fixed part of a line; prediction lines add the feature columns (``extra``)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = AUDIT_SCHEMA_VERSION
    event: Literal["prediction", "error", "request"]
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
    stage: Literal["handler", "front", "replay"] = "handler"
    error_code: str | None = None
    explained: bool = False
    route: str | None = None  # the route's name (``v2.metadata``, ``health.live``...), never the raw path

    @property
    def features(self) -> dict[str, Any]:
        """The feature columns of a prediction line (everything beyond the fixed fields)."""
        return dict(self.model_extra or {})

    def to_line(self) -> str:
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":"), allow_nan=False) + "\n"


def prediction_record(prediction: "Prediction", *, request_id: str, time: str, model_name: str, model_version: str,
                      caller_id: str | None, latency_ms: float, protocol: str, item: int | None = None,
                      n_items: int | None = None, explained: bool = False, batch_size: int | None = None,
                      stage: str = "handler") -> AuditRecord:
    """The line of one answered image: metadata + the shared feature row + the decision's details."""
    from cxr_core.features import prediction_features

    features = prediction_features(prediction)
    features["fired_class"] = prediction.decision.fired_class
    features["gray_zone"] = ",".join(prediction.decision.gray_zone)
    features["gradable"] = prediction.gradable
    features["gate_code"] = prediction.gate.code if prediction.gate is not None else None
    return AuditRecord(event="prediction", request_id=request_id, time=time, model_name=model_name,
                       model_version=model_version, caller_id=caller_id, latency_ms=round(latency_ms, 3),
                       protocol=protocol, status=200, item=item, n_items=n_items, explained=explained,
                       batch_size=batch_size, stage=stage, **features)  # type: ignore[arg-type]


def error_record(*, request_id: str, time: str, model_name: str, model_version: str, caller_id: str | None,
                 latency_ms: float, protocol: str, status: int, code: str, stage: str = "handler",
                 item: int | None = None, n_items: int | None = None, batch_size: int | None = None,
                 route: str | None = None) -> AuditRecord:
    """The line of a refused request (or image): its error code and HTTP status, nothing it sent."""
    return AuditRecord(event="error", request_id=request_id, time=time, model_name=model_name,
                       model_version=model_version, caller_id=caller_id, latency_ms=round(latency_ms, 3),
                       protocol=protocol, status=status, error_code=code, stage=stage,  # type: ignore[arg-type]
                       item=item, n_items=n_items, batch_size=batch_size, route=route)


def request_record(*, request_id: str, time: str, model_name: str, model_version: str, caller_id: str | None,
                   latency_ms: float, protocol: str, status: int, route: str) -> AuditRecord:
    """The line of a request answered without the model (metadata, readiness, health)."""
    return AuditRecord(event="request", request_id=request_id, time=time, model_name=model_name,
                       model_version=model_version, caller_id=caller_id, latency_ms=round(latency_ms, 3),
                       protocol=protocol, status=status, stage="front", route=route)


def utc_timestamp(when: datetime | None = None) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``: the ``time`` of every line."""
    moment = when.astimezone(timezone.utc) if when is not None else datetime.now(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_audit_line(line: str, where: str = "audit line") -> AuditRecord:
    """One JSON line -> :class:`AuditRecord`; an unknown ``schema_version`` is refused clearly.

    Raises :class:`UnsupportedAuditVersion` for a version this reader does not know and
    ``ValueError`` (pydantic's ``ValidationError`` or a JSON error) for a line that is not a record.
    """
    payload = json.loads(line)
    if not isinstance(payload, dict):
        raise ValueError(f"{where}: not a JSON object")
    version = payload.get("schema_version", 1)
    if version not in KNOWN_VERSIONS:
        raise UnsupportedAuditVersion(
            f"{where}: audit schema_version {version!r} is not one this reader knows "
            f"({', '.join(map(str, sorted(KNOWN_VERSIONS)))}); upgrade cxr-screen to read it")
    return AuditRecord.model_validate({**payload, "schema_version": version})


def audit_log_files(path: Path | str) -> list[Path]:
    """A log file itself, or every ``*.jsonl`` / ``*.jsonl.gz`` under a folder (sorted, recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted({p for pattern in LOG_PATTERNS for p in path.rglob(pattern) if p.is_file()})
    raise FileNotFoundError(f"audit log {path} does not exist")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_audit_lines(path: Path | str) -> Iterator[tuple[str, str]]:
    """``(where, line)`` for every non-empty line of a log file or folder (``where`` = ``file:line``)."""
    for file in audit_log_files(path):
        with _open_text(file) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield f"{file}:{number}", line


def read_audit_line(where: str) -> AuditRecord:
    """The record at ``where`` (``file:line`` as :func:`iter_audit_lines` names it), read again from disk.

    Lets a reader that indexed a large log keep only small rows in memory and fetch one whole
    record (a case view) on demand: skipping lines without parsing them is cheap.
    """
    file, _, number = where.rpartition(":")
    target = int(number)
    with _open_text(Path(file)) as handle:
        for current, line in enumerate(handle, 1):
            if current == target:
                return parse_audit_line(line, where)
    raise KeyError(f"{where}: no such line")


def read_audit_records(path: Path | str) -> list[AuditRecord]:
    """Every line of a log file or folder as a validated record (strict: a bad line raises)."""
    return [parse_audit_line(line, where) for where, line in iter_audit_lines(path)]


class AuditLogWriter:
    """Appends :class:`AuditRecord` lines to one file (``O_APPEND``: safe across processes)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def write(self, record: AuditRecord) -> None:
        line = record.to_line().encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(descriptor, line)
            finally:
                os.close(descriptor)
        except OSError:
            log.exception("audit log %s could not be written", self.path)

    def write_many(self, records: Iterable[AuditRecord]) -> None:
        for record in records:
            self.write(record)
