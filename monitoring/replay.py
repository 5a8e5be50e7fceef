"""Replay images through a bundle offline and write the audit-log lines serving would have written.

The drift demo and the tests build "current" traffic this way: the same preprocessing, model,
calibration, policy and :func:`cxr_core.features.prediction_features` as the TorchServe handler,
with request ids and times chosen by the caller. A refused image gives an error line, as in serving.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cxr_core.bundle import Prediction, Predictor
from cxr_core.errors import InputError
from cxr_core.features import prediction_features

DEFAULT_MODEL_NAME = "cxr-screen"
REPLAY_CALLER = "offline-replay"


def model_version_of(predictor: Predictor) -> str:
    """The version serving would log: the bundle's MLflow run id, else its folder name."""
    run_id = predictor.manifest.provenance.mlflow_run_id
    if run_id:
        return run_id
    return predictor.path.parent.name if predictor.path is not None else "unversioned"


def audit_record(prediction: Prediction | InputError, *, request_id: str, when: datetime, model_name: str,
                 model_version: str, caller: str, latency_ms: float) -> dict[str, Any]:
    """One audit-log line (as a dict): request metadata + the feature row, or an ``error``."""
    record: dict[str, Any] = {
        "request_id": request_id,
        "time": when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "model_name": model_name,
        "model_version": model_version,
        "caller": caller,
        "latency_ms": round(latency_ms, 3),
    }
    if isinstance(prediction, InputError):
        record["error"] = f"{type(prediction).__name__}: {prediction}"
        return record
    return record | prediction_features(prediction)


def replay_images(predictor: Predictor, items: Iterable[tuple[str, bytes]], *, start: datetime,
                  interval: timedelta = timedelta(seconds=30), model_name: str = DEFAULT_MODEL_NAME,
                  model_version: str | None = None, caller: str = REPLAY_CALLER,
                  batch_size: int = 64) -> list[dict[str, Any]]:
    """Predict ``(request_id, bytes)`` items in order; request k is stamped ``start + k * interval``."""
    version = model_version or model_version_of(predictor)
    records: list[dict[str, Any]] = []
    batch: list[tuple[str, bytes]] = []

    def flush() -> None:
        began = time.perf_counter()
        predictions = predictor.predict_many([data for _, data in batch])
        latency = (time.perf_counter() - began) * 1000.0 / len(batch)
        for (request_id, _), prediction in zip(batch, predictions):
            records.append(audit_record(prediction, request_id=request_id, when=start + len(records) * interval,
                                        model_name=model_name, model_version=version, caller=caller,
                                        latency_ms=latency))
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return records


def write_audit_log(records: Sequence[dict[str, Any]], path: Path | str, append: bool = False) -> Path:
    """JSON lines, one record per line (what the handler appends to ``CXR_AUDIT_LOG``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
    return path
