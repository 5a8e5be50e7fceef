"""Protocol translation and the handler's batch contract, without servers (fast)."""

from __future__ import annotations

import base64
import json
import time

import pytest

from serving.envelopes import decode_base64, parse_request
from serving.mar import config_properties
from serving.config import PackageConfig
from serving.schemas import HTTP_STATUS, MAX_ID_LENGTH, STATUS_CODES, RequestError, clean_id, error_code, http_status

IMAGE = b"\x89PNG\r\n\x1a\n fake image bytes"
B64 = base64.b64encode(IMAGE).decode()


@pytest.mark.parametrize("row, content_type, protocol, single", [
    ({"body": bytearray(IMAGE)}, "application/octet-stream", "native", True),
    ({"data": bytearray(IMAGE)}, "multipart/form-data", "native", True),
    ({"body": {"data": B64}}, "application/json", "native", True),
    ({"body": {"b64": B64}}, "application/json", "native", True),
    ({"body": {"instances": [{"data": B64}]}}, "application/json", "v1", False),
    ({"body": {"instances": [{"b64": B64}, B64]}}, "application/json", "v1", False),
    ({"body": json.dumps({"instances": [B64]}).encode()}, "application/octet-stream", "v1", False),
    ({"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [B64]}]}}, "application/json",
     "v2", False),
    ({"body": {"inputs": [{"name": "x", "shape": [-1], "datatype": "BYTES", "data": [B64, B64]}]}},
     "application/json", "v2", False),
    ({"body": {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "BYTES", "data": [B64, B64]}]}},
     "application/json", "v2", False),
])
def test_every_request_shape_yields_its_images(row, content_type, protocol, single):
    parsed = parse_request(row, content_type)
    assert parsed.protocol == protocol and parsed.single == single
    assert all(image == IMAGE for image in parsed.images) and parsed.images


@pytest.mark.parametrize("text", [B64, B64.rstrip("="), f"data:image/png;base64,{B64}",
                                  base64.urlsafe_b64encode(IMAGE).decode(), B64[:10] + "\n" + B64[10:]])
def test_base64_variants(text):
    assert decode_base64(text, "x") == IMAGE


@pytest.mark.parametrize("row, code", [
    ({"body": bytearray()}, "empty"),
    ({"body": b'{"instances": ['}, "malformed_json"),
    ({"body": []}, "invalid_request"),
    ({"body": {"images": [B64]}}, "missing_field"),
    ({"body": {"instances": []}}, "invalid_request"),
    ({"body": {"instances": [{"data": "%%%"}]}}, "bad_base64"),
    ({"body": {"instances": [{"data": ""}]}}, "empty"),
    ({"body": {"instances": [{"data": 12}]}}, "invalid_request"),
    ({"body": {"instances": [B64] * 17}}, "too_many_images"),
    ({"body": {"instances": [B64], "explain": True, "explain_method": "lime"}}, "unknown_method"),
    ({"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}}, "wrong_datatype"),
    ({"body": {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [B64]}]}}, "wrong_shape"),
    ({"body": {"inputs": [{"name": "x", "shape": [1, 64, 64], "datatype": "BYTES", "data": [B64]}]}}, "wrong_shape"),
    ({"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [[1, 2]]}]}}, "wrong_datatype"),
    ({"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]}}, "missing_field"),
    ({"body": {"inputs": []}}, "invalid_request"),
    ({"body": {"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": [B64]}] * 2}}, "wrong_shape"),
])
def test_bad_envelopes_are_refused_with_a_reason(row, code):
    with pytest.raises(RequestError) as caught:
        parse_request(row, "application/json")
    assert caught.value.code == code and str(caught.value)
    assert 400 <= http_status(code) < 500


def test_explain_flags():
    assert parse_request({"body": {"instances": [B64], "explain": True, "explain_method": "gradcam++"}}).explain
    parsed = parse_request({"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [B64]}],
                                     "parameters": {"explain": True, "explain_method": "gradcam++"}}})
    assert parsed.explain and parsed.explain_method == "gradcam++"
    assert parse_request({"body": bytearray(IMAGE)}, explain_route=True).explain


def test_config_properties_follow_the_kserve_example():
    text = config_properties(PackageConfig(workers=2, batch_size=8, max_batch_delay_ms=25, response_timeout_s=60), "7")
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["enable_envvars_config"] == "true" and lines["model_store"] == "/mnt/models/model-store"
    assert lines["inference_address"] == "http://0.0.0.0:8085" and "service_envelope" not in lines
    entry = json.loads(lines["model_snapshot"])["models"]["cxr-screen"]["7"]
    assert entry == {"defaultVersion": True, "marName": "cxr-screen.mar", "minWorkers": 2, "maxWorkers": 2,
                     "batchSize": 8, "maxBatchDelay": 25, "responseTimeout": 60}


class _Metrics:
    def add_time(self, *args, **kwargs):
        pass


def real_handler(tiny_bundle, tmp_path, batch: int):
    """The project's TorchServe handler initialised as TorchServe does it (a real ``ts`` Context, model
    version 5), on a copy of the tiny bundle; the audit log and cache come from the environment."""
    import shutil

    from ts.context import Context

    from serving.handler import CxrScreenHandler

    shutil.copytree(tiny_bundle, tmp_path / "model" / "bundle")
    context = Context("cxr-screen", str(tmp_path / "model"), {"model": {"modelName": "cxr-screen", "modelVersion": "5"}},
                      batch, None, "0.12.0", metrics=_Metrics())
    handler = CxrScreenHandler()
    handler.initialize(context)
    return handler, context


def test_handler_answers_each_item_of_a_batch(tiny_bundle, tmp_path, data_dir, monkeypatch):
    """The TorchServe contract without TorchServe: one answer per item, per-item status, audit lines."""
    from ts.context import RequestProcessor

    from serving.audit import read_audit_log

    monkeypatch.setenv("CXR_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    handler, context = real_handler(tiny_bundle, tmp_path, batch=4)
    image = sorted((data_dir / "test" / "pneumonia").glob("*.jpg"))[0].read_bytes()
    encoded = base64.b64encode(image).decode()
    rows = [{"body": bytearray(image)}, {"body": bytearray(b"garbage")},
            {"body": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}},
            {"body": {"instances": [encoded, base64.b64encode(b"garbage").decode()]}}]
    context.request_processor = [RequestProcessor({"x-request-id": f"id-{i}", "explain": "False"}) for i in range(4)]
    context.request_ids = {i: f"ts-{i}" for i in range(4)}
    answers = handler.handle(rows, context)
    assert len(answers) == 4
    statuses = [context.get_response_status(i)[0] for i in range(4)]
    assert statuses == [200, 415, 200, 415]
    first, second, third, fourth = (json.loads(answer) for answer in answers)
    assert first["request_id"] == "id-0" and first["model_version"] == "5"
    assert second["code"] == "not_an_image"
    assert third["outputs"][0]["name"] == "result"
    assert fourth["code"] == "not_an_image" and [e["item"] for e in fourth["errors"]] == [1]
    lines = read_audit_log(tmp_path / "audit.jsonl")
    assert [(line["request_id"], line["event"]) for line in lines] == [
        ("id-0", "prediction"), ("id-1", "error"), ("id-2", "prediction"), ("id-3", "error")]
    assert {line["batch_size"] for line in lines} == {4}


def test_handler_caches_answered_images_only_when_enabled(tiny_bundle, tmp_path, data_dir, monkeypatch):
    """Off by default nothing is written; enabled, each answered image (not a refused one) is kept until its TTL."""
    import os
    import shutil

    from ts.context import Context, RequestProcessor

    from cxr_core.image_cache import CACHE_DIR_ENV, CACHE_TTL_ENV, ImageCache
    from serving.handler import CxrScreenHandler

    shutil.copytree(tiny_bundle, tmp_path / "model" / "bundle")
    monkeypatch.setenv("CXR_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    image = sorted((data_dir / "test" / "normal").glob("*.jpg"))[0].read_bytes()
    encoded = base64.b64encode(image).decode()
    cache_dir = tmp_path / "image-cache"

    def serve(batch_id: str) -> list[int]:
        context = Context("cxr-screen", str(tmp_path / "model"), {"model": {"modelName": "cxr-screen"}},
                          3, None, "0.12.0", metrics=_Metrics())
        handler = CxrScreenHandler()
        handler.initialize(context)
        context.request_processor = [RequestProcessor({"x-request-id": f"{batch_id}-{i}", "explain": "False"})
                                     for i in range(3)]
        context.request_ids = {i: f"ts-{i}" for i in range(3)}
        handler.handle([{"body": bytearray(image)}, {"body": bytearray(b"garbage")},
                        {"body": {"instances": [encoded, encoded]}}], context)
        return [context.get_response_status(i)[0] for i in range(3)]

    monkeypatch.setenv(CACHE_TTL_ENV, "60")
    assert serve("off") == [200, 415, 200]
    assert not cache_dir.exists()  # disabled (no directory set): not a byte written anywhere

    monkeypatch.setenv(CACHE_DIR_ENV, str(cache_dir))
    assert serve("on") == [200, 415, 200]
    cache = ImageCache(cache_dir, 60)
    assert cache.get("on-0", 0) == image and cache.get("on-2", 0) == image and cache.get("on-2", 1) == image
    assert cache.get("on-1", 0) is None and cache.get("off-0", 0) is None  # refused: never cached
    files = sorted(cache_dir.iterdir())
    assert len(files) == 3 and all(oct(path.stat().st_mode & 0o777) == "0o600" for path in files)
    assert all("on-" not in path.name for path in files)  # named by a hash, never by the caller's id
    old = time.time() - 61
    os.utime(cache.path_of("on-0", 0), (old, old))
    assert cache.get("on-0", 0) is None and not cache.path_of("on-0", 0).exists()  # expired: None and deleted
    os.utime(cache.path_of("on-2", 1), (old, old))
    assert cache.purge() == 1 and cache.get("on-2", 0) == image
    os.utime(cache.path_of("on-2", 0), (old, old))
    ImageCache(cache_dir, 60).put("later", 0, image)  # a put purges too: an image nobody opened goes
    assert sorted(cache_dir.iterdir()) == [cache.path_of("later", 0)]


def test_an_unexpected_failure_stays_with_its_own_request(tiny_bundle, tmp_path, data_dir, monkeypatch):
    """A pathological image that breaks the model call fails its own request only, with a 500."""
    from ts.context import RequestProcessor

    monkeypatch.setenv("CXR_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    handler, context = real_handler(tiny_bundle, tmp_path, batch=2)
    good = sorted((data_dir / "test" / "normal").glob("*.jpg"))[0].read_bytes()
    poison = b"\x89PNG poison"
    original = handler.predictor.predict_many

    def fragile(images):
        if poison in images:
            raise RuntimeError("a decoder bug")
        return original(images)

    monkeypatch.setattr(handler.predictor, "predict_many", fragile)
    context.request_processor = [RequestProcessor({"explain": "False"}) for _ in range(2)]
    context.request_ids = {0: "a", 1: "b"}
    answers = handler.handle([{"body": bytearray(good)}, {"body": bytearray(poison)}], context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [200, 500]
    assert json.loads(answers[0])["decision"]["label"] and json.loads(answers[1])["code"] == "internal_error"
    from serving.audit import read_audit_log
    assert [(line["request_id"], line["event"], line["status"]) for line in read_audit_log(tmp_path / "audit.jsonl")] \
        == [("a", "prediction", 200), ("b", "error", 500)]


def test_a_batch_that_fails_as_a_whole_gets_one_error_line_per_request(tiny_bundle, tmp_path, data_dir, monkeypatch):
    """A bug after the model ran (building the answers) fails every request of the batch with a 500, and
    the audit log then holds exactly one error line per request, no prediction line for an answer never sent."""
    from ts.context import RequestProcessor

    import serving.handler as handler_module
    from serving.audit import read_audit_log

    monkeypatch.setenv("CXR_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    handler, context = real_handler(tiny_bundle, tmp_path, batch=3)
    image = sorted((data_dir / "test" / "normal").glob("*.jpg"))[0].read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while building the answer")

    monkeypatch.setattr(handler_module, "response_body", broken)
    context.request_processor = [RequestProcessor({"x-request-id": f"req-{i}", "x-caller-id": "hospital-a",
                                                   "explain": "False"}) for i in range(3)]
    context.request_ids = {i: f"ts-{i}" for i in range(3)}
    answers = handler.handle([{"body": bytearray(image)}, {"body": bytearray(b"garbage")},
                              {"body": bytearray(image)}], context)
    assert [context.get_response_status(i)[0] for i in range(3)] == [500, 500, 500]
    assert [json.loads(answer)["request_id"] for answer in answers] == ["req-0", "req-1", "req-2"]
    lines = read_audit_log(tmp_path / "audit.jsonl")
    assert [(line["request_id"], line["event"], line["status"], line["error_code"]) for line in lines] == [
        (f"req-{i}", "error", 500, "internal_error") for i in range(3)]
    assert {line["caller_id"] for line in lines} == {"hospital-a"}


def test_request_ids_are_cleaned_before_they_are_logged_or_echoed():
    assert clean_id("abc-123") == "abc-123"
    assert clean_id("a b\tc\n\u00e9d") == "abcd"  # no spaces, control characters or non-ASCII
    assert clean_id("x" * 500) == "x" * MAX_ID_LENGTH
    assert clean_id(" \n") is None and clean_id("") is None and clean_id(42) is None and clean_id(None) is None


def test_status_and_code_maps_agree():
    for status, code in STATUS_CODES.items():
        if status not in (403, 422):  # a refused key, a library's validation error: 401's and 400's codes
            assert HTTP_STATUS[code] == status, (status, code)
    assert error_code(415) == "not_an_image" and error_code(418) == "invalid_request"
    assert error_code(599, "bad_gateway") == "bad_gateway"


def test_the_handler_reads_the_binary_extension_the_front_forwards(data_dir):
    """One protocol translation: the front forwards v2 as the binary tensor extension, the handler parses
    it with the front's own codec; the image bytes arrive raw, never through base64."""
    from serving.oip import OipRequest

    images = [path.read_bytes() for path in sorted((data_dir / "test" / "normal").glob("*.jpg"))[:2]]
    body, headers = OipRequest(images=images, parameters={"explain": True}).forward_binary()
    assert headers["content-type"] == "application/octet-stream" and base64.b64encode(images[0][:30]) not in body
    parsed = parse_request({"body": bytearray(body)}, headers["content-type"], False,
                           headers["inference-header-content-length"])
    assert parsed.protocol == "v2" and parsed.images == images and parsed.explain and not parsed.single
    for wrong in ("0", str(len(body) + 1), "x"):
        with pytest.raises(RequestError) as refused:
            parse_request({"body": bytearray(body)}, "application/octet-stream", False, wrong)
        assert refused.value.code == "invalid_request" and "JFIF" not in str(refused.value)
