"""Protocol translation: one TorchServe request item -> images, and answers -> protocol bodies.

TorchServe hands the handler one item per HTTP request of the batch: ``{"body": ...}`` (or a
multipart ``{"data": ...}``), already ``json.loads``-ed when the content type is JSON and bytes
otherwise. The stock ``kserve`` / ``kservev2`` request envelopes only read the first item of a
batch and answer with one response for all of them (TorchServe then fails the batch with "number of
batch response mismatched"), so cxr-screen never sets ``service_envelope``: this module reads
every item itself, whichever protocol it carries, and the handler answers each one.

Nothing here knows about models: images come out as bytes, answers go in as
:class:`serving.schemas.PredictionResponse`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from cxr_core.bundle import Prediction
from cxr_core.decode import is_dicom
from serving.oip import HEADER_LENGTH, OipError, parse_infer
from serving.schemas import (
    MAX_IMAGES_PER_REQUEST,
    V2_LABEL_OUTPUT,
    V2_PROBABILITIES_OUTPUT,
    V2_RESULT_OUTPUT,
    V2_TRIAGE_OUTPUT,
    DecisionOut,
    ErrorResponse,
    ExplanationOut,
    ItemError,
    PredictionResponse,
    RequestError,
    V1Instance,
    V1Request,
    V2Request,
)

Protocol = Literal["native", "v1", "v2"]
KNOWN_FIELDS = frozenset({"instances", "data", "b64", "explain", "explain_method", "inputs", "outputs", "name", "shape",
                          "datatype", "parameters", "id", "body", "str", "V1Instance", "list[any]", "int",
                          "function-after[_one_image(), V1Instance]", "bool", "float", "StrictBool", "StrictInt",
                          "StrictFloat"})
JSON_CONTENT_TYPES = ("application/json", "application/cloudevents+json", "application/ld+json")


@dataclass
class ParsedRequest:
    """What one HTTP request asks for, whatever protocol carried it."""

    protocol: Protocol
    images: list[bytes]
    explain: bool = False
    explain_method: str = "gradcam"
    single: bool = True  # answer with one PredictionResponse object (native bytes / {"data": ...})
    v2_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def decode_base64(text: Any, where: str) -> bytes:
    """Standard or URL-safe base64, with or without padding, whitespace or a ``data:`` URL prefix."""
    if not isinstance(text, str):
        raise RequestError("wrong_datatype", f"{where}: expected a base64 string, got a JSON {_json_type(text)}")
    compact = text.strip()
    if compact.startswith("data:") and "," in compact[:200]:
        compact = compact.split(",", 1)[1]
    compact = "".join(compact.split())
    if not compact:
        raise RequestError("empty", f"{where}: the base64 image is empty")
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("bad_base64", f"{where}: the image is not valid base64") from None
    if not data:
        raise RequestError("empty", f"{where}: the base64 image decodes to 0 bytes")
    return data


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null")


def _safe_location(parts) -> str:
    """A validation error's location, naming only our own field names and indices (never a caller's key)."""
    names = []
    for part in parts:
        if isinstance(part, int) or (isinstance(part, str) and part in KNOWN_FIELDS):
            names.append(str(part))
        else:
            names.append("*")
    return ".".join(names) or "body"


def _validation_reason(error: ValidationError) -> tuple[str, str]:
    first = error.errors(include_input=False, include_url=False)[0]
    location = _safe_location(first.get("loc", ()))
    code = "missing_field" if first.get("type") == "missing" else "invalid_request"
    return code, f"{location}: {first.get('msg', 'invalid value')}"


def _check_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise RequestError("too_many_images",
                           f"the request holds {count} images; send at most {MAX_IMAGES_PER_REQUEST} per request")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RequestError("invalid_request", f"parameter {name!r} must be true or false")


def _method(value: Any) -> str:
    method = str(value or "gradcam").lower().replace("_", "").replace("-", "")
    method = {"gradcam": "gradcam", "gradcam++": "gradcam++", "gradcampp": "gradcam++",
              "gradcamplusplus": "gradcam++"}.get(method, "")
    if not method:
        raise RequestError("unknown_method", "unknown explanation method; use gradcam or gradcam++")
    return method


def parse_v1(payload: dict[str, Any]) -> ParsedRequest:
    if isinstance(payload.get("instances"), list):
        _check_count(len(payload["instances"]))
    if "explain_method" in payload:
        payload = {**payload, "explain_method": _method(payload["explain_method"])}
    try:
        request = V1Request.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(*_validation_reason(exc)) from None
    images = []
    for index, instance in enumerate(request.instances):
        text = instance if isinstance(instance, str) else instance.base64
        images.append(decode_base64(text, f"instances[{index}]"))
    return ParsedRequest(protocol="v1", images=images, explain=request.explain, explain_method=request.explain_method,
                         single=False)


def parse_v2(payload: dict[str, Any]) -> ParsedRequest:
    try:
        request = V2Request.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(*_validation_reason(exc)) from None
    if len(request.inputs) != 1:
        raise RequestError("wrong_shape", f"cxr-screen takes exactly one input tensor (BYTES images), "
                                          f"got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.datatype.upper() != "BYTES":
        raise RequestError("wrong_datatype", 'the input tensor must have datatype "BYTES" (base64 strings)')
    count = len(tensor.data)
    _check_count(count)
    if count == 0:
        raise RequestError("empty", "the input tensor holds no images")
    dims = tensor.shape
    known = 1
    for dim in dims:
        known *= dim if dim != -1 else 1
    valid_rank = len(dims) == 1 or (len(dims) == 2 and dims[1] in (1, -1))
    if (not valid_rank or any(dim < -1 or dim == 0 for dim in dims) or dims.count(-1) > 1
            or (-1 not in dims and known != count) or (-1 in dims and count % known)):
        raise RequestError("wrong_shape", f"the input tensor's shape does not match its {count} images; "
                                          f"use shape [{count}] (one base64 string per image)")
    images = [decode_base64(item, f"inputs[0].data[{index}]") for index, item in enumerate(tensor.data)]
    parameters = {**(tensor.parameters or {}), **(request.parameters or {})}
    explain = _as_bool(parameters.get("explain", False), "explain")
    return ParsedRequest(protocol="v2", images=images, explain=explain,
                         explain_method=_method(parameters.get("explain_method")), single=False,
                         v2_id=request.id, extra={"input_name": tensor.name})


def _parse_binary_v2(body: bytes, header_length: str, explain_route: bool) -> ParsedRequest:
    try:
        request = parse_infer(body, {HEADER_LENGTH: header_length})
    except OipError as error:
        raise RequestError(error.code, error.reason) from None
    explain = _as_bool(request.parameters.get("explain", False), "explain") or explain_route
    return ParsedRequest(protocol="v2", images=request.images, explain=explain,
                         explain_method=_method(request.parameters.get("explain_method")), single=False,
                         v2_id=request.request_id, extra={"input_name": "image"})


def _json_payload(value: Any, content_type: str) -> Any | None:
    """The decoded JSON document of a request body, or None when the body is not JSON."""
    if isinstance(value, (dict, list, int, float)):  # TorchServe already decoded a JSON body
        return value
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, bytearray)):
        return None
    head = bytes(value[:64]).lstrip()
    looks_json = head[:1] in (b"{", b"[") and not is_dicom(bytes(value[:132]))
    if not (looks_json or content_type.split(";")[0].strip().lower() in JSON_CONTENT_TYPES):
        return None
    try:
        return json.loads(bytes(value))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        position = getattr(exc, "pos", None)
        where = f" at byte {position}" if isinstance(position, int) else ""
        raise RequestError("malformed_json", f"the request body is not valid JSON{where}") from None


def parse_request(row: dict[str, Any], content_type: str = "", explain_route: bool = False,
                  binary_header_length: str | None = None) -> ParsedRequest:
    """One TorchServe request item -> :class:`ParsedRequest`; raises :class:`RequestError`.

    ``binary_header_length`` (the ``Inference-Header-Content-Length`` header) marks a body in the v2
    binary tensor extension, what the KServe front forwards: parsed by the front's own codec
    (:func:`serving.oip.parse_infer`), the image bytes raw, no base64 anywhere.
    """
    if not isinstance(row, dict) or not row:
        raise RequestError("empty", "the request has no body")
    value = row.get("body", row.get("data"))
    if value is None:  # multipart with another field name: take the first part
        value = next(iter(row.values()))
    if isinstance(value, str):
        value = value.encode("utf-8")
    if binary_header_length is not None and isinstance(value, (bytes, bytearray)):
        return _parse_binary_v2(bytes(value), binary_header_length, explain_route)
    if isinstance(value, (bytes, bytearray)) and len(value) <= 64 and not bytes(value).strip():
        raise RequestError("empty", "the request body is empty")
    payload = _json_payload(value, content_type)
    if payload is None:
        data = bytes(value) if isinstance(value, (bytes, bytearray)) else str(value).encode("utf-8")
        return ParsedRequest(protocol="native", images=[data], explain=explain_route)
    if not isinstance(payload, dict):
        raise RequestError("invalid_request", "the JSON body must be an object")
    if "inputs" in payload:
        parsed = parse_v2(payload)
    elif "instances" in payload:
        parsed = parse_v1(payload)
    elif "data" in payload or "b64" in payload:
        try:
            instance = V1Instance.model_validate(payload)
        except ValidationError as exc:
            raise RequestError(*_validation_reason(exc)) from None
        parsed = ParsedRequest(protocol="native", images=[decode_base64(instance.base64, "data")],
                               explain=_as_bool(payload.get("explain", False), "explain"),
                               explain_method=_method(payload.get("explain_method")))
    else:
        raise RequestError("missing_field", 'the JSON body needs "instances" (KServe v1), "inputs" (KServe v2) '
                                            'or "data" (one base64 image)')
    parsed.explain = parsed.explain or explain_route
    return parsed


# ---------------------------------------------------------------- responses

def prediction_response(prediction: Prediction, *, request_id: str, item: int, model_name: str, model_version: str,
                        latency_ms: float, explanation: ExplanationOut | None = None,
                        thresholds: dict[str, float] | None = None, notes: list[str] | None = None
                        ) -> PredictionResponse:
    decision = prediction.decision
    gradable = prediction.gradable  # an ungradable image's probabilities are not a finding: not shown
    return PredictionResponse(
        request_id=request_id, item=item, model_name=model_name, model_version=model_version,
        classes=prediction.classes, probabilities_raw=prediction.probabilities_raw if gradable else {},
        probabilities=prediction.probabilities if gradable else {}, gate=prediction.gate, notes=notes or [],
        decision=DecisionOut(label=decision.label, fired_class=decision.fired_class, threshold=decision.threshold,
                             triage=decision.triage, gray_zone=decision.gray_zone),
        thresholds=thresholds or {}, quality=prediction.quality, latency_ms=round(latency_ms, 3), explanation=explanation,
    )


def ranked_thresholds(policy) -> dict[str, float]:
    """A fitted policy's thresholds of the ranked classes the model has, in priority order."""
    return {rule.name: float(policy.thresholds[rule.name]) for rule in policy.ranked_present}


def response_body(parsed: ParsedRequest, answers: list[PredictionResponse], *, request_id: str, model_name: str,
                  model_version: str, explain_route: bool) -> dict[str, Any]:
    """The JSON document answering ``parsed`` in its own protocol."""
    if parsed.protocol == "v2":
        classes = answers[0].classes
        n = len(answers)
        return {
            "id": parsed.v2_id or request_id,
            "model_name": model_name,
            "model_version": model_version,
            "outputs": [
                {"name": V2_RESULT_OUTPUT, "datatype": "BYTES", "shape": [n],
                 "data": [answer.model_dump_json() for answer in answers]},
                {"name": V2_LABEL_OUTPUT, "datatype": "BYTES", "shape": [n],
                 "data": [answer.decision.label for answer in answers]},
                {"name": V2_TRIAGE_OUTPUT, "datatype": "BYTES", "shape": [n],
                 "data": [answer.decision.triage for answer in answers]},
                {"name": V2_PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [n, len(classes)],
                 "parameters": {"classes": ",".join(classes), "calibrated": True,
                                "ungradable_items": ",".join(str(i) for i, a in enumerate(answers)
                                                             if not a.probabilities)},
                 "data": [answer.probabilities.get(c, 0.0) for answer in answers for c in classes]},
            ],
        }
    if parsed.single:
        return answers[0].model_dump(mode="json")
    key = "explanations" if explain_route else "predictions"
    return {key: [answer.model_dump(mode="json") for answer in answers]}


def error_body(code: str, reason: str, request_id: str | None, item_errors: list[ItemError] | None = None) -> dict:
    return ErrorResponse(error=reason, code=code, request_id=request_id, errors=item_errors or []).model_dump(mode="json")
