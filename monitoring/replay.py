"""Replay images through a bundle offline and write the audit-log lines serving would have written.

The drift demo and the tests build "current" traffic this way: the same preprocessing, model,
calibration, policy and :func:`cxr_core.features.prediction_features` as the TorchServe handler,
with request ids and times chosen by the caller. A refused image gives an error line, as in serving.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cxr_core.audit import AuditLogWriter, AuditRecord, error_record, prediction_record, utc_timestamp
from cxr_core.batching import predict_in_batches
from cxr_core.bundle import Prediction, Predictor
from cxr_core.errors import InputError

DEFAULT_MODEL_NAME = "cxr-screen"
REPLAY_CALLER = "offline-replay"
REPLAY_PROTOCOL = "replay"


def model_version_of(predictor: Predictor) -> str:
    """The version serving would log: the bundle's MLflow run id, else its folder name."""
    run_id = predictor.manifest.provenance.mlflow_run_id
    if run_id:
        return run_id
    return predictor.path.parent.name if predictor.path is not None else "unversioned"


def audit_record(prediction: Prediction | InputError, *, request_id: str, when: datetime, model_name: str,
                 model_version: str, caller: str, latency_ms: float) -> dict[str, Any]:
    """One audit-log line (as a dict), built by the shared core exactly as serving builds it.

    A refused image gets the error line serving writes (code, status 422: there is no HTTP here,
    and 422 is what the endpoint answers for an image it cannot use), never the input itself.
    """
    meta = dict(request_id=request_id, time=utc_timestamp(when), model_name=model_name, model_version=model_version,
                caller_id=caller, latency_ms=latency_ms, protocol=REPLAY_PROTOCOL, stage="replay")
    if isinstance(prediction, InputError):
        return error_record(**meta, status=422, code=prediction.code).model_dump(mode="json")
    return prediction_record(prediction, **meta).model_dump(mode="json")


def replay_images(predictor: Predictor, items: Iterable[tuple[str, bytes]], *, start: datetime,
                  interval: timedelta = timedelta(seconds=30), model_name: str = DEFAULT_MODEL_NAME,
                  model_version: str | None = None, caller: str = REPLAY_CALLER,
                  batch_size: int = 64) -> list[dict[str, Any]]:
    """Predict ``(request_id, bytes)`` items in order; request k is stamped ``start + k * interval``."""
    version = model_version or model_version_of(predictor)
    return [audit_record(prediction, request_id=request_id, when=start + k * interval, model_name=model_name,
                         model_version=version, caller=caller, latency_ms=latency)
            for k, ((request_id, _), prediction, latency)
            in enumerate(predict_in_batches(predictor, items, lambda item: item[1], batch_size))]


def write_audit_log(records: Sequence[dict[str, Any]], path: Path | str, append: bool = False) -> Path:
    """The records as audit-log lines, through the shared-core writer (each validated as an AuditRecord)."""
    path = Path(path)
    if not append and path.exists():
        path.unlink()
    AuditLogWriter(path).write_many(AuditRecord.model_validate(record) for record in records)
    return path
