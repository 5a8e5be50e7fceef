"""The real serving stack: TorchServe (token auth on) + the KServe front, on free local ports.

One TorchServe and one front for the whole module (started once, always stopped, also when a test
fails). Real images from the default data go over every protocol and must get exactly the bundle's
offline answer; batches answer each request on its own; bad input never kills the worker; every
request leaves one audit line; the front wants an API key.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cxr_core.bundle import load_bundle
from serving.audit import read_audit_log
from serving.client import read_answers, v1_request, v2_request
from serving.config import PackageConfig, ServingConfig
from serving.mar import build_package
from serving.schemas import MODEL_NAME, PredictionResponse
from serving.stack import start_front
from serving.torchserve_process import TorchServe, free_port, stop_process_group
from tests.imaging import dicom_bytes, gray_of, png_bytes

pytestmark = pytest.mark.slow

API_KEY = "test-key-" + uuid.uuid4().hex
CALLER = "test-hospital"


@dataclass
class Stack:
    torchserve: TorchServe
    front_url: str
    audit_log: Path
    version: str
    package: Path
    root: Path | None = None
    bundle: Path | None = None
    sent: list[str] = field(default_factory=list)  # every request id we sent, for the audit test
    lock: threading.Lock = field(default_factory=threading.Lock)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16)))

    def new_id(self) -> str:
        request_id = f"t-{uuid.uuid4().hex}"
        with self.lock:
            self.sent.append(request_id)
        return request_id

    def front(self, path: str, *, json_body=None, content: bytes | None = None, key: str | None = API_KEY,
              content_type: str = "application/json", headers: dict | None = None) -> httpx.Response:
        headers = {"X-Request-Id": self.new_id(), "Content-Type": content_type, **(headers or {})}
        if key:
            headers["X-API-Key"] = key
        body = json.dumps(json_body).encode() if json_body is not None else content
        return self.http.post(f"{self.front_url}{path}", content=body, headers=headers)

    def torchserve_post(self, path: str, *, json_body=None, content: bytes | None = None,
                        request_id: str | None = None) -> httpx.Response:
        headers = {"X-Request-Id": request_id or self.new_id(), **self.torchserve.inference_headers(),
                   "Content-Type": "application/json" if json_body is not None else "application/octet-stream"}
        body = json.dumps(json_body).encode() if json_body is not None else content
        return self.http.post(f"{self.torchserve.inference_url}{path}", content=body, headers=headers)


@pytest.fixture(scope="module")
def offline(tiny_bundle):
    """The bundle in this process, single-threaded like the worker, so numbers match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_bundle(tiny_bundle)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def serving_stack(bundle: Path, root: Path, front: dict | None = None):
    """TorchServe (batch 4, one worker) + the KServe front on free ports; always stopped."""
    package = build_package(bundle, root / "model-package", version="3",
                            config=PackageConfig(workers=1, batch_size=4, max_batch_delay_ms=300))
    audit_log = root / "audit.jsonl"
    keys_file = root / "api_keys.json"
    keys_file.write_text(json.dumps({CALLER: API_KEY}))
    config = ServingConfig.model_validate({"front": {"max_body_mb": 2, **(front or {})}})
    torchserve = TorchServe(package.root, root / "state", audit_log=audit_log, torch_threads=1)
    process = None
    try:
        torchserve.start()
        port = free_port()
        process = start_front(torchserve, port, root / "state", keys_file, config, audit_log)
        served = Stack(torchserve, f"http://127.0.0.1:{port}", audit_log, package.version, package.root, root, bundle)
        yield served
        served.http.close()
    finally:
        if process is not None:
            stop_process_group(process.pid)
        torchserve.stop()


@pytest.fixture(scope="module")
def stack(tiny_bundle, tmp_path_factory):
    with serving_stack(tiny_bundle, tmp_path_factory.mktemp("serving")) as served:
        yield served


@pytest.fixture(scope="module")
def images(data_dir) -> dict[str, bytes]:
    """One real test radiograph per class, one that is not square, and a DICOM of a real one."""
    chosen = {}
    for label in ("tuberculosis", "pneumonia", "normal"):
        chosen[label] = sorted((data_dir / "test" / label).glob("*.jpg"))[0].read_bytes()
    for path in sorted((data_dir / "test").glob("*/*.jpg")):
        with Image.open(path) as image:
            if image.width != image.height:
                chosen["not_square"] = path.read_bytes()
                break
    chosen["dicom"] = dicom_bytes(gray_of(sorted((data_dir / "test" / "normal").glob("*.jpg"))[1]))
    return chosen


def assert_same_answer(answer: PredictionResponse, expected, atol: float = 1e-6) -> None:
    """Served answer == the bundle's offline prediction (decision, calibrated and raw probabilities)."""
    assert answer.classes == expected.classes
    for name in expected.classes:
        assert answer.probabilities[name] == pytest.approx(expected.probabilities[name], abs=atol)
        assert answer.probabilities_raw[name] == pytest.approx(expected.probabilities_raw[name], abs=atol)
    decision = expected.decision
    assert (answer.decision.label, answer.decision.fired_class, answer.decision.triage) == (
        decision.label, decision.fired_class, decision.triage)
    if decision.threshold is None:
        assert answer.decision.threshold is None
    else:
        assert answer.decision.threshold == pytest.approx(decision.threshold)
    assert answer.quality == expected.quality


def png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8), 128)))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------- tests

def test_package_has_the_kserve_layout(stack):
    properties = (stack.package / "config" / "config.properties").read_text()
    assert "enable_envvars_config=true" in properties
    assert not any(line.startswith("service_envelope") for line in properties.splitlines())
    snapshot = json.loads(next(line for line in properties.splitlines() if line.startswith("model_snapshot="))
                          .split("=", 1)[1])
    entry = snapshot["models"][MODEL_NAME]["3"]
    assert (entry["marName"], entry["minWorkers"], entry["batchSize"], entry["maxBatchDelay"]) == (
        "cxr-screen.mar", 1, 4, 300)
    assert "responseTimeout" in entry and "model_store=/mnt/models/model-store" in properties
    import zipfile

    names = set(zipfile.ZipFile(stack.package / "model-store" / "cxr-screen.mar").namelist())
    assert {"handler.py", "bundle/bundle.json", "bundle/weights.pt", "cxr_core/bundle.py", "serving/envelopes.py",
            "requirements.txt", "MAR-INF/MANIFEST.json"} <= names


def test_every_protocol_gives_the_offline_answer(stack, offline, images):
    """Training/serving parity over native, KServe v1 and v2 (front and TorchServe's own routes)."""
    for name, data in images.items():
        expected = offline.predict_bytes(data)
        routes = {
            "native (TorchServe)": ("native", stack.torchserve_post(f"/predictions/{MODEL_NAME}", content=data)),
            "v1 (TorchServe)": ("v1", stack.torchserve_post(f"/v1/models/{MODEL_NAME}:predict",
                                                            json_body=v1_request([data]))),
            "v2 (TorchServe)": ("v2", stack.torchserve_post(f"/v2/models/{MODEL_NAME}/infer",
                                                            json_body=v2_request([data]))),
            "v1 (front)": ("v1", stack.front(f"/v1/models/{MODEL_NAME}:predict", json_body=v1_request([data]))),
            "v2 (front)": ("v2", stack.front(f"/v2/models/{MODEL_NAME}/infer", json_body=v2_request([data]))),
            "raw image (front)": ("native", stack.front(f"/v1/models/{MODEL_NAME}:predict", content=data,
                                                        content_type="image/jpeg")),
        }
        for route, (protocol, response) in routes.items():
            assert response.status_code == 200, (name, route, response.text[:300])
            answers = read_answers(protocol, response.json())
            assert len(answers) == 1
            answer = answers[0]
            assert_same_answer(answer, expected)
            assert (answer.model_name, answer.model_version) == (MODEL_NAME, "3")
            assert answer.latency_ms > 0 and answer.request_id.startswith("t-")
            assert set(answer.thresholds) == set(offline.manifest.policy.thresholds)
            if protocol == "v2":
                payload = response.json()
                assert (payload["model_name"], payload["model_version"]) == (MODEL_NAME, "3")
                probabilities = next(o for o in payload["outputs"] if o["name"] == "probabilities")
                assert probabilities["shape"] == [1, len(expected.classes)]
                assert probabilities["data"] == pytest.approx([expected.probabilities[c] for c in expected.classes],
                                                              abs=1e-6)
    # several images in one v2 request: one answer each, in order
    several = [images["tuberculosis"], images["normal"], images["pneumonia"]]
    response = stack.front(f"/v2/models/{MODEL_NAME}/infer", json_body=v2_request(several))
    assert response.status_code == 200
    for answer, data, item in zip(read_answers("v2", response.json()), several, range(3)):
        assert answer.item == item
        assert_same_answer(answer, offline.predict_bytes(data), atol=1e-5)


def test_explain_returns_a_png_of_the_input_size(stack, offline, images):
    data = images["not_square"]
    with Image.open(io.BytesIO(data)) as original:
        size = original.size
    expected = offline.predict_bytes(data)
    explain_v1 = stack.front(f"/v1/models/{MODEL_NAME}:explain", json_body=v1_request([data]))
    predict_v2 = stack.front(f"/v2/models/{MODEL_NAME}/infer", json_body=v2_request([data], explain=True,
                                                                                   method="gradcam++"))
    for protocol, response, method in (("v1", explain_v1, "gradcam"), ("v2", predict_v2, "gradcam++")):
        assert response.status_code == 200, response.text[:300]
        assert "x-api-key" not in {k.lower() for k in response.headers}  # kserve echoes request headers
        answer = read_answers(protocol, response.json())[0]
        assert_same_answer(answer, expected)
        explanation = answer.explanation
        assert explanation is not None and explanation.method == method
        assert explanation.target_class == expected.decision.label
        png = base64.b64decode(explanation.overlay_png_base64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(png)) as overlay:
            overlay.load()
            assert overlay.size == size == (explanation.width, explanation.height)
        assert sum(explanation.lung_zones.values()) + explanation.outside_chest == pytest.approx(1.0, abs=2e-3)
        assert set(explanation.lung_zones) == {f"{row}_{side}" for row in ("upper", "middle", "lower")
                                               for side in ("left", "right")}
    assert "explanations" in explain_v1.json()
    plain = stack.front(f"/v1/models/{MODEL_NAME}:predict", json_body=v1_request([data]))
    assert read_answers("v1", plain.json())[0].explanation is None


def test_a_batch_answers_every_request_on_its_own(stack, offline, images):
    """batchSize 4: four concurrent requests (three protocols + one bad) land in one handler call."""
    good = [images["tuberculosis"], images["pneumonia"], images["normal"]]
    expected = offline.predict_many(good + [b"\xff\xd8 not a jpeg"])
    routes = [("native", f"/predictions/{MODEL_NAME}", {"content": good[0]}),
              ("v1", f"/v1/models/{MODEL_NAME}:predict", {"json_body": v1_request([good[1]])}),
              ("v2", f"/v2/models/{MODEL_NAME}/infer", {"json_body": v2_request([good[2]])}),
              ("bad", f"/predictions/{MODEL_NAME}", {"content": b"\xff\xd8 not a jpeg"})]
    for attempt in range(5):
        ids = [stack.new_id() for _ in routes]
        barrier = threading.Barrier(len(routes))

        def call(index: int) -> httpx.Response:
            _, path, body = routes[index]
            barrier.wait()
            return stack.torchserve_post(path, request_id=ids[index], **body)

        with ThreadPoolExecutor(len(routes)) as pool:
            responses = list(pool.map(call, range(len(routes))))
        for (protocol, _, _), request_id, response, offline_answer in zip(routes, ids, responses, expected):
            if protocol == "bad":
                assert response.status_code == 415, response.text[:300]
                assert response.json()["code"] == "not_an_image" and response.json()["request_id"] == request_id
                continue
            assert response.status_code == 200, response.text[:300]
            answer = read_answers(protocol, response.json())[0]
            assert answer.request_id == request_id  # its own answer, not a neighbour's
            assert_same_answer(answer, offline_answer, atol=1e-5)
        lines = [line for line in read_audit_log(stack.audit_log) if line["request_id"] in ids]
        assert len(lines) == 4
        if all(line["batch_size"] == 4 for line in lines):
            return
    pytest.fail("four concurrent requests never landed in one batch of 4 in 5 attempts")


def test_bad_input_gets_4xx_and_never_kills_the_worker(stack, images):
    pid_before = stack.torchserve.worker_pids()
    jpeg = images["tuberculosis"]
    v1 = f"/v1/models/{MODEL_NAME}:predict"
    v2 = f"/v2/models/{MODEL_NAME}/infer"
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(jpeg)]}
    kinds = {
        "not an image": (lambda: stack.front(v1, json_body=v1_request([b"%PDF-1.4 hello"])), 415, "not_an_image"),
        "truncated": (lambda: stack.front(v1, json_body=v1_request([jpeg[: len(jpeg) // 3]])), 422, "truncated"),
        "empty": (lambda: stack.front(v1, json_body={"instances": [{"data": ""}]}), 400, "empty"),
        "empty raw body": (lambda: stack.torchserve_post(f"/predictions/{MODEL_NAME}", content=b""), 400, "empty"),
        "too many megapixels": (lambda: stack.front(v1, json_body=v1_request([png_with_size(20000, 20000)])), 413,
                                "too_many_pixels"),
        "too small": (lambda: stack.front(v2, json_body=v2_request([png_bytes(Image.new("L", (10, 10)))])), 422,
                      "too_small"),
        "body too large": (lambda: stack.front(v1, content=b"{" + b" " * (3 * 1024 * 1024) + b"}"), 413,
                           "body_too_large"),
        "bad base64": (lambda: stack.front(v1, json_body={"instances": [{"data": "not*base64!"}]}), 400, "bad_base64"),
        "missing field v1": (lambda: stack.front(v1, json_body={"images": [b64(jpeg)]}), 400, "missing_field"),
        "missing field v2": (lambda: stack.front(v2, json_body={"inputs": [{"name": "image", "datatype": "BYTES",
                                                                            "shape": [1]}]}),
                             400, "missing_field"),
        "wrong datatype": (lambda: stack.front(v2, json_body={"inputs": [{**tensor, "datatype": "FP32"}]}), 400,
                           "wrong_datatype"),
        "wrong shape": (lambda: stack.front(v2, json_body={"inputs": [{**tensor, "shape": [3, 224, 224]}]}), 400,
                        "wrong_shape"),
        "malformed json v1": (lambda: stack.front(v1, content=b'{"instances": [{"data": '), 400, "invalid_request"),
        "malformed json v2": (lambda: stack.front(v2, content=b'{"inputs": [}'), 400, "malformed_json"),
        "malformed json native": (lambda: stack.torchserve_post(f"/predictions/{MODEL_NAME}", content=b'{"data": '),
                                  400, "malformed_json"),
        "too many images": (lambda: stack.front(v1, json_body=v1_request([b"x"] * 17)), 413, "too_many_images"),
        "no api key": (lambda: stack.front(v1, json_body=v1_request([jpeg]), key=None), 401, "unauthorized"),
    }
    with ThreadPoolExecutor(8) as pool:
        for kind, (send, status, code) in kinds.items():
            for response in pool.map(lambda _: send(), range(50)):
                assert response.status_code == status, (kind, response.status_code, response.text[:300])
                body = response.json()
                assert body["code"] == code and body["error"], (kind, body)
    good = stack.front(v1, json_body=v1_request([jpeg]))
    assert good.status_code == 200
    assert stack.torchserve.worker_pids() == pid_before
    assert stack.torchserve.describe()["workers"][0]["status"] == "READY"


def test_front_wants_an_api_key(stack, images):
    url = f"/v1/models/{MODEL_NAME}:predict"
    body = v1_request([images["normal"]])
    missing = stack.front(url, json_body=body, key=None)
    wrong = stack.front(url, json_body=body, key="not-the-key")
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.json()["code"] == "unauthorized" and "API key" in missing.json()["error"]
    bearer = stack.front(url, json_body=body, key=None, headers={"Authorization": f"Bearer {API_KEY}"})
    assert bearer.status_code == 200
    assert httpx.get(f"{stack.front_url}/v2/models/{MODEL_NAME}", headers={"X-Request-Id": stack.new_id()},
                     timeout=10).status_code == 401
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready", f"/v1/models/{MODEL_NAME}"):
        assert httpx.get(f"{stack.front_url}{path}", timeout=10).status_code == 200, path
    metadata = httpx.get(f"{stack.front_url}/v2/models/{MODEL_NAME}", headers={"X-API-Key": API_KEY}, timeout=10).json()
    assert metadata["name"] == MODEL_NAME and metadata["inputs"][0]["datatype"] == "BYTES"
    # TorchServe itself keeps token authorization on
    refused = httpx.post(f"{stack.torchserve.inference_url}/predictions/{MODEL_NAME}", content=images["normal"],
                         timeout=30)
    assert refused.status_code in (400, 401) and "Token" in refused.text
    # a new TorchServe inference token (rotation or expiry): the front picks it up from the key file
    old_token = stack.torchserve.keys().inference
    rotated = httpx.get(f"{stack.torchserve.management_url}/token?type=inference",
                        headers={"Authorization": f"Bearer {stack.torchserve.keys().api}"}, timeout=10)
    assert rotated.status_code == 200 and stack.torchserve.keys().inference != old_token
    time.sleep(2.1)  # the front's cached health check expires: its next /ping carries the old token
    assert stack.front(url, json_body=body).status_code == 200


def test_triage_and_latency_through_the_endpoint(stack, offline, images, data_dir, tmp_path):
    from serving.latency import run as measure_latency
    from serving.latency import latency_images
    from serving.triage import sort_rows, triage_endpoint, write_worklist

    folder = tmp_path / "inbox"
    folder.mkdir()
    for name in ("tuberculosis", "pneumonia", "normal", "dicom"):
        (folder / f"{name}.img").write_bytes(images[name])
    (folder / "readme.txt").write_text("not an image")
    rows, ranked = triage_endpoint(sorted(folder.iterdir()), stack.front_url, API_KEY, folder, workers=2)
    rows = sort_rows(rows, ranked)
    write_worklist(rows, ranked, tmp_path / "worklist.csv")
    assert [(row.path, row.error_code) for row in rows if row.answer is None] == [("readme.txt", "not_an_image")]
    for row in rows[:-1]:
        expected = offline.predict_bytes((folder / row.path).read_bytes())
        assert row.answer.decision.label == expected.decision.label
    order = {"urgent": 0, "review": 1, "routine": 2}
    keys = [(order[row.answer.decision.triage], -row.risk(ranked)) for row in rows[:-1]]
    assert keys == sorted(keys)
    text = (tmp_path / "worklist.csv").read_text().splitlines()
    assert text[0].startswith("rank,file,status,triage") and text[-1].split(",")[2] == "failed"

    report = measure_latency(stack.front_url, API_KEY, stack.torchserve.inference_url,
                             stack.torchserve.keys().inference, stack.torchserve.management_url,
                             stack.torchserve.keys().management, latency_images(data_dir, 3), n=2, warmup=0)
    assert set(report["protocols"]) == {"native", "v1", "v2"}
    for stats in report["protocols"].values():
        assert stats["n"] == 2 and 0 < stats["p50_ms"] <= stats["p95_ms"]
    assert report["model"]["batchSize"] == 4
    triage_lines = [r for r in read_audit_log(stack.audit_log) if r["request_id"].startswith("triage-")]
    assert len(triage_lines) == 5  # 4 images + the text file, one line each


def test_audit_log_has_one_valid_line_per_request(stack, images):
    """Every request of this module (good or refused, front or TorchServe) left one line.

    It sends its own traffic first (good and refused, single and multi-image, the DICOM with patient
    tags, TorchServe direct), so it holds alone as well as after the other tests of the module.
    """
    assert stack.front(f"/v1/models/{MODEL_NAME}:predict", json_body=v1_request([images["dicom"]])).status_code == 200
    assert stack.front(f"/v2/models/{MODEL_NAME}/infer",
                       json_body=v2_request([images["normal"], images["pneumonia"]])).status_code == 200
    assert stack.front(f"/v1/models/{MODEL_NAME}:predict",
                       json_body=v1_request([b"%PDF-1.4 hello"])).status_code == 415
    assert stack.torchserve_post(f"/predictions/{MODEL_NAME}", content=images["tuberculosis"]).status_code == 200
    records = read_audit_log(stack.audit_log)  # validates every line
    by_id: dict[str, list[dict]] = {}
    for record in records:
        if record["event"] != "request":  # predictions and refusals; the front's own answers below
            by_id.setdefault(record["request_id"], []).append(record)
    # metadata, readiness and health (probes and clients sending no id get a fresh one): one line each
    front_answers = [r for r in records if r["event"] == "request"]
    assert front_answers and all(r["stage"] == "front" and r["route"] and r["status"] for r in front_answers)
    assert not {r["request_id"] for r in front_answers} & set(by_id)
    assert len({r["request_id"] for r in front_answers}) == len(front_answers)
    for request_id in stack.sent:
        assert request_id in by_id, request_id
    clients = {request_id for request_id in by_id if request_id.startswith(("triage-", "latency-"))}
    assert set(by_id) == set(stack.sent) | clients
    for request_id, lines in by_id.items():
        items = sorted(line.get("item") or 0 for line in lines)
        assert items == list(range(len(lines))), lines  # one line, or one per image of a multi-image request
    predictions = [r for r in records if r["event"] == "prediction"]
    errors = [r for r in records if r["event"] == "error"]
    assert predictions and errors
    for record in predictions:
        assert {"p_normal", "p_pneumonia", "p_tuberculosis", "decision", "triage", "underexposed",
                "mean_intensity"} <= set(record)
        assert record["model_version"] == "3" and record["time"].endswith("Z")
    assert {r["caller_id"] for r in predictions if r["protocol"] in ("v1", "v2")} >= {CALLER}
    assert all(r["error_code"] and r["status"] >= 400 for r in errors)
    raw = stack.audit_log.read_text()
    assert "Doe^Jane" not in raw and "SECRET-12345" not in raw  # the DICOM's patient tags
    assert max(len(line) for line in raw.splitlines()) < 4000  # no image bytes
    assert np.isfinite([r["latency_ms"] for r in records]).all()
