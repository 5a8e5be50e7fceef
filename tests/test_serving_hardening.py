"""Hostile input against the real stack: a fuzz suite over every route, stock OIP clients, the
front's connection limits, the gate as served, and readiness while the only worker restarts.

One TorchServe + front for the module (short front timeouts so the limit tests are quick). The
worker-restart test kills the worker and waits for it to come back; it runs last.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.audit import read_audit_log
from serving.client import read_answers, v1_request, v2_request
from serving.gate_report import incomplete_png
from serving.schemas import MODEL_NAME
from tests.imaging import dicom_bytes, gray_of, png_bytes
from tests.test_serving import API_KEY, CALLER, offline, png_with_size, serving_stack  # noqa: F401

pytestmark = pytest.mark.slow

FRONT_LIMITS = {"body_timeout_s": 3, "header_timeout_s": 2, "max_connections_per_client": 6}
V1, V1X, V2 = f"/v1/models/{MODEL_NAME}:predict", f"/v1/models/{MODEL_NAME}:explain", f"/v2/models/{MODEL_NAME}/infer"


@pytest.fixture(scope="module")
def stack(tiny_bundle, tmp_path_factory):
    with serving_stack(tiny_bundle, tmp_path_factory.mktemp("hardening"), FRONT_LIMITS) as served:
        yield served


@pytest.fixture(scope="module")
def radiograph(data_dir) -> bytes:
    return sorted((data_dir / "test" / "tuberculosis").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def gray(data_dir) -> np.ndarray:
    return gray_of(sorted((data_dir / "test" / "pneumonia").glob("*.jpg"))[0])


def binary_body(elements: list[bytes], shape=None, size_delta=0, header_extra=None) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = {"inputs": [{"name": "image", "shape": shape or [len(elements)], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(blob) + size_delta}}], **(header_extra or {})}
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text))}


def fuzz_kinds(stack, radiograph: bytes, gray: np.ndarray) -> dict:
    """kind -> (send(request_id) -> response, expected status, expected code)."""
    jpeg, b64 = radiograph, base64.b64encode(radiograph).decode()
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    gif = io.BytesIO()
    Image.new("L", (80, 80)).save(gif, "GIF", save_all=True, append_images=[Image.new("L", (80, 80), 255)])
    dicom = dicom_bytes(gray)
    noise = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8)))

    def front(path, json_body=None, content=None, headers=None, key=API_KEY, method="POST"):
        def send(request_id):
            sent = {"X-Request-Id": request_id, "Content-Type": "application/json", **(headers or {})}
            if key:
                sent["X-API-Key"] = key
            body = json.dumps(json_body).encode() if json_body is not None else content
            return stack.http.request(method, f"{stack.front_url}{path}", content=body, headers=sent)
        return send

    def binary(elements, **kwargs):
        content, headers = binary_body(elements, **kwargs)
        return front(V2, content=content, headers={**headers, "Content-Type": "application/octet-stream"})

    def torchserve(path, content, content_type="application/octet-stream"):
        def send(request_id):
            return stack.http.post(f"{stack.torchserve.inference_url}{path}", content=content, headers={
                **stack.torchserve.inference_headers(), "Content-Type": content_type, "X-Request-Id": request_id})
        return send

    native = f"/predictions/{MODEL_NAME}"
    return {
        # v1 (front)
        "v1 not an image": (front(V1, v1_request([b"%PDF-1.4 hello world"])), 415, "not_an_image"),
        "v1 cut jpeg": (front(V1, v1_request([jpeg[: len(jpeg) // 3]])), 422, "truncated"),
        "v1 jpeg cut then closed": (front(V1, v1_request([jpeg[: len(jpeg) * 2 // 5] + b"\xff\xd9"])), 422, "truncated"),
        "v1 png with 40% of its rows": (front(V1, v1_request([incomplete_png(gray)])), 422, "truncated"),
        "v1 empty image": (front(V1, {"instances": [{"data": ""}]}), 400, "empty"),
        "v1 bad base64": (front(V1, {"instances": [{"data": "***"}]}), 400, "bad_base64"),
        "v1 no instances": (front(V1, {"images": [b64]}), 400, "missing_field"),
        "v1 instances not a list": (front(V1, {"instances": b64}), 400, "invalid_request"),
        "v1 data and b64 both": (front(V1, {"instances": [{"data": b64, "b64": b64}]}), 400, "invalid_request"),
        "v1 malformed json": (front(V1, content=b'{"instances": [{"data": '), 400, "invalid_request"),
        "v1 json array body": (front(V1, content=b"[1, 2, 3]"), 400, "invalid_request"),
        "v1 json nested 100k deep": (front(V1, content=deep), 400, "invalid_request"),
        "v1 17 images": (front(V1, v1_request([b"x"] * 17)), 413, "too_many_images"),
        "v1 unknown explain method": (front(V1, {**v1_request([jpeg]), "explain_method": "lime"}), 400,
                                      "unknown_method"),
        "v1 png declaring 59 MP": (front(V1, v1_request([png_with_size(7700, 7700)])), 413, "too_many_pixels"),
        "v1 png declaring 400 MP": (front(V1, v1_request([png_with_size(20000, 20000)])), 413, "too_many_pixels"),
        "v1 10x10 image": (front(V1, v1_request([png_bytes(Image.new("L", (10, 10)))])), 422, "too_small"),
        "v1 animated gif": (front(V1, v1_request([gif.getvalue()])), 415, "unsupported_mode"),
        "v1 dicom cut": (front(V1, v1_request([dicom[: len(dicom) // 2]])), 422, "truncated"),
        "v1 body over the limit": (front(V1, content=b"{" + b" " * (3 << 20) + b"}"), 413, "body_too_large"),
        "v1 no api key": (front(V1, v1_request([jpeg]), key=None), 401, "unauthorized"),
        "v1 wrong api key": (front(V1, v1_request([jpeg]), key="nope"), 401, "unauthorized"),
        "v1 explain route, not an image": (front(V1X, v1_request([b"GIF89a junk"])), 415, "not_an_image"),
        "v1 PUT": (front(V1, v1_request([jpeg]), method="PUT"), 405, "method_not_allowed"),
        # v2 (front)
        "v2 NaN in shape": (front(V2, content=b'{"inputs": [{"name": "image", "shape": [NaN], "datatype": "BYTES", '
                                             b'"data": ["' + b64.encode() + b'"]}]}'), 400, "malformed_json"),
        "v2 shape is a string": (front(V2, {"inputs": [{**tensor, "shape": "1"}]}), 400, "wrong_shape"),
        "v2 shape 3x224x224": (front(V2, {"inputs": [{**tensor, "shape": [3, 224, 224]}]}), 400, "wrong_shape"),
        "v2 FP32": (front(V2, {"inputs": [{**tensor, "datatype": "FP32"}]}), 400, "wrong_datatype"),
        "v2 lower-case bytes": (front(V2, {"inputs": [{**tensor, "datatype": "bytes"}]}), 400, "wrong_datatype"),
        "v2 wrong input name": (front(V2, {"inputs": [{**tensor, "name": "input0"}]}), 400, "unknown_input"),
        "v2 two inputs": (front(V2, {"inputs": [tensor, tensor]}), 400, "wrong_shape"),
        "v2 unknown output": (front(V2, {"inputs": [tensor], "outputs": [{"name": "logits"}]}), 400, "unknown_output"),
        "v2 explain not a boolean": (front(V2, {"inputs": [tensor], "parameters": {"explain": "maybe"}}), 400,
                                     "invalid_request"),
        "v2 no inputs": (front(V2, {"inputs": []}), 400, "missing_field"),
        "v2 json nested 100k deep": (front(V2, content=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
                                     "malformed_json"),
        "v2 raw jpeg as the body": (front(V2, content=jpeg, headers={"Content-Type": "image/jpeg"}), 400,
                                    "malformed_json"),
        "v2 binary size mismatch": (binary([jpeg], size_delta=-7), 400, "wrong_shape"),
        "v2 binary length prefix past the end": (front(V2, content=binary_body([jpeg])[0][:-100], headers={
            **binary_body([jpeg])[1], "Content-Type": "application/octet-stream"}), 400, "wrong_shape"),
        "v2 binary header length past the body": (front(V2, content=b'{"inputs": []}', headers={
            "Inference-Header-Content-Length": "9999"}), 400, "invalid_request"),
        "v2 binary header length not a number": (front(V2, content=b'{"inputs": []}', headers={
            "Inference-Header-Content-Length": "ten"}), 400, "invalid_request"),
        "v2 binary shape says 2, holds 1": (binary([jpeg], shape=[2]), 400, "wrong_shape"),
        "v2 binary cut dicom": (binary([dicom[: len(dicom) // 2]]), 422, "truncated"),
        "v2 binary not an image": (binary([b"\x00\x01 definitely not an image"]), 415, "not_an_image"),
        "v2 unknown model": (front(f"/v2/models/other/infer", {"inputs": [tensor]}), 404, "not_found"),
        "v2 unknown model version": (front(f"/v2/models/{MODEL_NAME}/versions/99/infer", {"inputs": [tensor]}), 404,
                                     "not_found"),
        "v2 GET on infer": (front(V2, method="GET"), 405, "method_not_allowed"),
        "unknown route": (front("/v3/anything", {}), 404, "not_found"),
        # TorchServe direct
        "torchserve empty body": (torchserve(native, b""), 400, "empty"),
        # seeded, and not starting with "{" or "[" (a body that does is taken as JSON: 400 malformed_json)
        "torchserve garbage bytes": (torchserve(native, b"\x00" + np.random.default_rng(3).bytes(2999)), 415,
                                     "not_an_image"),
        "torchserve json nested 100k deep": (torchserve(native, deep, "application/json"), 400, "malformed_json"),
        "torchserve v2 NaN in shape": (torchserve(f"/v2/models/{MODEL_NAME}/infer", b'{"inputs": [{"name": "image", '
                                                  b'"shape": [NaN], "datatype": "BYTES", "data": ["x"]}]}',
                                                  "application/json"), 400, "invalid_request"),
        "torchserve v1 json number": (torchserve(f"/v1/models/{MODEL_NAME}:predict", b"42", "application/json"), 400,
                                      "invalid_request"),
        "torchserve png with 40% of its rows": (torchserve(native, incomplete_png(gray)), 422, "truncated"),
        # not errors: answered, but no diagnosis
        "v1 all-black png": (front(V1, v1_request([png_bytes(Image.new("L", (512, 512)))])), 200, "ungradable"),
        "v2 binary uniform noise": (binary([noise]), 200, "ungradable"),
        "torchserve 5000x64 strip": (torchserve(native, png_bytes(Image.fromarray(gray).resize((5000, 64)))), 200,
                                     "ungradable"),
    }


def outcome(response: httpx.Response) -> str:
    if response.status_code != 200:
        return response.json().get("code", "?")
    payload = response.json()
    protocol = "v2" if "outputs" in payload else "v1" if "predictions" in payload else "native"
    return read_answers(protocol, payload)[0].decision.label


def test_fuzz_every_route(stack, radiograph, gray):
    pid = stack.torchserve.worker_pids()
    kinds = fuzz_kinds(stack, radiograph, gray)
    assert len(kinds) >= 40
    table, ids = {}, {}
    for kind, (send, status, code) in kinds.items():
        ids[kind] = stack.new_id()
        response = send(ids[kind])
        table[kind] = (response.status_code, outcome(response))
        if response.status_code >= 400:
            body = response.json()
            assert body["error"] and body["request_id"] == ids[kind], (kind, body)
    expected = {kind: (status, code) for kind, (_, status, code) in kinds.items()}
    assert table == expected
    assert not [kind for kind, (status, _) in table.items() if status >= 500]
    assert stack.torchserve.worker_pids() == pid  # no request took the worker down
    # exactly one audit line per request (the gate's refusals included)
    lines = read_audit_log(stack.audit_log)
    for kind, request_id in ids.items():
        mine = [line for line in lines if line["request_id"] == request_id]
        assert len(mine) == 1, (kind, mine)
        assert mine[0]["status"] == expected[kind][0], (kind, mine[0])
    print("\nfuzz table:\n" + "\n".join(f"  {kind}: {status} {code}" for kind, (status, code) in table.items()))


def test_every_request_on_every_front_route_gets_exactly_one_audit_line(stack, radiograph):
    """Metadata, readiness and health answered by the front, a refusal and a prediction: one line each,
    naming the route (never the raw path), with the HTTP status the caller got."""
    version = stack.http.get(f"{stack.front_url}/v2/models/{MODEL_NAME}",
                             headers={"X-API-Key": API_KEY}).json()["versions"][0]
    calls = {  # name: (method, path, with key, body, expected status, expected event, expected route)
        "v2 model metadata": ("GET", f"/v2/models/{MODEL_NAME}", True, None, 200, "request", "v2.model.metadata"),
        "v2 versioned metadata": ("GET", f"/v2/models/{MODEL_NAME}/versions/{version}", True, None, 200, "request",
                                  "v2.model.metadata"),
        "v2 model ready": ("GET", f"/v2/models/{MODEL_NAME}/ready", False, None, 200, "request", "v2.model.ready"),
        "v2 server ready": ("GET", "/v2/health/ready", False, None, 200, "request", "v2.health.ready"),
        "v2 server live": ("GET", "/v2/health/live", False, None, 200, "request", "v2.health.live"),
        "v1 model status": ("GET", f"/v1/models/{MODEL_NAME}", False, None, 200, "request", "v1.model"),
        "v1 without a key": ("POST", V1, False, v1_request([radiograph]), 401, "error", "v1.predict"),
        "v1 predict": ("POST", V1, True, v1_request([radiograph]), 200, "prediction", None),
        "v2 infer": ("POST", V2, True, v2_request([radiograph]), 200, "prediction", None),
    }
    ids = {}
    for name, (method, path, keyed, body, status, _, _) in calls.items():
        ids[name] = stack.new_id()
        headers = {"X-Request-Id": ids[name], **({"X-API-Key": API_KEY} if keyed else {})}
        response = stack.http.request(method, f"{stack.front_url}{path}", headers=headers,
                                      content=json.dumps(body).encode() if body is not None else None)
        assert response.status_code == status, (name, response.status_code)
    lines = read_audit_log(stack.audit_log)
    for name, (_, _, keyed, _, status, event, route) in calls.items():
        mine = [line for line in lines if line["request_id"] == ids[name]]
        assert [(line["event"], line["status"]) for line in mine] == [(event, status)], (name, mine)
        if route is not None:
            assert mine[0]["route"] == route and mine[0]["stage"] == "front", (name, mine[0])
        assert mine[0]["caller_id"] == (CALLER if keyed else None), (name, mine[0])


def test_ungradable_answer_presents_no_finding(stack):
    black = png_bytes(Image.new("L", (600, 600)))
    response = stack.front(V2, json_body=v2_request([black]))
    assert response.status_code == 200
    answer = read_answers("v2", response.json())[0]
    assert answer.decision.label == "ungradable" and answer.decision.triage == "review"
    assert answer.probabilities == {} and answer.probabilities_raw == {} and answer.gate.code == "blank"
    probabilities = next(o for o in response.json()["outputs"] if o["name"] == "probabilities")
    assert probabilities["parameters"]["ungradable_items"] == "0"


def test_stock_oip_clients(stack, offline, radiograph):  # noqa: F811
    from serving.conformance import run_checks

    expected = offline.predict_bytes(radiograph).decision.label
    checks = run_checks(stack.front_url, API_KEY, radiograph, stack.version, expected)
    assert [check["check"] for check in checks if not check["ok"]] == [], checks
    assert len(checks) >= 14


def _raw_socket(stack) -> socket.socket:
    port = int(stack.front_url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=20)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, socket.timeout):
        pass
    return b"".join(chunks)


def test_front_limits_slow_clients_and_connection_cap(stack, radiograph):
    # a body at 1 byte a second: 408 once the body timeout passes, connection closed
    started = time.monotonic()
    sock = _raw_socket(stack)
    sock.sendall(f"POST {V1} HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 1000\r\n\r\n".encode())
    for _ in range(6):
        try:
            sock.sendall(b" ")
        except OSError:
            break
        time.sleep(1.0)
    answer = _read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer, answer[:200]
    assert time.monotonic() - started < FRONT_LIMITS["body_timeout_s"] + 5
    # headers that never finish: 408 after the header timeout, whatever the client does
    slow = [_raw_socket(stack) for _ in range(3)]
    for sock in slow:
        sock.sendall(b"POST /v1/models/cxr-screen:predict HTTP/1.1\r\nHost: x\r\n")
    time.sleep(FRONT_LIMITS["header_timeout_s"] + 1.0)
    for sock in slow:
        answer = _read_all(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b'"header_timeout"' in answer, answer[:200]
    # one client holding many sockets: beyond the cap, 429 at once
    held = [_raw_socket(stack) for _ in range(FRONT_LIMITS["max_connections_per_client"])]
    time.sleep(0.3)
    extra = _raw_socket(stack)
    answer = _read_all(extra)
    assert answer.startswith(b"HTTP/1.1 429") and b'"too_many_connections"' in answer, answer[:200]
    for sock in held + [extra]:
        sock.close()
    time.sleep(0.3)
    assert stack.front(V1, json_body=v1_request([radiograph])).status_code == 200  # the front serves on
    codes = [line["error_code"] for line in read_audit_log(stack.audit_log) if line["event"] == "error"]
    assert {"body_timeout", "header_timeout", "too_many_connections"} <= set(codes)


def test_explain_on_a_model_without_explanations_gives_the_prediction(monitoring_bundle, radiograph, tmp_path):
    """The real handler on the HOG bundle (no feature maps), called as TorchServe calls it."""
    from serving.handler import CxrScreenHandler

    class Context:
        manifest = {"model": {"modelName": MODEL_NAME, "modelVersion": "7"}}
        system_properties = {"model_dir": str(tmp_path)}

        def __init__(self):
            self.status = {}

        def get_request_id(self, index):
            return f"r{index}"

        def get_all_request_header(self, index):
            return {"content-type": "application/json"}

        def get_request_header(self, index, name):
            return self.get_all_request_header(index).get(name)

        def set_response_status(self, code, phrase, idx=0):
            self.status[idx] = code

        def set_response_content_type(self, index, value):
            pass

    (tmp_path / "bundle").symlink_to(monitoring_bundle, target_is_directory=True)
    os.environ["CXR_AUDIT_LOG"] = str(tmp_path / "audit.jsonl")
    try:
        handler, context = CxrScreenHandler(), Context()
        handler.initialize(context)
        answers = handler.handle([{"body": v1_request([radiograph], explain=True)}], context)
    finally:
        os.environ.pop("CXR_AUDIT_LOG", None)
    assert context.status[0] == 200
    answer = read_answers("v1", json.loads(answers[0]))[0]
    assert answer.explanation is None and answer.decision.label
    assert answer.notes and "no explanation" in answer.notes[0]


def test_ready_is_false_while_the_only_worker_restarts(stack, radiograph):
    """Runs last (it kills the worker). TorchServe's /ping stays healthy through a restart; the
    front's readiness must not."""
    urls = [f"{stack.front_url}/v2/health/ready", f"{stack.front_url}/v2/models/{MODEL_NAME}/ready"]
    assert [httpx.get(url, timeout=5).status_code for url in urls] == [200, 200]
    (pid,) = stack.torchserve.worker_pids()
    os.kill(pid, signal.SIGKILL)
    seen: list[tuple[float, int, int]] = []
    started = time.monotonic()
    while time.monotonic() - started < 120:
        statuses = [httpx.get(url, timeout=5).status_code for url in urls]
        seen.append((round(time.monotonic() - started, 2), *statuses))
        if any(s == 503 for _, *ss in seen for s in ss) and statuses == [200, 200]:
            break
        time.sleep(0.1)
    not_ready = [entry for entry in seen if entry[1] == 503 and entry[2] == 503]
    assert not_ready, seen[:20]
    assert seen[-1][1:] == (200, 200), seen[-5:]
    assert stack.torchserve.worker_pids() != [pid]
    assert stack.front(V1, json_body=v1_request([radiograph])).status_code == 200
    print(f"\nready=false for {not_ready[-1][0] - not_ready[0][0]:.1f} s of the restart ({len(not_ready)} probes)")
