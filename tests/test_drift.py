"""The drift job end to end on real images, a real (tiny) bundle and real Evidently.

Reference: the bundle's features on the default validation split. Current: audit logs
written by replaying the held-out test split through the bundle with the serving
feature code, (a) as they are, (b) darkened / with a black border / contrast-reduced, (c) with
over-confident probabilities and radiologists' labels for half of the requests.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import yaml

from tests.conftest import make_subset
from cxr_core.bundle import load_bundle, read_manifest
from cxr_core.features import prediction_features
from cxr_core.reference import REFERENCE_FILE, dataset_items, reference_rows, write_reference_profile, write_rows_csv
from monitoring.config import load_config
from monitoring.drift import load_reference, main, run_drift
from monitoring.feedback import FeedbackStore
from monitoring.features import WindowSpec, read_audit_log
from monitoring.replay import replay_images, write_audit_log
from monitoring.shifts import AFFECTED_FEATURES, SHIFTS, overconfident

CONFIG = load_config()
PSI = CONFIG.thresholds.psi
START = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def predictor(monitoring_bundle):
    return load_bundle(monitoring_bundle)


@pytest.fixture(scope="module")
def reference_csv(predictor, data_dir, tmp_path_factory):
    rows = reference_rows(predictor, dataset_items(data_dir, ["val"]))
    return write_rows_csv(rows, tmp_path_factory.mktemp("reference") / "reference_val.csv")


@pytest.fixture(scope="module")
def test_items(data_dir):
    items = dataset_items(data_dir, ["test"])
    random.Random(0).shuffle(items)  # served traffic is not sorted by class
    return items


@pytest.fixture(scope="module")
def logs(predictor, test_items, tmp_path_factory):
    """Audit logs of the test split: as it is and after each acquisition shift (one request per 2 min)."""
    folder = tmp_path_factory.mktemp("logs")
    written = {}
    for name, shift in {"same_source": None, **SHIFTS}.items():
        items = [(f"req-{k:04d}", shift(data) if shift else data) for k, (_, data, _) in enumerate(test_items)]
        records = replay_images(predictor, items, start=START, interval=timedelta(minutes=2))
        written[name] = write_audit_log(records, folder / name / "audit.jsonl")
    return written


@pytest.fixture(scope="module")
def labels(test_items):
    return {f"req-{k:04d}": label for k, (_, _, label) in enumerate(test_items)}


def test_reference_profile_is_stored_with_the_bundle(monitoring_bundle, data_dir, tmp_path):
    bundle = shutil.copytree(monitoring_bundle, tmp_path / "bundle")
    subset = make_subset(data_dir, tmp_path / "data", {"normal": 4, "pneumonia": 3, "tuberculosis": 3}, splits=("val",))
    entry = write_reference_profile(bundle, subset, splits=("val",))
    assert entry["file"] == REFERENCE_FILE and entry["n"] == 10 and entry["splits"] == ["val"]
    assert read_manifest(bundle).reference_profile == entry  # re-validated manifest
    profile = pd.read_csv(bundle / REFERENCE_FILE)
    predictor = load_bundle(bundle)
    first = sorted((subset / "val" / "normal").glob("*.jpg"))[0]
    expected_columns = list(prediction_features(predictor.predict_bytes(first.read_bytes()))) + ["label"]
    assert list(profile.columns) == expected_columns  # exactly the audit-log feature columns + label
    assert sorted(profile["label"].value_counts().items()) == [("normal", 4), ("pneumonia", 3), ("tuberculosis", 3)]
    reference = load_reference(bundle)
    assert reference.info["rows"] == 10 and reference.info["bundle"] == str(bundle)
    # the CronJob passes an MLflow URI of the served bundle; a file:// URI goes the same way
    from_uri = load_reference(bundle.as_uri())
    assert from_uri.info["rows"] == 10 and from_uri.info["model"] == "hog_logreg"


def split_size(manifest_counts, split: str) -> int:
    return sum(count for (name, _), count in manifest_counts.items() if name == split)


def test_a_same_source_images_are_ok(logs, reference_csv, tmp_path, manifest_counts):
    summary = run_drift(logs["same_source"], reference_csv, tmp_path / "a", config=CONFIG)
    assert summary["decision"] == "ok" and summary["exit_code"] == 0, summary["reasons"]
    key_psi = {c: summary["psi"][c] for c in summary["key_features"]}
    assert set(key_psi) >= {"mean_intensity", "std_intensity", "border_ratio", "p_normal", "p_tuberculosis"}
    assert max(key_psi.values()) < PSI, key_psi
    assert all(abs(v["shift"]) < CONFIG.thresholds.class_share for v in summary["class_share"].values())
    n_test, n_val = split_size(manifest_counts, "test"), split_size(manifest_counts, "val")
    assert summary["current"]["rows"] == n_test and summary["reference"]["rows"] == n_val
    assert summary["ece"]["current"] is None  # no confirmed labels
    assert summary["ece"]["reference"]["n_labelled"] == n_val  # the profile's own labels
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert on_disk["decision"] == "ok" and on_disk["psi"]["mean_intensity"] == pytest.approx(key_psi["mean_intensity"], abs=1e-6)


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_b_acquisition_shift_means_retrain(shift, logs, reference_csv, tmp_path):
    summary = run_drift(logs[shift], reference_csv, tmp_path / shift, config=CONFIG)
    assert summary["decision"] == "retrain" and summary["exit_code"] == 3
    for feature in AFFECTED_FEATURES[shift]:
        assert summary["psi"][feature] > PSI, (feature, summary["psi"])
        assert any(f"key feature {feature} " in reason for reason in summary["reasons"]), summary["reasons"]
    html = (tmp_path / shift / "report.html").read_text()
    assert len(html) > 100_000 and "<html" in html.lower()
    for feature in AFFECTED_FEATURES[shift]:
        assert feature in html
    assert "Shift in the share of each decided class" in html
    assert "cxr-screen drift: retrain" in html and f"PSI of key feature {AFFECTED_FEATURES[shift][0]}" in html


def test_c_overconfident_labelled_feedback_raises_ece(logs, labels, reference_csv, tmp_path, manifest_counts):
    records = [json.loads(line) for line in logs["same_source"].read_text().splitlines()]
    store = FeedbackStore(tmp_path / "feedback.db")
    labelled = sorted(labels)[::2]
    for request_id in labelled:
        store.add(request_id, labels[request_id], classes=["normal", "pneumonia", "tuberculosis"], reviewer="dr.test")
    honest = run_drift(logs["same_source"], reference_csv, tmp_path / "honest", config=CONFIG,
                       feedback_db=tmp_path / "feedback.db")
    sharpened = write_audit_log([overconfident(r, 10.0) for r in records], tmp_path / "c" / "audit.jsonl")
    summary = run_drift(sharpened, reference_csv, tmp_path / "c", config=CONFIG, feedback_db=tmp_path / "feedback.db")
    ece = summary["ece"]["current"]
    assert ece["n_labelled"] == len(labelled) == (split_size(manifest_counts, "test") + 1) // 2
    assert ece["equal_width"] > CONFIG.thresholds.ece and ece["adaptive"] > CONFIG.thresholds.ece
    assert ece["equal_width"] > honest["ece"]["current"]["equal_width"]
    assert summary["decision"] == "retrain"
    assert any(reason.startswith("ECE (equal_width)") for reason in summary["reasons"])
    assert "ECE (equal-width, 15 bins, current)" in (tmp_path / "c" / "report.html").read_text()


def test_cli_exit_status_and_cronjob_flags(logs, reference_csv, tmp_path):
    common = ["--reference", str(reference_csv), "--feedback-db", str(tmp_path / "none.db")]
    assert main(["--current", str(logs["same_source"]), "--out", str(tmp_path / "ok"), *common]) == 0
    # the chart's CronJob spells the output --output and passes the thresholds as flags
    assert main(["--current", str(logs["black_border"].parent), "--output", str(tmp_path / "drift"), *common,
                 "--psi-threshold", "0.2", "--class-share-threshold", "0.15", "--ece-threshold", "0.1"]) == 3
    assert json.loads((tmp_path / "drift" / "summary.json").read_text())["decision"] == "retrain"
    # a threshold above every PSI turns the same data into ok
    assert main(["--current", str(logs["black_border"]), "--out", str(tmp_path / "loose"), *common,
                 "--psi-threshold", "1000"]) == 0
    assert main(["--current", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), *common]) == 1


def test_sliding_window_today_against_reference_and_yesterday(logs, reference_csv, tmp_path):
    # one request every two minutes (the test split holds more than 432): the last 0.3 days hold 216 requests, the 0.3 days before another 216;
    # today is compared with the reference (it decides) and with yesterday (reported)
    table = read_audit_log(logs["same_source"])
    now = table.frame["time"].max().to_pydatetime() + timedelta(minutes=1)
    summary = run_drift(logs["same_source"], reference_csv, tmp_path / "w", config=CONFIG,
                        window=WindowSpec(last_days=0.3), now=now, compare_previous=True)
    assert summary["current"]["window"]["rows"] == 216 and summary["current"]["window"]["kind"] == "last_days"
    previous = summary["previous_window"]
    assert previous["window"]["rows"] == 216 and previous["window"]["offset"] == 1
    assert previous["window"]["end"] == summary["current"]["window"]["start"]
    assert set(previous["psi"]) == set(summary["psi"]) and previous["would_retrain"] == bool(previous["reasons"])
    # reported, never deciding: two windows of ~200 requests differ by sampling noise alone
    assert summary["decision"] == "ok" and summary["psi_noise_floor"] < previous["psi_noise_floor"] < PSI
    assert (tmp_path / "w" / "report_previous_window.html").stat().st_size > 100_000
    last_n = run_drift(logs["same_source"], reference_csv, tmp_path / "n", config=CONFIG, window=WindowSpec(last_n=100))
    assert last_n["current"]["window"]["rows"] == 100 and last_n["rows"]["current"] == 100


def test_retrain_decision_starts_the_local_trigger(logs, reference_csv, tmp_path):
    marker = tmp_path / "retrain-started"
    config = tmp_path / "drift.yaml"
    config.write_text(yaml.safe_dump({"trigger": {"command": [
        sys.executable, "-c", f"open({str(marker)!r}, 'w').write('sweep'); print('sweep started')"]}}))
    args = ["--reference", str(reference_csv), "--config", str(config), "--trigger", "local",
            "--feedback-db", str(tmp_path / "none.db")]
    assert main(["--current", str(logs["same_source"]), "--out", str(tmp_path / "ok"), *args]) == 0
    assert not marker.exists()  # ok: nothing starts
    assert main(["--current", str(logs["darkened"]), "--out", str(tmp_path / "dark"), *args]) == 3
    assert marker.read_text() == "sweep"
    summary = json.loads((tmp_path / "dark" / "summary.json").read_text())
    assert summary["trigger"]["ok"] and summary["trigger"]["returncode"] == 0
    assert (tmp_path / "dark" / "sweep.log").read_text().strip() == "sweep started"
    config.write_text(yaml.safe_dump({"trigger": {"command": [sys.executable, "-c", "raise SystemExit(5)"]}}))
    assert main(["--current", str(logs["darkened"]), "--out", str(tmp_path / "failed"), *args]) == 4
