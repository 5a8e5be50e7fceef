"""The KServe front: KServe v1 and v2 (Open Inference Protocol) in front of TorchServe.

What KServe's TorchServe runtime runs, built with the ``kserve`` SDK: a ``kserve.Model`` served by
``kserve.ModelServer`` that forwards each request to TorchServe's KServe-compatible inference
routes (``/v1/models/<name>:predict|:explain``, ``/v2/models/<name>/infer``) with TorchServe's
inference token, and hands back TorchServe's answer. The handler does all protocol validation and
all model work; the front only adds what sits in front of a hospital-facing endpoint:

- API keys (``X-API-Key: <key>`` or ``Authorization: Bearer <key>``): 401 without a valid one,
  except for the health/readiness probes. The key's name becomes the audit log's ``caller_id``.
- a body size limit (413 before anything is parsed),
- one error shape for everything it refuses itself: ``{"error": reason, "code": code}`` (kserve's
  and FastAPI's own 4xx bodies are rewritten to it), with an audit line for each such refusal,
- a request id for every request (``X-Request-Id``, generated when absent), passed to TorchServe
  and echoed in the response headers,
- the Open Inference Protocol routes (``/v2/models/...``: infer in JSON or the binary tensor
  extension, metadata, readiness) answered by :mod:`serving.oip` instead of kserve's decoder,
  readiness true only while TorchServe has a READY worker,
- a body read timeout here, a header timeout and a per-client connection cap in
  :mod:`serving.connguard`; error reasons and log lines never quote what a caller sent
  (:mod:`serving.redact`).

    python -m serving.front --port 8080 --torchserve-url http://127.0.0.1:8085 \
        --management-url http://127.0.0.1:8081 --key-file .cache/serving-stack/key_file.json

API keys come from ``--api-keys-file`` (JSON ``{"caller": "key"}``) or ``CXR_API_KEYS``
(``caller:key,caller2:key2``). The server binds 0.0.0.0 (kserve's choice); talk to it on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving import connguard
from serving.audit import AuditLog
from serving.redact import install_redaction
from serving.oip import OipError, encode_response, model_metadata, parse_infer
from serving.schemas import (
    MAX_IMAGES_PER_REQUEST,
    MODEL_NAME,
    V2_LABEL_OUTPUT,
    V2_PROBABILITIES_OUTPUT,
    V2_RESULT_OUTPUT,
    V2_TRIAGE_OUTPUT,
    clean_id,
    error_code,
)
from serving.torchserve_process import TorchServeKeys

log = logging.getLogger(__name__)

API_KEYS_ENV = "CXR_API_KEYS"
V2_ROUTE = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<verb>/infer|/ready)?/?$")
AUDITED_HEADER = "x-cxr-audited"
OPEN_PATHS = ("/", "/v2/health/live", "/v2/health/ready", "/metrics")


def route_name(path: str) -> str:
    """The audit log's name for a route: fixed words only, never the caller's raw path."""
    fixed = {"/": "root", "/v2/health/live": "v2.health.live", "/v2/health/ready": "v2.health.ready",
             "/metrics": "metrics", "/v2": "v2.server", "/v2/": "v2.server", "/v1/models": "v1.models"}
    if path in fixed:
        return fixed[path]
    route = V2_ROUTE.match(path)
    if route is not None:
        return "v2." + {"/infer": "infer", "/ready": "model.ready"}.get(route.group("verb") or "", "model.metadata")
    if path.startswith("/v1/models/"):
        return "v1.explain" if path.endswith(":explain") else "v1.predict" if path.endswith(":predict") else (
            "v1.model" if ":" not in path else "v1.other")
    return "v2.other" if path.startswith("/v2/") else "other"


MODEL_ROUTES = ("v1.predict", "v1.explain", "v2.infer")  # answered (and audited) by the handler


def parse_api_keys(text: str) -> dict[str, str]:
    """``caller:key,caller2:key2`` -> {caller: key}."""
    keys = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        caller, sep, key = entry.partition(":")
        if not sep or not caller or not key:
            raise ValueError(f"{API_KEYS_ENV} entries must look like caller:key (got {entry[:12]!r}...)")
        keys[caller] = key
    return keys


def load_api_keys(path: Path | str | None = None) -> dict[str, str]:
    if path:
        payload = json.loads(Path(path).read_text())
        if not isinstance(payload, dict) or not all(isinstance(v, str) and v for v in payload.values()):
            raise ValueError(f"{path} must hold a JSON object {{caller: key}}")
        return payload
    return parse_api_keys(os.environ.get(API_KEYS_ENV, ""))


@dataclass
class FrontSettings:
    torchserve_url: str
    key_file: Path
    api_keys: dict[str, str]
    management_url: str | None = None
    model_name: str = MODEL_NAME
    max_body_bytes: int = 48 * 1024 * 1024
    timeout_s: float = 120.0
    audit_log: Path | None = None
    open_paths: tuple[str, ...] = field(default=OPEN_PATHS)
    body_timeout_s: float = 30.0  # whole body; a 48 MB upload needs > 1.6 MB/s
    header_timeout_s: float = 10.0
    max_connections_per_client: int = 32


class FrontError(Exception):
    """An answer the front gives instead of a prediction (TorchServe's 4xx/5xx or its own)."""

    def __init__(self, status: int, body: dict[str, Any], audited: bool = False):
        super().__init__(body.get("error", ""))
        self.status = status
        self.body = body
        self.audited = audited


def _model_class():
    import kserve

    class CxrScreenFront(kserve.Model):
        """Forwards KServe v1/v2 requests to TorchServe; see the module docstring."""

        def __init__(self, settings: FrontSettings):
            super().__init__(settings.model_name, return_response_headers=True)
            self.settings = settings
            self.model_version = "unknown"
            self.classes: list[str] = []
            self.image_size: int | None = None
            self._workers: tuple[float, bool] = (0.0, False)
            self._client: httpx.AsyncClient | None = None
            self._keys: TorchServeKeys | None = None
            self._health: tuple[float, bool] = (0.0, False)

        # -- lifecycle and health
        def load(self) -> bool:
            if self.ready:  # kserve calls load() again whenever healthy() says no: stay cheap
                return True
            self._keys = TorchServeKeys.read(self.settings.key_file)
            if self.settings.management_url:
                try:
                    response = httpx.get(f"{self.settings.management_url}/models/{self.name}?customized=true",
                                         headers={"Authorization": f"Bearer {self._keys.management}"}, timeout=10)
                    description = response.json()[0]
                    self.model_version = str(description.get("modelVersion", "unknown"))
                    customized = description.get("customizedMetadata", {})
                    if isinstance(customized, str):
                        customized = json.loads(customized)
                    self.classes = list(customized.get("classes", []))
                    self.image_size = customized.get("image_size")
                except (httpx.HTTPError, ValueError, KeyError, IndexError):
                    log.warning("could not describe %s on %s", self.name, self.settings.management_url)
            self.ready = True
            return True

        async def healthy(self) -> bool:
            checked_at, healthy = self._health
            if time.monotonic() - checked_at < 2.0:
                return healthy
            try:
                response = await self.client.get(f"{self.settings.torchserve_url}/ping", timeout=5,
                                                 headers=self._auth_headers())
                if response.status_code in (400, 401):  # /ping takes no input: this is the token
                    await self._refresh_token()  # a rotated or expired token is not an unhealthy server
                    response = await self.client.get(f"{self.settings.torchserve_url}/ping", timeout=5,
                                                     headers=self._auth_headers())
                healthy = self.ready and response.status_code == 200
            except httpx.HTTPError:
                healthy = False
            self._health = (time.monotonic(), healthy)
            return healthy

        async def worker_ready(self) -> bool:
            """True only while TorchServe has at least one READY worker for the model (readiness probes).

            TorchServe's own ``/ping`` stays healthy while its only worker restarts; the management
            API's worker list does not.
            """
            checked_at, ready = self._workers
            if time.monotonic() - checked_at < 0.5:
                return ready
            ready = False
            if self.settings.management_url:
                try:
                    if self._keys is None:
                        self._keys = TorchServeKeys.read(self.settings.key_file)
                    response = await self.client.get(f"{self.settings.management_url}/models/{self.name}", timeout=5,
                                                     headers={"Authorization": f"Bearer {self._keys.management}"})
                    workers = response.json()[0].get("workers", []) if response.status_code == 200 else []
                    ready = any(worker.get("status") == "READY" for worker in workers)
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, OSError):
                    ready = False
            else:
                ready = await self.healthy()
            self._workers = (time.monotonic(), ready)
            return ready

        @property
        def client(self) -> httpx.AsyncClient:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self.settings.timeout_s,
                                                 limits=httpx.Limits(max_connections=64))
            return self._client

        def get_input_types(self) -> list[dict]:
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self) -> list[dict]:
            classes = max(len(self.classes), 1)
            return [{"name": V2_RESULT_OUTPUT, "datatype": "BYTES", "shape": [-1]},
                    {"name": V2_LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
                    {"name": V2_TRIAGE_OUTPUT, "datatype": "BYTES", "shape": [-1]},
                    {"name": V2_PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]}]

        # -- the verbs
        async def predict(self, payload, headers=None, response_headers=None):
            headers = headers or {}
            # v2 never reaches kserve's decoder: FrontGuard answers every /v2 route (serving.oip)
            if isinstance(payload, (bytes, bytearray)):  # a raw image posted with an image/* content type
                path, body = f"/predictions/{self.name}", bytes(payload)
            else:
                path, body = f"/v1/models/{self.name}:predict", payload
            answer = await self._forward(path, body, headers)
            if response_headers is not None and headers.get("x-request-id"):
                response_headers["x-request-id"] = headers["x-request-id"]
            return answer

        async def explain(self, payload, headers=None):
            return await self._forward(f"/v1/models/{self.name}:explain", payload, headers or {})

        # -- forwarding
        def _auth_headers(self) -> dict[str, str]:
            if self._keys is None:
                self._keys = TorchServeKeys.read(self.settings.key_file)
            return {"Authorization": f"Bearer {self._keys.inference}"}

        async def _refresh_token(self) -> None:
            """Re-read TorchServe's key file; ask TorchServe for a new inference token if it expired."""
            previous = self._keys
            self._keys = TorchServeKeys.read(self.settings.key_file)
            if previous is not None and self._keys.inference != previous.inference:
                return
            if self.settings.management_url and self._keys.api:
                await self.client.get(f"{self.settings.management_url}/token?type=inference",
                                      headers={"Authorization": f"Bearer {self._keys.api}"}, timeout=10)
                self._keys = TorchServeKeys.read(self.settings.key_file)

        async def _forward(self, path: str, body: Any, headers: dict[str, str],
                           body_headers: dict[str, str] | None = None) -> dict[str, Any]:
            """POST to TorchServe; ``body_headers`` describe a bytes body (content type, binary header length)."""
            outgoing = {"x-request-id": headers.get("x-request-id", "")}
            if headers.get("x-caller-id"):
                outgoing["x-caller-id"] = headers["x-caller-id"]
            if isinstance(body, bytes):
                content, outgoing["content-type"] = body, "application/octet-stream"
                outgoing.update(body_headers or {})
            else:
                content, outgoing["content-type"] = json.dumps(body).encode(), "application/json"
            url = f"{self.settings.torchserve_url}{path}"
            refreshed = reconnected = False
            while True:
                try:
                    response = await self.client.post(url, content=content, headers={**outgoing, **self._auth_headers()})
                except httpx.TimeoutException:
                    raise FrontError(504, {"error": "the model server did not answer in time",
                                           "code": "model_server_timeout"}) from None
                except (httpx.RemoteProtocolError, httpx.ConnectError) as exc:
                    # a pooled keep-alive connection TorchServe had closed (it closes after some of its
                    # own refusals): the request never reached a handler, so one retry is safe
                    if not reconnected:
                        reconnected = True
                        continue
                    raise FrontError(503, {"error": f"the model server is unreachable ({type(exc).__name__})",
                                           "code": "model_server_unavailable"}) from None
                except httpx.HTTPError as exc:
                    raise FrontError(503, {"error": f"the model server is unreachable ({type(exc).__name__})",
                                           "code": "model_server_unavailable"}) from None
                if not refreshed and response.status_code in (400, 401) and b"InvalidKeyException" in response.content:
                    refreshed = True
                    await self._refresh_token()
                    continue
                break
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if response.status_code == 200 and isinstance(answer, dict):
                return answer
            if isinstance(answer, dict) and "code" in answer and isinstance(answer.get("code"), str):
                raise FrontError(response.status_code, answer, audited=True)  # the handler's own refusal
            # TorchServe's own refusals (Java front end): say what happened, never quote its text
            status = response.status_code if response.status_code in (413, 503, 504) else 502
            raise FrontError(status, {"error": f"the model server refused the request (HTTP {response.status_code})",
                                      "code": error_code(status, "bad_gateway")})

    return CxrScreenFront


class FrontGuard:
    """ASGI middleware: API keys, body limit, request ids, uniform error bodies, audit of refusals."""

    def __init__(self, app, settings: FrontSettings, model_version=lambda: "unknown", model=None):
        self.app = app
        self.settings = settings
        self.model = model
        self._redacting = False
        self.audit = AuditLog(settings.audit_log) if settings.audit_log else AuditLog()
        self.model_version = model_version
        self._keys = [(caller, key.encode()) for caller, key in settings.api_keys.items()]

    def _caller(self, headers: dict[str, str]) -> str | None:
        offered = headers.get("x-api-key", "")
        authorization = headers.get("authorization", "")
        if not offered and authorization.lower().startswith("bearer "):
            offered = authorization[7:].strip()
        if not offered:
            return None
        match = None
        for caller, key in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(offered.encode(), key):
                match = caller
        return match

    def _is_open(self, method: str, path: str) -> bool:
        if method not in ("GET", "HEAD"):
            return False
        return path in self.settings.open_paths or path.endswith("/ready") or (
            path.startswith("/v1/models/") and ":" not in path)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._redacting:  # after kserve and uvicorn configured their log handlers
            install_redaction()
            # kserve's per-request timing lines name unmatched routes by their raw path (caller text);
            # the audit log has every request's latency
            logging.getLogger("kserve.trace").setLevel(logging.WARNING)
            self._redacting = True
        started = time.perf_counter()
        request_headers = [(k.lower(), v) for k, v in scope.get("headers", [])]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request_headers}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        protocol = "v2" if path.startswith("/v2/") else "v1" if path.startswith("/v1/") else "other"
        request_id = clean_id(headers.get("x-request-id")) or str(uuid.uuid4())
        context = {"request_id": request_id, "protocol": protocol, "started": started, "caller": None,
                   "route": route_name(path), "audited": False, "status": None}
        try:
            return await self._guard(scope, receive, send, method, path, headers, request_headers, context)
        except Exception as error:  # noqa: BLE001 - the one audit line and a fixed answer, never a traceback
            # a traceback's locals and messages can quote the request: log the type only
            log.error("request %s failed in the front (%s)", request_id, type(error).__name__)
            if context["status"] is None:
                return await self._answer(send, 500, "internal_error", FIXED_REASONS[500], context)
            if not context["audited"]:
                self._audit(500, "internal_error", context)
        finally:
            if not context["audited"] and context["status"] is not None and context["route"] not in MODEL_ROUTES:
                self._audit_request(context["status"], context)

    async def _guard(self, scope, receive, send, method: str, path: str, headers: dict[str, str],
                     request_headers: list[tuple[bytes, bytes]], context: dict[str, Any]) -> None:
        """Keys, body limit and routing of one request (``__call__`` guarantees its one audit line)."""
        request_id = context["request_id"]

        if not self._is_open(method, path):
            context["caller"] = self._caller(headers)
            if context["caller"] is None:
                reason = ("an API key is required: send X-API-Key: <key> or Authorization: Bearer <key>"
                          if not (headers.get("x-api-key") or headers.get("authorization")) else "the API key is not valid")
                return await self._answer(send, 401, "unauthorized", reason, context,
                                          extra=[(b"www-authenticate", b'Bearer realm="cxr-screen"')])
        body = b""
        if method in ("POST", "PUT", "PATCH"):
            declared = headers.get("content-length", "")
            limit = self.settings.max_body_bytes
            if declared.isdigit() and int(declared) > limit:
                return await self._answer(send, 413, "body_too_large",
                                          f"the request body is {int(declared)} bytes; the limit is {limit}", context)
            chunks, size = [], 0
            deadline = time.monotonic() + self.settings.body_timeout_s
            while True:
                try:
                    message = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.001))
                except asyncio.TimeoutError:
                    return await self._answer(send, 408, "body_timeout", f"the request body did not arrive within "
                                              f"{self.settings.body_timeout_s:g} s", context,
                                              extra=[(b"connection", b"close")])
                if message["type"] == "http.disconnect":  # the client gave up: still one audit line
                    self._audit(400, "client_disconnected", context)
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await self._answer(send, 413, "body_too_large",
                                              f"the request body is larger than the limit of {limit} bytes", context)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body, client_receive = b"".join(chunks), receive
            replayed = False

            async def replay():  # the buffered body once, then the client's own events (disconnect)
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await client_receive()

            receive = replay

        route = V2_ROUTE.match(path) if self.model is not None else None
        if route is not None or path == "/v2/health/ready":
            return await self._v2(route, method, headers, body if method == "POST" else b"", context, send)

        rewritten = [(k, v) for k, v in request_headers if k not in (b"x-request-id", b"x-caller-id")]
        rewritten.append((b"x-request-id", request_id.encode()))
        if context["caller"]:
            rewritten.append((b"x-caller-id", context["caller"].encode()))
        scope = {**scope, "headers": rewritten}
        # kserve's v1 :explain answers with the request's own headers (API key included): drop the echo
        echo = {(k, v) for k, v in rewritten if k not in (b"content-type", b"content-length")}

        held: dict[str, Any] = {}

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                status = context["status"] = message["status"]
                out_headers = [(k, v) for k, v in message.get("headers", [])
                               if (k.lower(), v) not in echo and k.lower() not in (b"x-request-id",)]
                out_headers.append((b"x-request-id", request_id.encode()))
                if status >= 400:
                    held["start"], held["status"], held["body"] = {**message, "headers": out_headers}, status, b""
                    return
                return await send({**message, "headers": out_headers})
            if message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                return await self._finish_error(send, held, context)
            return await send(message)

        return await self.app(scope, receive, guarded_send)

    async def _v2(self, route, method: str, headers: dict[str, str], body: bytes, context: dict[str, Any],
                  send) -> None:
        """The Open Inference Protocol routes, answered here (see :mod:`serving.oip` for why)."""
        model = self.model
        if route is None:  # /v2/health/ready
            if method not in ("GET", "HEAD"):
                return await self._answer(send, 405, "method_not_allowed", "use GET", context)
            ready = await model.worker_ready()
            return await self._send_json(send, 200 if ready else 503, {"ready": ready}, context)
        name, version, verb = route.group("name"), route.group("version"), route.group("verb") or ""
        if name != self.settings.model_name:
            return await self._answer(send, 404, "not_found", "no such model; this server serves "
                                      f"{self.settings.model_name}", context)
        if version is not None and version != model.model_version:
            return await self._answer(send, 404, "not_found", f"no such model version; the served version is "
                                      f"{model.model_version}", context)
        allowed = ("POST",) if verb == "/infer" else ("GET", "HEAD")
        if method not in allowed:
            return await self._answer(send, 405, "method_not_allowed", f"use {' or '.join(allowed)} on this route",
                                      context, extra=[(b"allow", ", ".join(allowed).encode())])
        if verb == "/ready":
            ready = await model.worker_ready()
            return await self._send_json(send, 200 if ready else 503, {"name": name, "ready": ready}, context)
        if verb == "":
            return await self._send_json(send, 200, model_metadata(name, model.model_version, model.classes,
                                                                   model.image_size), context)
        try:
            request = parse_infer(body, headers)
        except OipError as error:
            return await self._answer(send, error.status, error.code, error.reason, context)
        forward_headers = {"x-request-id": context["request_id"]}
        if context["caller"]:
            forward_headers["x-caller-id"] = context["caller"]
        try:
            body, body_headers = request.forward_binary()  # one translation: the image bytes travel raw
            answer = await model._forward(f"/predictions/{name}", body, forward_headers, body_headers)
            if answer.get("model_version"):  # follow a rollout (serving.rollout) in metadata and refusals too
                model.model_version = str(answer["model_version"])
            content, extra = encode_response(answer, request, name, model.model_version)
        except FrontError as error:
            if not error.audited:
                self._audit(error.status, str(error.body.get("code")), context)
            context["audited"] = True  # by the front just now, or by the handler that refused it
            payload = {**error.body, "request_id": error.body.get("request_id") or context["request_id"]}
            return await self._send_json(send, error.status, payload, context)
        except (ValueError, KeyError, TypeError):
            log.error("v2 answer of the model server could not be encoded (%s)", context["request_id"])
            return await self._answer(send, 502, "bad_gateway", "the model server's answer could not be encoded",
                                      context)
        headers_out = [(b"content-length", str(len(content)).encode()),
                       (b"x-request-id", context["request_id"].encode())]
        headers_out += [(k.encode(), v.encode()) for k, v in extra.items()]
        context["audited"] = True  # the handler wrote the prediction lines
        context["status"] = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers_out})
        await send({"type": "http.response.body", "body": content, "more_body": False})

    async def _send_json(self, send, status: int, payload: dict[str, Any], context: dict[str, Any]) -> None:
        context["status"] = status
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", context["request_id"].encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _finish_error(self, send, held: dict[str, Any], context: dict[str, Any]) -> None:
        """Rewrite an error answer to {"error", "code"} and audit it unless the handler already did."""
        status = held["status"]
        headers = [(k, v) for k, v in held["start"]["headers"] if k.lower() not in (b"content-length",)]
        audited = any(k.lower() == AUDITED_HEADER.encode() for k, _ in headers)
        headers = [(k, v) for k, v in headers if k.lower() != AUDITED_HEADER.encode()]
        try:
            payload = json.loads(held["body"] or b"{}")
        except (ValueError, RecursionError):
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if status == 422 and "detail" in payload:  # FastAPI request validation: a malformed request is a 400
            status = 400
        if "code" not in payload or not isinstance(payload.get("code"), str):
            payload = {"error": _reason(payload, status), "code": error_code(status),
                       "request_id": context["request_id"]}
        else:
            payload.setdefault("request_id", context["request_id"])
        if not audited:
            self._audit(status, payload["code"], context)
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _answer(self, send, status: int, code: str, reason: str, context: dict[str, Any],
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self._audit(status, code, context)
        context["status"] = status
        body = json.dumps({"error": reason, "code": code, "request_id": context["request_id"]}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", context["request_id"].encode())] + (extra or [])})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _audit(self, status: int, code: str, context: dict[str, Any]) -> None:
        context["audited"] = True
        self.audit.error(request_id=context["request_id"], model_name=self.settings.model_name,
                         model_version=self.model_version(), caller_id=context["caller"],
                         latency_ms=(time.perf_counter() - context["started"]) * 1000.0,
                         protocol=context["protocol"], status=status, code=code, stage="front",
                         route=context["route"])

    def _audit_request(self, status: int, context: dict[str, Any]) -> None:
        context["audited"] = True
        self.audit.request(request_id=context["request_id"], model_name=self.settings.model_name,
                           model_version=self.model_version(), caller_id=context["caller"],
                           latency_ms=(time.perf_counter() - context["started"]) * 1000.0,
                           protocol=context["protocol"], status=status, route=context["route"])


FIXED_REASONS = {400: "the request is not valid for this route", 404: "no such route or model",
                 405: "this method is not allowed on this route", 413: "the request is too large",
                 415: "unsupported content type", 500: "the server failed on this request; the failure is logged",
                 501: "not implemented", 503: "the model is not ready"}


def _reason(payload: dict[str, Any], status: int) -> str:
    """A reason for a library's own error body, built from its structure, never from its text (which
    can quote the request, as kserve's decode errors do)."""
    detail = payload.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        if first.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        location = ".".join(str(part) if isinstance(part, int) or str(part) in SAFE_FIELDS else "*"
                            for part in first.get("loc", ()) if part != "body") or "body"
        kind = str(first.get("type", "invalid"))
        return f"{location}: invalid value ({kind if kind.replace('_', '').isalnum() else 'invalid'})"
    return FIXED_REASONS.get(status, f"the request was refused (HTTP {status})")


SAFE_FIELDS = frozenset({"instances", "data", "b64", "explain", "explain_method", "inputs", "outputs", "name", "shape",
                         "datatype", "parameters", "id", "query", "path", "header"})


def build_server(settings: FrontSettings, port: int):
    """(kserve.ModelServer, model) ready to ``server.start([model])``."""
    import kserve
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    model = _model_class()(settings)
    model.load()

    async def front_error_handler(_, exc: FrontError):
        headers = {AUDITED_HEADER: "1"} if exc.audited else {}
        return JSONResponse(status_code=exc.status, content=exc.body, headers=headers)

    app.add_exception_handler(FrontError, front_error_handler)
    refusals = AuditLog(settings.audit_log) if settings.audit_log else AuditLog()

    def audit_connection_refusal(status: int, code: str) -> None:
        refusals.error(request_id=str(uuid.uuid4()), model_name=settings.model_name, model_version=model.model_version,
                       caller_id=None, latency_ms=0.0, protocol="other", status=status, code=code, stage="front")

    connguard.ON_REFUSAL[:] = [audit_connection_refusal]
    connguard.install(connguard.ConnectionLimits(settings.header_timeout_s, settings.max_connections_per_client))
    app.add_middleware(FrontGuard, settings=settings, model_version=lambda: model.model_version, model=model)
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1, enable_docs_url=False,
                                enable_latency_logging=False)
    return server, model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (binds 0.0.0.0)")
    parser.add_argument("--torchserve-url", default="http://127.0.0.1:8085", help="TorchServe inference address")
    parser.add_argument("--management-url", default=None, help="TorchServe management address (model version)")
    parser.add_argument("--key-file", type=Path, required=True, help="TorchServe's key_file.json")
    parser.add_argument("--api-keys-file", type=Path, default=None, help=f'JSON {{"caller": "key"}}; else ${API_KEYS_ENV}')
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--max-body-mb", type=float, default=48.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--audit-log", type=Path, default=None, help="default $CXR_AUDIT_LOG or logs/audit.jsonl")
    parser.add_argument("--body-timeout-s", type=float, default=30.0, help="time to receive a whole request body")
    parser.add_argument("--header-timeout-s", type=float, default=10.0, help="time to receive the request headers")
    parser.add_argument("--max-connections-per-client", type=int, default=32)
    args = parser.parse_args(argv)
    api_keys = load_api_keys(args.api_keys_file)
    if not api_keys:
        parser.error(f"no API key configured: pass --api-keys-file or set {API_KEYS_ENV}=caller:key")
    settings = FrontSettings(torchserve_url=args.torchserve_url.rstrip("/"), key_file=args.key_file,
                             api_keys=api_keys, management_url=(args.management_url or "").rstrip("/") or None,
                             model_name=args.model_name, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                             timeout_s=args.timeout_s, audit_log=args.audit_log, body_timeout_s=args.body_timeout_s,
                             header_timeout_s=args.header_timeout_s,
                             max_connections_per_client=args.max_connections_per_client)
    sys.argv = sys.argv[:1]  # kserve parses sys.argv at import: keep our flags away from it
    server, model = build_server(settings, args.port)
    install_redaction()
    server.start([model])


if __name__ == "__main__":
    main()
