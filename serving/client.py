"""A small client for the served endpoint: builds the v1/v2/native requests, reads the answers.

Used by the triage CLI, the latency benchmark, the demo and the tests, so each protocol's request
shape is written down once (next to :mod:`serving.schemas`).

    client = CxrScreenClient("http://127.0.0.1:8080", api_key=key)          # the KServe front
    answer = client.predict(image_bytes, protocol="v2")                        # PredictionResponse
    native = CxrScreenClient(torchserve_url, bearer=token)                    # TorchServe itself
    native.predict(image_bytes, protocol="native")
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any, Literal

import httpx

from serving.schemas import MODEL_NAME, V2_RESULT_OUTPUT, PredictionResponse

ClientProtocol = Literal["native", "v1", "v2"]


class EndpointError(RuntimeError):
    """A non-200 answer: ``status``, ``code`` and ``reason`` from the error body."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body if isinstance(body, dict) else {"error": str(body)}
        self.code = str(self.body.get("code", "http_error"))
        self.reason = str(self.body.get("error") or self.body.get("message") or body)
        super().__init__(f"{status} {self.code}: {self.reason}")


def b64(image: bytes) -> str:
    return base64.b64encode(image).decode("ascii")


def v1_request(images: list[bytes], explain: bool = False, method: str = "gradcam") -> dict[str, Any]:
    body: dict[str, Any] = {"instances": [{"data": b64(image)} for image in images]}
    if explain:
        body.update(explain=True, explain_method=method)
    return body


def v2_request(images: list[bytes], explain: bool = False, method: str = "gradcam",
               request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                        "data": [b64(image) for image in images]}]}
    if request_id:
        body["id"] = request_id
    if explain:
        body["parameters"] = {"explain": True, "explain_method": method}
    return body


def read_answers(protocol: ClientProtocol, payload: dict[str, Any]) -> list[PredictionResponse]:
    """The per-image answers of a 200 response in any protocol."""
    if protocol == "v2":
        result = next(output for output in payload["outputs"] if output["name"] == V2_RESULT_OUTPUT)
        return [PredictionResponse.model_validate_json(item) for item in result["data"]]
    if "predictions" in payload or "explanations" in payload:
        return [PredictionResponse.model_validate(item)
                for item in payload.get("predictions") or payload.get("explanations") or []]
    return [PredictionResponse.model_validate(payload)]


class CxrScreenClient:
    def __init__(self, url: str, api_key: str | None = None, bearer: str | None = None, timeout_s: float = 120.0,
                 model_name: str = MODEL_NAME, caller_id: str | None = None, request_id_prefix: str = ""):
        self.url = url.rstrip("/")
        self.request_id_prefix = request_id_prefix
        self.model_name = model_name
        self.headers: dict[str, str] = {}
        if api_key:
            self.headers["X-API-Key"] = api_key
        if bearer:
            self.headers["Authorization"] = f"Bearer {bearer}"
        if caller_id:
            self.headers["X-Caller-Id"] = caller_id
        self.http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "CxrScreenClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def route(self, protocol: ClientProtocol, explain_route: bool = False) -> str:
        if protocol == "native":
            return f"{self.url}/{'explanations' if explain_route else 'predictions'}/{self.model_name}"
        if protocol == "v1":
            return f"{self.url}/v1/models/{self.model_name}:{'explain' if explain_route else 'predict'}"
        return f"{self.url}/v2/models/{self.model_name}/infer"

    def send(self, images: list[bytes], protocol: ClientProtocol = "v1", explain: bool = False,
             method: str = "gradcam", explain_route: bool = False, request_id: str | None = None) -> httpx.Response:
        """POST the images in ``protocol``'s request shape; returns the raw response."""
        headers = {**self.headers, "X-Request-Id": request_id or f"{self.request_id_prefix}{uuid.uuid4()}"}
        if protocol == "native":
            if len(images) != 1:
                raise ValueError("the native route takes one image per request")
            headers["Content-Type"] = "application/octet-stream"
            return self.http.post(self.route(protocol, explain_route), content=images[0], headers=headers)
        body = v1_request(images, explain, method) if protocol == "v1" else v2_request(images, explain, method)
        headers["Content-Type"] = "application/json"
        return self.http.post(self.route(protocol, explain_route), content=json.dumps(body), headers=headers)

    def predict_many(self, images: list[bytes], protocol: ClientProtocol = "v1", explain: bool = False,
                     method: str = "gradcam", request_id: str | None = None) -> list[PredictionResponse]:
        response = self.send(images, protocol, explain, method, request_id=request_id)
        if response.status_code != 200:
            try:
                raise EndpointError(response.status_code, response.json())
            except ValueError:
                raise EndpointError(response.status_code, response.text[:500]) from None
        return read_answers(protocol, response.json())

    def predict(self, image: bytes, protocol: ClientProtocol = "v1", explain: bool = False,
                method: str = "gradcam", request_id: str | None = None) -> PredictionResponse:
        return self.predict_many([image], protocol, explain, method, request_id)[0]

    def explain(self, image: bytes, method: str = "gradcam") -> PredictionResponse:
        """KServe v1 ``:explain`` (prediction + explanation of the decided class)."""
        response = self.send([image], "v1", explain=True, method=method, explain_route=True)
        if response.status_code != 200:
            raise EndpointError(response.status_code, response.json())
        return read_answers("v1", response.json())[0]


def api_key_from_file(path: Path | str) -> str:
    """The first key of a front API-key file ``{"caller": "key"}``."""
    return next(iter(json.loads(Path(path).read_text()).values()))
