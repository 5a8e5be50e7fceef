"""Request and response schemas of every serving protocol, and the error vocabulary.

One place that says what a caller may send and what they get back, shared by the TorchServe
handler (which validates every request, whatever route it came by), the KServe front, the triage
CLI and the tests.

Requests (images travel as base64 inside JSON; raw bytes on the native route and in the v2 binary
tensor extension, which the KServe front decodes itself, see :mod:`serving.oip`):

- native TorchServe ``/predictions/cxr-screen``: the image bytes as the body (or a multipart
  ``data`` field); answered with one :class:`PredictionResponse`.
- KServe v1 ``/v1/models/cxr-screen:predict`` / ``:explain``: :class:`V1Request`
  ``{"instances": [{"data": "<base64>"}]}`` (``{"b64": ...}`` or a bare string also work);
  answered with :class:`V1Response` ``{"predictions": [...]}`` or ``{"explanations": [...]}``.
- KServe v2 / Open Inference Protocol ``/v2/models/cxr-screen/infer``: :class:`V2Request` with one
  ``BYTES`` input of shape ``[n]`` holding n base64 strings; answered with a v2 response whose
  ``result`` output holds one :class:`PredictionResponse` JSON string per image.

Errors are ``{"error": reason, "code": code, ...}`` (:class:`ErrorResponse`) with the 4xx status
that :data:`HTTP_STATUS` assigns to the code. A request with several images is answered only when
every image is usable; otherwise its error lists each failing image (``errors[]``). In a TorchServe
batch, each request stands alone: one bad request never fails its neighbours.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

from cxr_core.errors import InputError
from cxr_core.gate import GateVerdict
from cxr_core.preprocess import QualityFlags

MODEL_NAME = "cxr-screen"
MAX_IMAGES_PER_REQUEST = 16
# Serving's pixel budget, checked on the header before any pixel is decoded. The largest flat-panel
# chest detectors are 43 x 43 cm at 100 um (4300 x 4300 = 18.5 MP); CR plates and 139-150 um panels
# are smaller. 20 MP takes every real radiograph and refuses a 59 MP "PNG bomb" at once.
# Override with CXR_MAX_MEGAPIXELS; the bundle's own (training) limit applies when lower.
PIXEL_BUDGET_MP = 20.0
PIXEL_BUDGET_ENV = "CXR_MAX_MEGAPIXELS"
V2_RESULT_OUTPUT = "result"
V2_PROBABILITIES_OUTPUT = "probabilities"
V2_LABEL_OUTPUT = "label"
V2_TRIAGE_OUTPUT = "triage"

# Error code -> HTTP status. Codes of cxr_core.errors.InputError subclasses plus the protocol's own.
HTTP_STATUS: dict[str, int] = {
    # the image itself
    "empty": 400,
    "not_an_image": 415,
    "unsupported_mode": 415,
    "truncated": 422,
    "too_small": 422,
    "too_many_pixels": 413,
    "bad_input": 400,
    # the envelope around it
    "malformed_json": 400,
    "invalid_request": 400,
    "missing_field": 400,
    "bad_base64": 400,
    "wrong_datatype": 400,
    "wrong_shape": 400,
    "too_many_images": 413,
    "body_too_large": 413,
    "explanations_unavailable": 422,
    "unknown_input": 400,
    "unknown_output": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "unknown_method": 400,
    # the caller
    "unauthorized": 401,
    "body_timeout": 408,
    # ours
    "internal_error": 500,
    "not_implemented": 501,
    "bad_gateway": 502,
    "model_server_unavailable": 503,
    "model_server_timeout": 504,
}

# HTTP status -> error code, for answers whose status came first (a library's own error body, the
# model server's bare status): the inverse of HTTP_STATUS where a status has several codes; 403
# reads as unauthorized (the front never says why a key is refused), a library's 422 (its own
# validation of the body) as invalid_request.
STATUS_CODES: dict[int, str] = {400: "invalid_request", 401: "unauthorized", 403: "unauthorized", 404: "not_found",
                                405: "method_not_allowed", 408: "body_timeout", 413: "body_too_large",
                                415: "not_an_image", 422: "invalid_request", 500: "internal_error",
                                501: "not_implemented", 502: "bad_gateway", 503: "model_server_unavailable",
                                504: "model_server_timeout"}
MAX_ID_LENGTH = 128


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 400)


def error_code(status: int, default: str = "invalid_request") -> str:
    """The error code an answer of HTTP ``status`` carries (``default`` for a status we do not name)."""
    return STATUS_CODES.get(status, default)


def clean_id(value: Any) -> str | None:
    """A caller-sent request/caller id as it may be logged and echoed: printable ASCII, at most
    ``MAX_ID_LENGTH`` characters; None for anything else (the caller then gets an id of ours)."""
    if not isinstance(value, str) or not value:
        return None
    cleaned = "".join(ch for ch in value if 32 < ord(ch) < 127)[:MAX_ID_LENGTH]
    return cleaned or None


class RequestError(InputError):
    """A request the protocol layer refuses, before or after decoding the image."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- requests

class V1Instance(BaseModel):
    """One image of a v1 request: ``{"data": b64}`` (TorchServe docs) or ``{"b64": b64}``."""

    model_config = ConfigDict(extra="ignore")

    data: str | None = None
    b64: str | None = None

    @model_validator(mode="after")
    def _one_image(self) -> "V1Instance":
        if (self.data is None) == (self.b64 is None):
            raise ValueError('each instance needs exactly one of "data" or "b64" holding the base64 image')
        return self

    @property
    def base64(self) -> str:
        return self.data if self.data is not None else self.b64  # type: ignore[return-value]


ExplainMethodName = Literal["gradcam", "gradcam++"]


class V1Request(BaseModel):
    """KServe v1 / TorchServe KServe envelope: ``{"instances": [...], "explain": false}``."""

    model_config = ConfigDict(extra="ignore")

    instances: list[V1Instance | str] = Field(min_length=1)
    explain: bool = Field(False, description="add a Grad-CAM explanation to every prediction")
    explain_method: ExplainMethodName = "gradcam"


V2Parameter = StrictBool | StrictInt | StrictFloat | str


class V2Tensor(BaseModel):
    """An Open Inference Protocol input tensor; cxr-screen takes one BYTES tensor of base64 images."""

    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, V2Parameter] | None = None


class V2Request(BaseModel):
    """Open Inference Protocol request. ``parameters``: ``explain`` (bool), ``explain_method``."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, V2Parameter] | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------- responses

class DecisionOut(BaseModel):
    label: str = Field(description="the policy's decision (risk-prioritised, not argmax)")
    fired_class: str | None = Field(description="the class whose threshold fired; null when the fallback decided")
    threshold: float | None = Field(description="the threshold that fired")
    triage: Literal["urgent", "review", "routine"]
    gray_zone: list[str] = Field(description="ranked classes whose probability is near their threshold")


class ExplanationOut(BaseModel):
    method: ExplainMethodName
    target_class: str
    width: int = Field(description="overlay width = the input image's width")
    height: int
    overlay_png_base64: str = Field(description="RGB PNG: heatmap over the input image, at its size")
    lung_zones: dict[str, float] = Field(description="heat share per zone of the central chest region")
    outside_chest: float = Field(description="heat share outside the central chest region")
    shortcut_warning: bool = Field(description="much attention on borders, text or markers")
    empty_heatmap: bool = False


class PredictionResponse(BaseModel):
    """One image's answer, whatever protocol carried it."""

    request_id: str
    item: int = Field(0, description="position of the image in its request")
    model_name: str
    model_version: str
    classes: list[str]
    probabilities_raw: dict[str, float] = Field(description="softmax of the logits; empty when ungradable")
    probabilities: dict[str, float] = Field(description="temperature-calibrated; what the policy uses; empty when "
                                                        "the gate found the image ungradable (no finding to present)")
    decision: DecisionOut
    thresholds: dict[str, float] = Field(
        {}, description="the policy's fitted thresholds of the ranked classes, in priority order")
    quality: QualityFlags
    latency_ms: float = Field(description="time in the model server's handler for this request's batch")
    explanation: ExplanationOut | None = None
    gate: GateVerdict | None = Field(None, description="the gradability gate: ungradable images get decision "
                                                       "'ungradable', triage 'review' and its reason")
    notes: list[str] = Field([], description="what the server could not do for this request, e.g. an explanation")


class V1Response(BaseModel):
    predictions: list[PredictionResponse] | None = None
    explanations: list[PredictionResponse] | None = None


class ItemError(BaseModel):
    item: int
    code: str
    error: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: ``error`` is the reason a person can act on, ``code`` is for programs."""

    error: str
    code: str
    request_id: str | None = None
    errors: list[ItemError] = Field([], description="per image, for requests with several images")
