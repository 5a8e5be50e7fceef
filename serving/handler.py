"""TorchServe handler of cxr-screen: protocol in, shared core in the middle, protocol out.

The MAR built by :mod:`serving.mar` holds this file at its root, the bundle in ``bundle/`` and the
``cxr_core`` and ``serving`` packages, so a stock TorchServe (or KServe's TorchServe runtime)
serves it without cxr-screen installed. Everything between bytes and decision is
``Predictor.predict_many`` from the shared core: the same preprocessing, temperature and policy
as training and evaluation.

Batching: TorchServe hands ``handle`` one item per HTTP request (up to ``batchSize`` of them).
Every item is parsed on its own (:mod:`serving.envelopes`: native bytes, KServe v1 or v2 JSON), the
images of all items go through the model in one call, and the handler returns exactly one answer
per item, in order. A bad item gets its own 4xx status (``context.set_response_status(code,
idx=i)``) and JSON error; the other items of the batch are answered normally. Nothing a caller
sends can raise out of ``handle``: unexpected failures become a 500 for the batch, logged, and the
worker lives on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

_ARCHIVE_ROOT = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_ARCHIVE_ROOT, "cxr_core")) and _ARCHIVE_ROOT not in sys.path:
    sys.path.insert(0, _ARCHIVE_ROOT)  # inside an extracted MAR: use the packages it ships

import torch  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

from cxr_core.bundle import Prediction, load_bundle  # noqa: E402
from cxr_core.errors import InputError  # noqa: E402
from cxr_core.image_cache import ImageCache  # noqa: E402
from cxr_core.explain import ExplanationUnavailableError, explain_prepared, require_explainable  # noqa: E402
from cxr_core.preprocess import prepare_image  # noqa: E402
from cxr_core.audit import AuditRecord, error_record, prediction_record  # noqa: E402
from serving.audit import AuditLog, utc_now  # noqa: E402
from serving.envelopes import (  # noqa: E402
    ParsedRequest,
    error_body,
    parse_request,
    prediction_response,
    ranked_thresholds,
    response_body,
)
from serving.redact import install_redaction  # noqa: E402
from serving.schemas import PIXEL_BUDGET_ENV, PIXEL_BUDGET_MP  # noqa: E402
from serving.schemas import MODEL_NAME, ExplanationOut, ItemError, RequestError, clean_id, http_status  # noqa: E402

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"
THREADS_ENV = "CXR_TORCH_THREADS"
def _error_of(error: Exception) -> tuple[str, str]:
    code = getattr(error, "code", "bad_input")
    return code, str(error) or code


class CxrScreenHandler(BaseHandler):
    """Serves one cxr-screen bundle; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.predictor = None
        self.model_name = MODEL_NAME
        self.model_version = "unknown"
        self.thresholds: dict[str, float] = {}
        self.audit = AuditLog()
        self.image_cache: ImageCache | None = None

    def initialize(self, context) -> None:
        threads = os.environ.get(THREADS_ENV)
        if threads:
            torch.set_num_threads(int(threads))
        model_dir = Path(context.system_properties["model_dir"])
        self.predictor = load_bundle(model_dir / BUNDLE_DIR)
        budget = float(os.environ.get(PIXEL_BUDGET_ENV) or PIXEL_BUDGET_MP)
        preprocess = self.predictor.manifest.preprocess  # the budget changes refusals, never pixels
        self.predictor.manifest.preprocess = preprocess.model_copy(
            update={"max_megapixels": min(preprocess.max_megapixels, budget)})
        manifest = (context.manifest or {}).get("model", {})
        self.model_name = manifest.get("modelName") or MODEL_NAME
        self.model_version = str(manifest.get("modelVersion") or "unknown")
        self.thresholds = ranked_thresholds(self.predictor.manifest.policy)
        self.audit = AuditLog()
        self.image_cache = ImageCache.from_env()  # None unless the deployment enabled it: no image kept
        install_redaction()
        if self.predictor.torch_model is not None:
            import pytorch_grad_cam  # noqa: F401  # slow first import: pay it at load, not on a request
        self.initialized = True
        log.info("cxr-screen %s version %s loaded (%s, classes %s)", self.model_name, self.model_version,
                 self.predictor.manifest.model.name, self.predictor.classes)

    # -- TorchServe entry point ------------------------------------------------------------

    def handle(self, data: list[dict[str, Any]], context) -> list[str]:
        started = time.perf_counter()
        self.context = context
        pending: list[AuditRecord] = []
        try:
            if self._is_describe():
                return [json.dumps(self.describe())]
            answers = self._handle_batch(data, context, started, pending)
        except Exception as error:  # never let a request take the worker down
            # the type only: a traceback's messages can quote what the caller sent
            log.error("cxr-screen: unexpected failure on a batch of %d requests (%s)", len(data), type(error).__name__)
            answers, pending = [], []
            for index in range(len(data)):
                self._set_status(context, index, 500)
                request_id = self._request_id(context, index)
                answers.append(json.dumps(error_body(
                    "internal_error", "the model server failed on this request; the failure is logged", request_id)))
                pending.append(error_record(
                    request_id=request_id, time=utc_now(), model_name=self.model_name,
                    model_version=self.model_version, caller_id=self._caller_id(context, index),
                    latency_ms=(time.perf_counter() - started) * 1000.0, protocol="unknown", status=500,
                    code="internal_error", n_items=None, batch_size=len(data)))
        # written once the answers exist: each request of the batch is accounted for exactly once
        self.audit.write_many(pending)
        return answers

    def describe(self) -> dict[str, Any]:
        """Management API ``GET /models/cxr-screen?customized=true``: what this worker serves."""
        manifest = self.predictor.manifest
        return {"model_name": self.model_name, "model_version": self.model_version, "family": manifest.model.name,
                "classes": manifest.classes, "temperature": manifest.temperature,
                "thresholds": manifest.policy.thresholds, "image_size": manifest.preprocess.image_size,
                "mlflow_run_id": manifest.provenance.mlflow_run_id, "git_commit": manifest.provenance.git_commit}

    # -- the batch -------------------------------------------------------------------------

    @staticmethod
    def _headers(context, index: int) -> dict[str, str]:
        try:
            headers = context.get_all_request_header(index) or {}
        except (AttributeError, IndexError, TypeError):
            return {}
        flat = {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}
        for value in headers.values():  # per-part content type: {"body": {"content-type": ...}}
            if isinstance(value, dict) and "content-type" in value and "content-type" not in flat:
                flat["content-type"] = str(value["content-type"])
        return flat

    @staticmethod
    def _set_status(context, index: int, status: int) -> None:
        try:
            context.set_response_status(status, HTTPStatus(status).phrase, idx=index)
            context.set_response_content_type(index, "application/json")
        except (AttributeError, IndexError, TypeError, ValueError):
            log.warning("could not set the status of request %d", index)

    def _request_id(self, context, index: int) -> str:
        try:
            from_context = context.get_request_id(index)
        except (AttributeError, IndexError, TypeError, KeyError):
            from_context = None
        return clean_id(self._headers(context, index).get("x-request-id")) or clean_id(from_context) or str(index)

    def _caller_id(self, context, index: int) -> str | None:
        return clean_id(self._headers(context, index).get("x-caller-id"))

    def _handle_batch(self, data: list[dict[str, Any]], context, started: float,
                      pending: list[AuditRecord]) -> list[str]:
        requests: list[ParsedRequest | RequestError] = []
        meta: list[dict[str, Any]] = []
        for index, row in enumerate(data):
            headers = self._headers(context, index)
            explain_route = headers.get("explain") == "True"
            meta.append({"request_id": self._request_id(context, index), "caller_id": self._caller_id(context, index),
                         "explain_route": explain_route})
            try:
                requests.append(parse_request(row, headers.get("content-type", ""), explain_route,
                                              headers.get("inference-header-content-length")))
            except RequestError as error:
                requests.append(error)

        # every image of every well-formed request through the model in one call
        flat = [(position, item, image) for position, request in enumerate(requests)
                if isinstance(request, ParsedRequest) for item, image in enumerate(request.images)]
        results = self._predict([image for _, _, image in flat]) if flat else []
        per_request: dict[int, list[Prediction | InputError]] = {}
        for (position, _, _), result in zip(flat, results):
            per_request.setdefault(position, []).append(result)

        answers = []
        for position, request in enumerate(requests):
            info = {**meta[position], "batch_size": len(data)}
            self._set_status(context, position, 200)
            if isinstance(request, RequestError):
                answers.append(self._refuse(context, position, info, "unknown", [(0, request)], started, pending))
                continue
            outcome = per_request.get(position, [])
            failures = [(item, result) for item, result in enumerate(outcome) if isinstance(result, Exception)]
            explanations: list[ExplanationOut | None] = [None] * len(outcome)
            notes: list[str] = []
            if not failures and request.explain:
                explanations, failures, notes = self._explain(request, outcome)
            if failures:
                answers.append(self._refuse(context, position, info, request.protocol, failures, started, pending,
                                            n_items=len(request.images)))
                continue
            latency_ms = (time.perf_counter() - started) * 1000.0
            responses = [prediction_response(prediction, request_id=info["request_id"], item=item,
                                             model_name=self.model_name, model_version=self.model_version,
                                             latency_ms=latency_ms, explanation=explanations[item],
                                             thresholds=self.thresholds, notes=notes)
                         for item, prediction in enumerate(outcome)]
            answers.append(json.dumps(response_body(request, responses, request_id=info["request_id"],
                                                    model_name=self.model_name, model_version=self.model_version,
                                                    explain_route=info["explain_route"])))
            pending.extend(prediction_record(
                prediction, request_id=info["request_id"], time=utc_now(), model_name=self.model_name,
                model_version=self.model_version, caller_id=info["caller_id"], latency_ms=latency_ms,
                protocol=request.protocol, item=item, n_items=len(outcome), explained=request.explain,
                batch_size=len(data)) for item, prediction in enumerate(outcome))
            self._cache_images(info["request_id"], request.images)
        return answers

    def _cache_images(self, request_id: str, images: list[bytes]) -> None:
        """The answered images into the short-lived review cache, if enabled; a full disk never fails an answer."""
        if self.image_cache is None:
            return
        try:
            for item, image in enumerate(images):
                self.image_cache.put(request_id, item, image)
        except OSError as error:
            log.warning("cxr-screen: could not cache an answered image (%s)", type(error).__name__)

    def _predict(self, images: list[bytes]) -> list[Prediction | InputError]:
        """``predict_many`` on the whole batch; if something unexpected breaks it, image by image, so
        one pathological image fails only its own request."""
        try:
            return self.predictor.predict_many(images)
        except Exception:
            log.exception("cxr-screen: batch prediction failed; retrying image by image")
        results: list[Prediction | InputError] = []
        for image in images:
            try:
                results.append(self.predictor.predict_many([image])[0])
            except Exception:
                log.exception("cxr-screen: prediction failed on one image")
                results.append(RequestError("internal_error", "the model server could not process this image; "
                                                              "the failure is logged"))
        return results

    def _explain(self, request: ParsedRequest, predictions: list[Prediction]
                 ) -> tuple[list[ExplanationOut | None], list[tuple[int, Exception]], list[str]]:
        """Explanations of the gradable images; a model without explanations still answers, with a note."""
        try:
            require_explainable(self.predictor)
        except ExplanationUnavailableError:
            return [None] * len(predictions), [], [
                f"no explanation: the {self.predictor.manifest.model.name} model has no feature maps to explain "
                "(HOG + scikit-learn); the prediction is given without one"]
        explanations: list[ExplanationOut | None] = []
        notes: list[str] = []
        for item, (image, prediction) in enumerate(zip(request.images, predictions)):
            if not prediction.gradable:
                explanations.append(None)
                notes = ["no explanation for an ungradable image"]
                continue
            try:
                prepared = prepare_image(image, self.predictor.manifest.preprocess)
                explanation = explain_prepared(self.predictor, image, prepared, prediction, request.explain_method)
            except Exception:
                log.exception("cxr-screen: explanation failed")
                return [None] * len(predictions), [(item, RequestError(
                    "internal_error", "the explanation failed on this image; the failure is logged"))], []
            shares = explanation.shares
            explanations.append(ExplanationOut(
                method=explanation.method, target_class=explanation.target_class, width=explanation.width,
                height=explanation.height, overlay_png_base64=explanation.overlay_png_base64,
                lung_zones=shares.zones, outside_chest=shares.outside_chest,
                shortcut_warning=shares.shortcut_warning, empty_heatmap=shares.empty_heatmap))
        return explanations, [], notes

    def _refuse(self, context, position: int, info: dict[str, Any], protocol: str,
                failures: list[tuple[int, Exception]], started: float, pending: list[AuditRecord],
                n_items: int | None = None) -> str:
        code, reason = _error_of(failures[0][1])
        status = http_status(code)
        self._set_status(context, position, status)
        item_errors = [ItemError(item=item, code=_error_of(error)[0], error=_error_of(error)[1])
                       for item, error in failures] if (n_items or 0) > 1 else []
        if item_errors:
            reason = f"image {failures[0][0]}: {reason}" + (
                f" (and {len(failures) - 1} more failing images)" if len(failures) > 1 else "")
        pending.append(error_record(
            request_id=info["request_id"], time=utc_now(), model_name=self.model_name,
            model_version=self.model_version, caller_id=info["caller_id"],
            latency_ms=(time.perf_counter() - started) * 1000.0, protocol=protocol, status=status, code=code,
            n_items=n_items, batch_size=info.get("batch_size")))
        return json.dumps(error_body(code, reason, info["request_id"], item_errors))
