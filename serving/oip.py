"""Open Inference Protocol (KServe v2 REST) at the front: requests in, responses out, our own codec.

Why the front decodes v2 itself instead of letting ``kserve`` do it: kserve's
``InferRequest.from_bytes`` UTF-8-decodes BYTES tensors of the binary tensor extension (raw image
bytes fail, and its error carries the bytes into the response and the log), takes every body
without ``Content-Type: application/json`` as binary, ignores ``outputs`` and never writes binary
outputs. A stock client (``tritonclient.http``, kserve's ``InferenceRESTClient``) needs all of it.

What is accepted (one input tensor, :data:`INPUT_NAME`, datatype ``BYTES``, shape ``[n]`` or
``[n, 1]``):

- JSON, with or without a Content-Type: each element a base64 string of one image file;
- the binary tensor extension: ``Inference-Header-Content-Length`` gives the JSON header's size,
  the tensor's ``parameters.binary_data_size`` its bytes after the header; each BYTES element is a
  4-byte little-endian length followed by that many bytes (the raw image file, or its base64).

Requested ``outputs`` are honoured (unknown names refused), ``binary_data`` per output or the
request parameter ``binary_data_output`` gives binary outputs. Every error is an :class:`OipError`
with a code and a reason that never quote what the caller sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from serving.schemas import (
    MAX_IMAGES_PER_REQUEST,
    V2_LABEL_OUTPUT,
    V2_PROBABILITIES_OUTPUT,
    V2_RESULT_OUTPUT,
    V2_TRIAGE_OUTPUT,
)

INPUT_NAME = "image"
HEADER_LENGTH = "inference-header-content-length"
OUTPUT_NAMES = (V2_RESULT_OUTPUT, V2_LABEL_OUTPUT, V2_TRIAGE_OUTPUT, V2_PROBABILITIES_OUTPUT)
MAX_JSON_DEPTH = 32
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\r\n ")
_DTYPE_SIZES = {"FP32": 4}


class OipError(Exception):
    """A refused v2 request: HTTP status, error code and a reason that quotes nothing sent."""

    def __init__(self, status: int, code: str, reason: str):
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


@dataclass
class OipRequest:
    """A validated v2 request, ready to forward: raw image bytes plus what the caller asked back."""

    images: list[bytes]
    request_id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, bool] = field(default_factory=dict)  # requested name -> binary; empty = all, JSON
    binary_default: bool = False

    def forward_binary(self) -> tuple[bytes, dict[str, str]]:
        """The request as the binary tensor extension, for TorchServe (``/predictions/<model>``).

        One protocol translation: the image bytes travel raw (uint32 length + bytes per element),
        never base64 + JSON again; the handler parses the body with :func:`parse_infer`, this same
        codec. Returns the body and the headers that describe it.
        """
        blob = b"".join(struct.pack("<I", len(image)) + image for image in self.images)
        tensor: dict[str, Any] = {"name": INPUT_NAME, "shape": [len(self.images)], "datatype": "BYTES",
                                  "parameters": {"binary_data_size": len(blob)}}
        header: dict[str, Any] = {"inputs": [tensor]}
        if self.parameters:
            header["parameters"] = self.parameters
        head = json.dumps(header).encode()
        return head + blob, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def _depth_ok(text: bytes) -> bool:
    """Refuse deeply nested JSON before parsing it (Python's parser recurses)."""
    depth = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def load_json(text: bytes, what: str = "the request body") -> Any:
    """json.loads with a depth limit and errors that quote nothing."""
    if not _depth_ok(text):
        raise OipError(400, "malformed_json", f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise OipError(400, "malformed_json", f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        position = getattr(exc, "pos", None)
        where = f" at byte {position}" if isinstance(position, int) else ""
        raise OipError(400, "malformed_json", f"{what} is not valid JSON{where}") from None


def _no_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _shape(value: Any) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(dim, int) and not isinstance(dim, bool) for dim in value):
        raise OipError(400, "wrong_shape", 'input "shape" must be a list of integers, e.g. [1]')
    return value


def _count_of(shape: list[int]) -> int:
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        count = shape[0]
    else:
        raise OipError(400, "wrong_shape", "input shape must be [n] or [n, 1] (one image per element)")
    if count < 1:
        raise OipError(400, "wrong_shape", "input shape must hold at least one image")
    if count > MAX_IMAGES_PER_REQUEST:
        raise OipError(413, "too_many_images", f"send at most {MAX_IMAGES_PER_REQUEST} images per request")
    return count


def _bool_param(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise OipError(400, "invalid_request", f'parameter "{name}" must be true or false')
    return value


def _image_of(element: bytes | str, index: int, binary: bool) -> bytes:
    """One BYTES element -> image bytes. JSON elements are base64; binary ones raw (or base64)."""
    raw = element.encode("latin-1") if isinstance(element, str) else element
    if not raw:
        raise OipError(400, "empty", f"image {index} is empty")
    if binary and not set(raw) <= _B64_ALPHABET:
        return raw
    text = b"".join(raw.split()).replace(b"-", b"+").replace(b"_", b"/")
    if text.startswith(b"data:") and b"," in text[:200]:
        text = text.split(b",", 1)[1]
    text += b"=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        if binary:
            return raw
        raise OipError(400, "bad_base64", f"image {index} is not valid base64") from None
    if not data:
        raise OipError(400, "empty", f"image {index} decodes to 0 bytes")
    return data


def _split_bytes(blob: bytes, count: int) -> list[bytes]:
    """The BYTES binary layout: per element a uint32 little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise OipError(400, "wrong_shape", "the binary BYTES tensor ends inside a length prefix")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise OipError(400, "wrong_shape", "a BYTES element is longer than the binary data that holds it")
        items.append(blob[offset:offset + length])
        offset += length
    if len(items) != count:
        raise OipError(400, "wrong_shape", f"the input shape says {count} images but the binary data holds "
                                           f"{len(items)}")
    return items


def parse_infer(body: bytes, headers: dict[str, str]) -> OipRequest:
    """A v2 infer body (JSON or binary tensor extension) -> :class:`OipRequest`; raises OipError."""
    declared = headers.get(HEADER_LENGTH)
    if declared is not None:
        if not declared.strip().isdigit() or int(declared) > len(body) or int(declared) == 0:
            raise OipError(400, "invalid_request",
                           f"{HEADER_LENGTH} must be the byte length of the JSON header inside the body")
        split = int(declared)
        header, binary = body[:split], body[split:]
    else:
        header, binary = body, b""
    if not header.strip():
        raise OipError(400, "empty", "the request body is empty")
    payload = load_json(header)
    if not isinstance(payload, dict):
        raise OipError(400, "invalid_request", "the v2 request must be a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OipError(400, "missing_field", 'the v2 request needs "inputs": [one BYTES tensor named "image"]')
    if len(inputs) != 1:
        raise OipError(400, "wrong_shape", f'the model takes exactly one input tensor ("{INPUT_NAME}"), '
                                           f"got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise OipError(400, "invalid_request", "each input must be a JSON object")
    if tensor.get("name") != INPUT_NAME:
        raise OipError(400, "unknown_input", f'the model has one input, named "{INPUT_NAME}"')
    if tensor.get("datatype") != "BYTES":
        raise OipError(400, "wrong_datatype", f'input "{INPUT_NAME}" has datatype BYTES (one image file per element)')
    count = _count_of(_shape(tensor.get("shape")))
    tensor_parameters = tensor.get("parameters") or {}
    parameters = payload.get("parameters") or {}
    if not isinstance(tensor_parameters, dict) or not isinstance(parameters, dict):
        raise OipError(400, "invalid_request", '"parameters" must be a JSON object')
    size = tensor_parameters.get("binary_data_size")
    if size is not None:
        if declared is None:
            raise OipError(400, "invalid_request", f"binary_data_size needs the {HEADER_LENGTH} header")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(binary):
            raise OipError(400, "wrong_shape", "binary_data_size does not match the binary data after the header")
        if "data" in tensor:
            raise OipError(400, "invalid_request", 'an input has either "data" or binary data, not both')
        images = [_image_of(item, index, True) for index, item in enumerate(_split_bytes(binary, count))]
    else:
        if binary:
            raise OipError(400, "invalid_request", "binary data after the JSON header but no input declares "
                                                   "binary_data_size")
        data = tensor.get("data")
        if not isinstance(data, list) or not data:
            raise OipError(400, "missing_field", f'input "{INPUT_NAME}" needs "data": [base64 image, ...]')
        if any(isinstance(item, list) for item in data):
            data = [item for row in data for item in (row if isinstance(row, list) else [row])]
        if len(data) != count:
            raise OipError(400, "wrong_shape", f"the input shape says {count} images but data holds {len(data)}")
        if not all(isinstance(item, str) for item in data):
            raise OipError(400, "wrong_datatype", "each BYTES element in JSON must be a base64 string")
        images = [_image_of(item, index, False) for index, item in enumerate(data)]
    forward: dict[str, Any] = {}
    if "explain" in parameters or "explain" in tensor_parameters:
        forward["explain"] = _bool_param({**tensor_parameters, **parameters}, "explain")
    method = parameters.get("explain_method", tensor_parameters.get("explain_method"))
    if method is not None:
        if not isinstance(method, str):
            raise OipError(400, "unknown_method", "explain_method must be gradcam or gradcam++")
        forward["explain_method"] = method
    outputs = payload.get("outputs")
    requested: dict[str, bool] = {}
    binary_default = _bool_param(parameters, "binary_data_output")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise OipError(400, "invalid_request", '"outputs" must be a list of {"name": ...}')
        for output in outputs:
            if not isinstance(output, dict) or output.get("name") not in OUTPUT_NAMES:
                raise OipError(400, "unknown_output", "unknown output; the model's outputs are "
                                                      + ", ".join(OUTPUT_NAMES))
            output_parameters = output.get("parameters") or {}
            if not isinstance(output_parameters, dict):
                raise OipError(400, "invalid_request", 'output "parameters" must be a JSON object')
            requested[output["name"]] = (_bool_param(output_parameters, "binary_data")
                                         if "binary_data" in output_parameters else binary_default)
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(400, "invalid_request", '"id" must be a string')
    return OipRequest(images=images, request_id=request_id, parameters=forward, outputs=requested,
                      binary_default=binary_default)


def _binary_of(output: dict[str, Any]) -> bytes:
    if output["datatype"] == "BYTES":
        chunks = []
        for item in output["data"]:
            raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            chunks.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(chunks)
    if output["datatype"] == "FP32":
        values = [float(value) for value in output["data"]]
        if not all(math.isfinite(value) for value in values):
            raise ValueError("non-finite FP32 output")
        return struct.pack(f"<{len(values)}f", *values)
    raise ValueError(f"no binary encoding for {output['datatype']}")


def encode_response(answer: dict[str, Any], request: OipRequest, model_name: str,
                    model_version: str) -> tuple[bytes, dict[str, str]]:
    """The handler's JSON v2 answer -> (body, extra headers) honouring outputs and binary_data."""
    wanted = request.outputs or {name: request.binary_default for name in OUTPUT_NAMES}
    outputs, blobs = [], []
    for output in answer.get("outputs", []):
        name = output.get("name")
        if name not in wanted:
            continue
        entry = {"name": name, "datatype": output["datatype"], "shape": output["shape"]}
        parameters = dict(output.get("parameters") or {})
        if wanted[name]:
            blob = _binary_of(output)
            parameters["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            entry["data"] = output["data"]
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    # the version TorchServe answered with (it changes under a rollout); the front's cached one otherwise
    served_version = str(answer.get("model_version") or model_version)
    document: dict[str, Any] = {"model_name": model_name, "model_version": served_version, "outputs": outputs}
    document["id"] = request.request_id or answer.get("id") or ""
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}


def model_metadata(model_name: str, model_version: str, classes: list[str], image_size: int | None) -> dict:
    """``GET /v2/models/<name>``: inputs and outputs with names, datatypes and shapes from the bundle."""
    n_classes = len(classes) or -1
    return {
        "name": model_name,
        "versions": [model_version],
        "platform": "torchserve",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1],
                    "parameters": {"content": "one image file per element (JPEG, PNG, DICOM...); base64 in JSON, "
                                              "raw bytes with the binary tensor extension",
                                   "model_input_side": image_size or -1}}],
        "outputs": [
            {"name": V2_RESULT_OUTPUT, "datatype": "BYTES", "shape": [-1],
             "parameters": {"content": "one PredictionResponse JSON document per image"}},
            {"name": V2_LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": V2_TRIAGE_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": V2_PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, n_classes],
             "parameters": {"classes": ",".join(classes)}},
        ],
    }
