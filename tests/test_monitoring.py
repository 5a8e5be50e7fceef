"""Monitoring pieces without a model: the retrain rule, the config, the audit-log reader, the windows.

The decision is a pure function of the snapshot's numbers, so it is tested on plain dicts; the
audit-log reader and the windows on small hand-written logs in the serving format.
"""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from cxr_core.audit import AuditRecord, error_record, utc_timestamp
from monitoring.config import DriftThresholds, expand_columns, load_config
from monitoring.decision import EXIT_OK, EXIT_RETRAIN, decide, summary_from_snapshot
from monitoring.features import WindowSpec, load_features, read_audit_log, select_window

T = DriftThresholds()
QUIET_PSI = {"mean_intensity": 0.03, "std_intensity": 0.05, "border_ratio": 0.01, "original_width": 0.02,
             "p_normal": 0.04, "p_pneumonia": 0.02, "p_tuberculosis": 0.03, "decision": 0.01}
QUIET_SHARES = {c: {"reference": 1 / 3, "current": 1 / 3, "shift": 0.0} for c in ("normal", "pneumonia", "tuberculosis")}


def summary(psi=None, shares=None, ece=None, rows=500):
    return {"psi": QUIET_PSI | (psi or {}), "class_share": shares or QUIET_SHARES,
            "ece": {"current": ece, "reference": None}, "rows": {"current": rows, "reference": 520}}


# --- the decision ---------------------------------------------------------------------------------


def test_quiet_numbers_decide_ok():
    decision = decide(summary(ece={"equal_width": 0.04, "adaptive": 0.05, "n_labelled": 200}), T)
    assert decision.decision == "ok" and decision.exit_code == EXIT_OK and decision.reasons == []
    assert {c.kind for c in decision.checks} == {"psi", "class_share", "ece"}


def test_psi_on_a_key_feature_triggers_but_not_on_other_columns():
    assert decide(summary(psi={"original_width": 5.0, "decision": 0.9}), T).decision == "ok"
    decision = decide(summary(psi={"border_ratio": 0.35}), T)
    assert decision.decision == "retrain" and decision.exit_code == EXIT_RETRAIN
    assert decision.reasons == ["PSI of key feature border_ratio = 0.350 > 0.2"]
    # every class probability is key through the p_* pattern
    assert decide(summary(psi={"p_tuberculosis": 0.21}), T).decision == "retrain"


def test_thresholds_are_strict_and_configurable():
    assert decide(summary(psi={"mean_intensity": 0.2}), T).decision == "ok"
    assert decide(summary(psi={"mean_intensity": 0.2000001}), T).decision == "retrain"
    loose = T.model_copy(update={"psi": 0.5})
    assert decide(summary(psi={"mean_intensity": 0.3}), loose).decision == "ok"
    assert decide(summary(psi={"mean_intensity": 0.3}), T.model_copy(update={"key_features": ["p_*"]})).decision == "ok"


def test_class_share_moving_more_than_15_points_triggers_either_way():
    moved = {"normal": {"reference": 0.5, "current": 0.3, "shift": -0.2},
             "tuberculosis": {"reference": 0.2, "current": 0.4, "shift": 0.2},
             "pneumonia": {"reference": 0.3, "current": 0.3, "shift": 0.0}}
    decision = decide(summary(shares=moved), T)
    assert decision.decision == "retrain"
    assert decision.reasons == ["share of decided class normal moved -0.200 (> 0.15)",
                                "share of decided class tuberculosis moved +0.200 (> 0.15)"]
    small = {c: v | {"shift": v["shift"] * 0.7} for c, v in moved.items()}
    assert decide(summary(shares=small), T).decision == "ok"


def test_ece_triggers_with_enough_labels_only():
    high = {"equal_width": 0.18, "adaptive": 0.12, "n_labelled": 100}
    decision = decide(summary(ece=high), T)
    assert decision.decision == "retrain" and decision.reasons == ["ECE (equal_width) = 0.180 > 0.1 on confirmed labels"]
    few = decide(summary(ece=high | {"n_labelled": 5}), T)
    assert few.decision == "ok" and any("min_labelled" in note for note in few.notes)
    assert decide(summary(ece=None), T).decision == "ok"
    adaptive_only = {"equal_width": 0.05, "adaptive": 0.15, "n_labelled": 100}
    assert decide(summary(ece=adaptive_only), T).decision == "ok"
    assert decide(summary(ece=adaptive_only), T.model_copy(update={"ece_binning": "either"})).decision == "retrain"


def test_too_few_requests_do_not_decide_on_psi_or_shares():
    decision = decide(summary(psi={"mean_intensity": 3.0}, rows=10), T)
    assert decision.decision == "ok" and "min_rows" in decision.notes[0]
    # ... but confirmed labels still can
    high = {"equal_width": 0.3, "adaptive": 0.3, "n_labelled": 40}
    assert decide(summary(psi={"mean_intensity": 3.0}, rows=10, ece=high), T).decision == "retrain"


def test_numbers_are_read_from_the_snapshot_dict():
    snapshot = {"metrics": [
        {"config": {"type": "evidently:metric_v2:DriftedColumnsCount"}, "value": {"count": 1.0, "share": 0.5}},
        {"config": {"type": "evidently:metric_v2:ValueDrift", "column": "mean_intensity", "method": "psi"},
         "value": 0.31},
        {"config": {"type": "evidently:metric_v2:ValueDrift", "column": "decision", "method": "psi"}, "value": 0.01},
        {"config": {"type": "evidently:metric_v2:DecidedClassShare", "dataset": "reference"},
         "value": {"normal": 0.6, "tuberculosis": 0.4}},
        {"config": {"type": "evidently:metric_v2:DecidedClassShare", "dataset": "current"},
         "value": {"normal": 0.4, "tuberculosis": 0.6}},
        {"config": {"type": "evidently:metric_v2:DecidedClassShareShift"}, "value": {"normal": -0.2, "tuberculosis": 0.2}},
        {"config": {"type": "evidently:metric_v2:CalibrationError", "adaptive": False, "dataset": "current"}, "value": 0.12},
        {"config": {"type": "evidently:metric_v2:CalibrationError", "adaptive": True, "dataset": "current"}, "value": 0.09},
        {"config": {"type": "evidently:metric_v2:CalibrationError", "adaptive": False, "dataset": "reference"}, "value": 0.03},
    ]}
    numbers = summary_from_snapshot(snapshot)
    assert numbers["psi"] == {"mean_intensity": 0.31, "decision": 0.01}
    assert numbers["class_share"]["normal"] == {"reference": 0.6, "current": 0.4, "shift": -0.2}
    assert numbers["ece"] == {"current": {"equal_width": 0.12, "adaptive": 0.09}, "reference": {"equal_width": 0.03}}
    reasons = decide(numbers, T).reasons
    assert len(reasons) == 4 and reasons[0].startswith("PSI of key feature mean_intensity")


# --- config ---------------------------------------------------------------------------------------


def test_default_config_file_holds_the_issue_thresholds():
    config = load_config()
    assert (config.thresholds.psi, config.thresholds.class_share, config.thresholds.ece) == (0.2, 0.15, 0.1)
    assert config.thresholds.is_key("p_pneumonia") and config.thresholds.is_key("border_ratio")
    assert not config.thresholds.is_key("original_width") and not config.thresholds.is_key("decision")
    changed = config.with_thresholds(psi=0.3, class_share=None, ece=0.05)
    assert (changed.thresholds.psi, changed.thresholds.class_share, changed.thresholds.ece) == (0.3, 0.15, 0.05)
    assert expand_columns(["p_*", "confidence"], ["confidence", "p_normal", "p_tb", "x"]) == ["p_normal", "p_tb", "confidence"]


def test_config_refuses_unknown_keys(tmp_path):
    path = tmp_path / "drift.yaml"
    path.write_text("thresholds:\n  psy: 0.3\n")
    with pytest.raises(ValueError, match="psy"):
        load_config(path)


# --- audit log -> feature table -------------------------------------------------------------------

START = datetime(2026, 3, 1, tzinfo=timezone.utc)


def log_line(k: int, when: datetime, **extra) -> dict:
    """A prediction line as serving writes it: the shared-core record with a feature row."""
    features = {"mean_intensity": 100.0 + k, "std_intensity": 50.0, "dark_fraction": 0.1, "bright_fraction": 0.01,
                "border_ratio": 0.0, "original_width": 320.0, "original_height": 320.0, "aspect_ratio": 1.0,
                "underexposed": False, "overexposed": False, "low_contrast": k % 2 == 0, "has_border": False,
                "source_format": "jpeg", "p_normal": 0.7, "p_tuberculosis": 0.3, "decision": "normal",
                "triage": "routine", "confidence": 0.7, **extra}
    return AuditRecord(event="prediction", request_id=f"r{k}", time=utc_timestamp(when), model_name="cxr-screen",
                       model_version="v1", caller_id="test", latency_ms=12.5, protocol="v2", status=200,
                       **features).model_dump(mode="json")


def error_line(request_id: str, when: datetime) -> dict:
    return error_record(request_id=request_id, time=utc_timestamp(when), model_name="cxr-screen", model_version="v1",
                        caller_id="test", latency_ms=1.0, protocol="v2", status=415, code="not_an_image",
                        stage="front").model_dump(mode="json")


def write_log(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def test_audit_log_folder_becomes_a_typed_feature_table(tmp_path):
    hours = [START + timedelta(hours=h) for h in range(6)]
    write_log(tmp_path / "logs" / "a.jsonl", [log_line(3, hours[3]), log_line(0, hours[0]),
                                              error_line("bad", hours[1]), "{not json", ""])
    write_log(tmp_path / "logs" / "day2" / "b.jsonl.gz", [log_line(5, hours[5]), log_line(4, hours[4])])
    (tmp_path / "logs" / "notes.txt").write_text("ignored")
    table = read_audit_log(tmp_path / "logs")
    assert len(table.files) == 2 and table.n_lines == 6
    assert (table.n_errors, table.n_malformed, len(table.frame)) == (1, 1, 4)
    frame = table.frame
    assert list(frame["request_id"]) == ["r0", "r3", "r4", "r5"]  # sorted by time
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]" and frame["low_contrast"].dtype == bool
    assert table.classes == ["normal", "tuberculosis"]
    assert table.describe() == {"source": str(tmp_path / "logs"), "files": 2, "lines": 6, "rows": 4, "errors": 1,
                                "malformed": 1}
    frame.to_csv(tmp_path / "table.csv", index=False)
    again = load_features(tmp_path / "table.csv").frame
    assert again["low_contrast"].tolist() == frame["low_contrast"].tolist()
    pd.testing.assert_series_equal(again["mean_intensity"], frame["mean_intensity"])


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_audit_log(tmp_path / "nowhere")


@pytest.fixture()
def three_days(tmp_path):
    """48 requests every 90 minutes from START: 16 per day over three days."""
    lines = [log_line(k, START + timedelta(minutes=90 * k)) for k in range(48)]
    return read_audit_log(write_log(tmp_path / "audit.jsonl", lines)).frame


def test_window_last_n_and_the_n_before(three_days):
    current = select_window(three_days, WindowSpec(last_n=10))
    previous = select_window(three_days, WindowSpec(last_n=10), offset=1)
    assert list(current.frame["request_id"]) == [f"r{k}" for k in range(38, 48)]
    assert list(previous.frame["request_id"]) == [f"r{k}" for k in range(28, 38)]
    assert current.describe()["rows"] == 10 and current.describe()["last_request"].startswith("2026-03-03T22:30")
    assert len(select_window(three_days, WindowSpec(last_n=30), offset=1).frame) == 18  # what is left
    assert select_window(three_days, WindowSpec(last_n=100)).frame.shape[0] == 48


def test_window_last_days_today_and_yesterday(three_days):
    now = START + timedelta(days=3)
    today = select_window(three_days, WindowSpec(last_days=1), now=now)
    yesterday = select_window(three_days, WindowSpec(last_days=1), now=now, offset=1)
    assert len(today.frame) == 16 and len(yesterday.frame) == 16
    assert today.frame["time"].min() >= now - timedelta(days=1) > yesterday.frame["time"].max()
    assert today.describe()["start"] == "2026-03-03T00:00:00+00:00" and today.describe()["end"] == "2026-03-04T00:00:00+00:00"
    assert len(select_window(three_days, WindowSpec(last_days=0.5), now=now).frame) == 8


def test_window_explicit_range_is_half_open(three_days):
    spec = WindowSpec(start=START + timedelta(hours=3), end=START + timedelta(hours=9))
    window = select_window(three_days, spec)
    assert list(window.frame["request_id"]) == ["r2", "r3", "r4", "r5"]  # 03:00 .. 07:30, not 09:00
    before = select_window(three_days, spec, offset=1)
    assert list(before.frame["request_id"]) == ["r0", "r1"]  # [-03:00, 03:00)


def test_window_spec_refuses_ambiguous_windows():
    with pytest.raises(ValueError, match="choose one window"):
        WindowSpec(last_n=5, last_days=1)
    with pytest.raises(ValueError, match="both start and end"):
        WindowSpec(start=START)
    with pytest.raises(ValueError, match="after its start"):
        WindowSpec(start=START, end=START)
    with pytest.raises(ValueError, match="previous window"):
        select_window(pd.DataFrame({"time": []}), WindowSpec(), offset=1)
