"""The feedback store: confirmed labels by request id, durable, validated, with history; its CLI."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest

from cxr_core.audit import AuditLogWriter, AuditRecord, error_record
from monitoring.feedback import FeedbackError, FeedbackStore, export_labelled, join_labels, main

CLASSES = ["normal", "pneumonia", "tuberculosis"]


def write_log(path, request_ids):
    """Prediction lines and one refused request, written by the shared-core writer serving uses."""
    meta = dict(model_name="cxr-screen", model_version="v1", caller_id="t", latency_ms=3.0, protocol="v1")
    records = [AuditRecord(event="prediction", request_id=rid, time=f"2026-03-01T00:0{k}:00Z", status=200, **meta,
                           mean_intensity=120.0, p_normal=0.2, p_pneumonia=0.1, p_tuberculosis=0.7,
                           decision="tuberculosis", triage="urgent", confidence=0.7)
               for k, rid in enumerate(request_ids)]
    records.append(error_record(request_id="broken", time="2026-03-01T00:09:00Z", status=415, code="not_an_image", **meta))
    AuditLogWriter(path).write_many(records)
    return path


def test_round_trip_survives_reopening(tmp_path):
    db = tmp_path / "nested" / "feedback.db"
    store = FeedbackStore(db)
    entry = store.add("req-1", "tuberculosis", classes=CLASSES, reviewer="dr.a", note="cavitation RUL")
    assert (entry.label, entry.revision, entry.previous_label) == ("tuberculosis", 1, None)
    store.add("req-2", "normal", reviewer="dr.b")  # the class list is remembered
    reopened = FeedbackStore(db)
    assert len(reopened) == 2 and reopened.classes() == CLASSES
    got = reopened.get("req-1")
    assert (got.label, got.reviewer, got.note) == ("tuberculosis", "dr.a", "cavitation RUL")
    labels = reopened.labels()
    assert dict(zip(labels["request_id"], labels["label"])) == {"req-1": "tuberculosis", "req-2": "normal"}
    # plain SQLite underneath: other tools can read it
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT COUNT(*) FROM feedback_history").fetchone()[0] == 2


def test_invalid_label_is_refused_and_nothing_is_stored(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    with pytest.raises(FeedbackError, match="no class list"):
        store.add("req-1", "normal")
    with pytest.raises(FeedbackError, match="'covid' is not one of the model's classes"):
        store.add("req-1", "covid", classes=CLASSES)
    with pytest.raises(FeedbackError, match="request id is empty"):
        store.add("  ", "normal", classes=CLASSES)
    assert len(store) == 0 and store.history("req-1") == []


def test_relabelling_updates_and_keeps_history(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    store.add("req-7", "normal", classes=CLASSES, reviewer="resident")
    entry = store.add("req-7", "tuberculosis", reviewer="attending", note="second read")
    assert (entry.revision, entry.previous_label) == (2, "normal")
    assert len(store) == 1 and store.get("req-7").label == "tuberculosis"
    assert store.get("req-7").created_at <= store.get("req-7").updated_at
    history = store.history("req-7")
    assert [(h["label"], h["previous"], h["reviewer"]) for h in history] == [
        ("normal", None, "resident"), ("tuberculosis", "normal", "attending")]


def test_labels_join_the_audit_log_and_export_for_the_sweep(tmp_path):
    log = write_log(tmp_path / "audit.jsonl", ["a", "b", "c"])
    store = FeedbackStore(tmp_path / "f.db")
    store.add("b", "pneumonia", classes=CLASSES)
    store.add("zzz", "normal")  # labelled before its log line arrived
    frame = pd.DataFrame({"request_id": ["a", "b", "c"], "label": [None, "normal", "tuberculosis"]})
    joined = join_labels(frame, store.labels())
    assert joined["label"].tolist()[1:] == ["pneumonia", "tuberculosis"] and pd.isna(joined["label"][0])

    images = tmp_path / "archive"
    images.mkdir()
    (images / "b.png").write_bytes(b"png bytes")
    result = export_labelled(store, log, tmp_path / "out" / "labelled.csv", images_dir=images,
                             dataset_out=tmp_path / "new-data")
    assert result | {"csv": None, "dataset": None} == {
        "csv": None, "rows": 1, "labels": 2, "labels_without_request": 1, "per_class": {"pneumonia": 1},
        "dataset": None, "images_copied": 1, "images_missing": 0}
    exported = pd.read_csv(tmp_path / "out" / "labelled.csv")
    assert exported.loc[0, "request_id"] == "b" and exported.loc[0, "label"] == "pneumonia"
    assert {"p_tuberculosis", "decision", "model_version", "reviewer", "labelled_at"} <= set(exported.columns)
    assert (tmp_path / "new-data" / "train" / "pneumonia" / "b.png").read_bytes() == b"png bytes"


def test_cli_add_list_history_export(tmp_path, capsys):
    db = tmp_path / "f.db"
    log = write_log(tmp_path / "audit.jsonl", ["r1", "r2"])
    assert main(["--db", str(db), "add", "--request-id", "r1", "--label", "tuberculosis", "--audit-log", str(log),
                 "--reviewer", "dr.a"]) == 0
    assert "r1: tuberculosis, revision 1" in capsys.readouterr().out
    # classes came from the log's p_<class> columns; a wrong one is refused with exit 1
    assert main(["--db", str(db), "add", "--request-id", "r2", "--label", "flu"]) == 1
    assert "'flu' is not one of the model's classes" in capsys.readouterr().err
    # a request id the log does not hold is refused unless asked
    assert main(["--db", str(db), "add", "--request-id", "r9", "--label", "normal", "--audit-log", str(log)]) == 1
    assert "not in" in capsys.readouterr().err
    assert main(["--db", str(db), "add", "--request-id", "r1", "--label", "normal", "--classes", *CLASSES]) == 0
    assert "(was tuberculosis), revision 2" in capsys.readouterr().out
    assert main(["--db", str(db), "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["request_id"], row["label"], row["revision"]) for row in listed] == [("r1", "normal", 2)]
    assert main(["--db", str(db), "history", "--request-id", "r1"]) == 0
    assert capsys.readouterr().out.count("\n") == 3  # header + two versions
    assert main(["--db", str(db), "export", "--audit-log", str(log), "--out", str(tmp_path / "x.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 1


def test_default_db_comes_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXR_FEEDBACK_DB", str(tmp_path / "env.db"))
    assert main(["add", "--request-id", "x", "--label", "normal", "--classes", *CLASSES]) == 0
    assert str(tmp_path / "env.db") in capsys.readouterr().out
    assert len(FeedbackStore(tmp_path / "env.db")) == 1
