"""The registered model's MLflow ``pyfunc`` flavour: image bytes (or paths) in, the endpoint's decision out.

What an MLOps engineer tries first is ``mlflow.pyfunc.load_model("models:/cxr-screen@champion")``;
this makes it work and answer exactly what the served endpoint answers, because it goes through
the same two calls the TorchServe handler makes: :meth:`cxr_core.bundle.Predictor.predict_many`
for the model work and :func:`serving.envelopes.prediction_response` for the answer's shape.

The bundle travels as the pyfunc model's ``bundle`` artifact (``artifacts/bundle/bundle.json``),
so ``training.registry.fetch_bundle`` and ``make mar`` read the same files the pyfunc loads.
The file is logged as "models from code" (``mlflow.models.set_model`` below): MLflow copies it
into the model and runs it at load time, so the training side never imports serving.

Input: a DataFrame with an ``image`` column (bytes of a JPEG / PNG / DICOM, or a path to one; a
list or a single value when called without schema enforcement). Output: one row per input with the decision, triage, the
threshold that fired, calibrated probabilities and, for an input the endpoint refuses, its error
code and reason (the endpoint's 4xx) instead of a decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from cxr_core.bundle import Prediction, load_bundle
from cxr_core.errors import InputError
from serving.envelopes import prediction_response, ranked_thresholds

IMAGE_COLUMN = "image"
BUNDLE_ARTIFACT = "bundle"
MODEL_NAME = "cxr-screen"
DECISION_COLUMNS = ("label", "triage", "fired_class", "threshold", "gray_zone", "error_code", "error")


def _image_bytes(value: Any) -> bytes:
    """Bytes as given; a str or Path is read as a file (the triage CLI's input)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, Path)):
        return Path(value).read_bytes()
    raise TypeError(f"an image must be bytes or a path, got {type(value).__name__}")


def _inputs(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input:
            raise ValueError(f"the input DataFrame needs an '{IMAGE_COLUMN}' column")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    return [model_input]


class CxrScreenModel(mlflow.pyfunc.PythonModel):
    """A bundle behind ``predict``; one row per image, same decision as the endpoint."""

    def load_context(self, context) -> None:
        self.predictor = load_bundle(context.artifacts[BUNDLE_ARTIFACT])
        self.thresholds = ranked_thresholds(self.predictor.manifest.policy)
        self.model_version = str((context.model_config or {}).get("model_version", "pyfunc"))

    def predict(self, context, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        answers = self.predictor.predict_many([_image_bytes(value) for value in _inputs(model_input)])
        return pd.DataFrame([self._row(answer, item) for item, answer in enumerate(answers)])

    def _row(self, answer: Prediction | InputError, item: int) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(DECISION_COLUMNS)
        row.update({f"p_{name}": None for name in self.predictor.classes})
        if isinstance(answer, InputError):
            row.update(error_code=answer.code, error=str(answer))
            return row
        response = prediction_response(answer, request_id=f"pyfunc-{item}", item=item, model_name=MODEL_NAME,
                                       model_version=self.model_version, latency_ms=0.0, thresholds=self.thresholds)
        decision = response.decision
        row.update(label=decision.label, triage=decision.triage, fired_class=decision.fired_class,
                   threshold=decision.threshold, gray_zone=",".join(decision.gray_zone))
        row.update({f"p_{name}": float(p) for name, p in response.probabilities.items()})
        return row


mlflow.models.set_model(CxrScreenModel())
