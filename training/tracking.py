"""MLflow tracking helpers: one place that knows how a training run is logged."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def flatten(payload: dict[str, Any], prefix: str = "", separator: str = ".") -> dict[str, Any]:
    """Nested dict -> flat ``a.b.c`` keys (MLflow params and metrics are flat)."""
    flat: dict[str, Any] = {}
    for key, value in payload.items():
        name = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, separator))
        else:
            flat[name] = value
    return flat


def numeric_metrics(payload: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested metrics dict, with MLflow-safe names."""
    metrics = {}
    for key, value in flatten(payload, prefix).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            metrics[key.replace(" ", "_").replace("/", "_").replace("|", "_")[:250]] = float(value)
    return metrics


@contextmanager
def mlflow_run(experiment: str, run_name: str, tags: dict[str, str] | None = None,
               nested: bool = False, parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or nest) a run on the configured tracking server."""
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, tags=all_tags, nested=nested) as run:
        yield run


def log_params(params: dict[str, Any]) -> None:
    flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
    items = list(flat.items())
    for start in range(0, len(items), 90):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[start : start + 90]))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    items = list(metrics.items())
    for start in range(0, len(items), 900):
        mlflow.log_metrics(dict(items[start : start + 900]), step=step)
