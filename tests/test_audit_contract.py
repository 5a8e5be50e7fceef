"""The audit-record contract: what serving's real writer writes, monitoring's drift job reads."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from cxr_core.audit import AUDIT_SCHEMA_VERSION, UnsupportedAuditVersion, iter_audit_lines, parse_audit_line, read_audit_line
from cxr_core.bundle import load_bundle
from monitoring.features import read_audit_log as read_feature_table
from monitoring.replay import replay_images, write_audit_log
from serving.audit import AuditLog


@pytest.fixture(scope="module")
def predictions(monitoring_bundle, data_dir):
    predictor = load_bundle(monitoring_bundle)
    images = [sorted((data_dir / "test" / label).glob("*.jpg"))[0].read_bytes()
              for label in ("normal", "pneumonia", "tuberculosis")]
    return predictor, predictor.predict_many(images)


def test_lines_of_the_serving_writer_are_read_by_the_drift_job(predictions, tmp_path):
    _, answers = predictions
    log = AuditLog(tmp_path / "audit.jsonl")
    for item, answer in enumerate(answers):
        log.prediction(answer, request_id="req-1", model_name="cxr-screen", model_version="7", caller_id="hospital-a",
                       latency_ms=12.0, protocol="v2", item=item, n_items=len(answers))
    log.error(request_id="req-2", model_name="cxr-screen", model_version="7", caller_id="hospital-a", latency_ms=1.0,
              protocol="v1", status=415, code="not_an_image", stage="front")
    table = read_feature_table(tmp_path / "audit.jsonl")
    assert (table.n_lines, table.n_errors, table.n_malformed, len(table.frame)) == (4, 1, 0, 3)
    frame = table.frame
    assert set(frame["caller_id"]) == {"hospital-a"} and set(frame["model_version"]) == {"7"}
    assert list(frame["decision"]) == [answer.decision.label for answer in answers]
    assert frame["p_tuberculosis"].tolist() == pytest.approx([a.probabilities["tuberculosis"] for a in answers], abs=1e-6)
    first = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])
    assert first["schema_version"] == AUDIT_SCHEMA_VERSION and first["event"] == "prediction"


def test_offline_replay_writes_the_same_record_as_serving(predictions, data_dir, tmp_path):
    predictor, answers = predictions
    image = sorted((data_dir / "test" / "normal").glob("*.jpg"))[0].read_bytes()
    records = replay_images(predictor, [("a", image), ("b", b"not an image")],
                            start=datetime(2026, 3, 1, tzinfo=timezone.utc))
    path = write_audit_log(records, tmp_path / "replay.jsonl")
    served = AuditLog(tmp_path / "served.jsonl")
    served.prediction(answers[0], request_id="a", model_name="cxr-screen", model_version=records[0]["model_version"],
                      caller_id="offline-replay", latency_ms=1.0, protocol="replay", item=0, n_items=1)
    replayed, from_serving = (json.loads(p.read_text().splitlines()[0]) for p in (path, tmp_path / "served.jsonl"))
    assert set(replayed) - {"stage", "item", "n_items"} == set(from_serving) - {"stage", "item", "n_items"}
    refused = json.loads(path.read_text().splitlines()[1])
    assert refused["event"] == "error" and refused["error_code"] == "not_an_image" and refused["status"] == 422
    table = read_feature_table(path)
    assert (table.n_errors, table.n_malformed, len(table.frame)) == (1, 0, 1)


def test_a_line_of_an_unknown_schema_version_is_refused_clearly(predictions, tmp_path):
    _, answers = predictions
    log = AuditLog(tmp_path / "audit.jsonl")
    log.prediction(answers[0], request_id="r", model_name="cxr-screen", model_version="1", caller_id=None,
                   latency_ms=1.0, protocol="v1", item=0, n_items=1)
    line = json.loads((tmp_path / "audit.jsonl").read_text())
    assert parse_audit_line(json.dumps(line)).request_id == "r"
    legacy = {k: v for k, v in line.items() if k != "schema_version"}  # lines from before the field: version 1
    assert parse_audit_line(json.dumps(legacy)).schema_version == 1
    (tmp_path / "audit.jsonl").write_text(json.dumps({**line, "schema_version": 99}) + "\n")
    with pytest.raises(UnsupportedAuditVersion, match=r"audit.jsonl:1: audit schema_version 99"):
        read_feature_table(tmp_path / "audit.jsonl")


def test_version_1_lines_and_request_lines_read_with_the_version_2_reader(predictions, tmp_path):
    """A log written before the ``request`` event still reads; request lines are not profiled as images."""
    _, answers = predictions
    log = AuditLog(tmp_path / "audit.jsonl")
    log.prediction(answers[0], request_id="p", model_name="cxr-screen", model_version="1", caller_id=None,
                   latency_ms=1.0, protocol="v1", item=0, n_items=1)
    log.request(request_id="m", model_name="cxr-screen", model_version="1", caller_id="hospital-a",
                latency_ms=0.4, protocol="v2", status=200, route="v2.model.metadata")
    first, second = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert first["schema_version"] == second["schema_version"] == AUDIT_SCHEMA_VERSION == 2
    assert second["event"] == "request" and second["route"] == "v2.model.metadata" and second["stage"] == "front"
    version_1 = {k: v for k, v in first.items() if k != "route"} | {"schema_version": 1, "request_id": "old"}
    (tmp_path / "audit.jsonl").write_text("\n".join(json.dumps(line) for line in (version_1, first, second)) + "\n")
    table = read_feature_table(tmp_path / "audit.jsonl")
    assert list(table.frame["request_id"]) == ["old", "p"]
    assert table.n_lines == 3 and table.n_malformed == 0 and table.n_errors == 0
    assert parse_audit_line(json.dumps(version_1)).schema_version == 1


def test_a_record_is_read_again_by_its_position(predictions, tmp_path):
    """What the review app's case view does: index small rows, fetch one whole record by ``file:line``."""
    _, answers = predictions
    log = AuditLog(tmp_path / "audit.jsonl")
    for item, answer in enumerate(answers):
        log.prediction(answer, request_id=f"req-{item}", model_name="cxr-screen", model_version="7", caller_id=None,
                       latency_ms=1.0, protocol="v2", item=0, n_items=1)
    wheres = [where for where, _ in iter_audit_lines(tmp_path / "audit.jsonl")]
    assert [read_audit_line(where).request_id for where in wheres] == [f"req-{i}" for i in range(len(answers))]
    assert read_audit_line(wheres[-1]).features["decision"] == answers[-1].decision.label
    with pytest.raises(KeyError):
        read_audit_line(f"{tmp_path / 'audit.jsonl'}:99")
