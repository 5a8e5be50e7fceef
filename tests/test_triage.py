"""Offline batch triage: a folder of real radiographs (and junk) -> a sorted worklist CSV."""

from __future__ import annotations

import csv

import pytest

from cxr_core.bundle import load_bundle
from cxr_core.preprocess import QualityFlags
from serving.schemas import DecisionOut, PredictionResponse
from serving.triage import TriageRow, main, sort_rows
from tests.imaging import dicom_bytes, gray_of


def test_offline_worklist_lists_every_file(tiny_bundle, data_dir, tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "ward-b").mkdir(parents=True)
    for label in ("tuberculosis", "pneumonia", "normal"):
        for path in sorted((data_dir / "test" / label).glob("*.jpg"))[:2]:
            (inbox / path.name).write_bytes(path.read_bytes())
    real = sorted((data_dir / "test" / "normal").glob("*.jpg"))[2]
    (inbox / "ward-b" / "IM0001").write_bytes(dicom_bytes(gray_of(real)))  # DICOM without extension
    (inbox / "notes.txt").write_text("not an image")
    (inbox / "cut.jpg").write_bytes(real.read_bytes()[:2000])
    (inbox / ".DS_Store").write_bytes(b"hidden")
    out = tmp_path / "worklist.csv"

    main([str(inbox), "--offline", "--bundle", str(tiny_bundle), "--out", str(out)])

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9 and [row["rank"] for row in rows] == [str(i) for i in range(1, 10)]
    ok = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(ok) == 7 and rows[-2:] == failed  # failures listed last, never skipped
    assert {(row["file"], row["error_code"]) for row in failed} == {("cut.jpg", "truncated"),
                                                                    ("notes.txt", "not_an_image")}
    order = {"urgent": 0, "review": 1, "routine": 2}
    keys = [(order[row["triage"]], -float(row["risk"])) for row in ok]
    assert keys == sorted(keys)
    predictor = load_bundle(tiny_bundle)
    for row in ok:
        expected = predictor.predict_bytes((inbox / row["file"]).read_bytes())
        assert row["decision"] == expected.decision.label and row["triage"] == expected.decision.triage
        assert float(row["p_tuberculosis"]) == pytest.approx(expected.probabilities["tuberculosis"], abs=1e-6)
    assert "ward-b/IM0001" in {row["file"] for row in ok}


def _answer(triage: str, p_tb: float, p_pna: float) -> PredictionResponse:
    quality = QualityFlags(original_width=100, original_height=100, aspect_ratio=1, source_format="png", bit_depth=8,
                           mean_intensity=100, std_intensity=50, dark_fraction=0, bright_fraction=0, border_ratio=0,
                           underexposed=False, overexposed=False, low_contrast=False, has_border=False)
    probabilities = {"normal": 1 - p_tb - p_pna, "pneumonia": p_pna, "tuberculosis": p_tb}
    return PredictionResponse(request_id="r", model_name="cxr-screen", model_version="1",
                              classes=list(probabilities), probabilities_raw=probabilities,
                              probabilities=probabilities, quality=quality, latency_ms=1.0,
                              thresholds={"tuberculosis": 0.3, "pneumonia": 0.4},
                              decision=DecisionOut(label="x", fired_class=None, threshold=None, triage=triage,
                                                   gray_zone=[]))


def test_sort_is_triage_level_then_risk():
    rows = [TriageRow("routine-low", _answer("routine", 0.05, 0.05)),
            TriageRow("failed", None, "truncated", "cut"),
            TriageRow("review", _answer("review", 0.28, 0.1)),
            TriageRow("urgent-pna", _answer("urgent", 0.1, 0.6)),
            TriageRow("routine-high", _answer("routine", 0.2, 0.1)),
            TriageRow("urgent-tb", _answer("urgent", 0.9, 0.05))]
    ordered = sort_rows(rows, ["tuberculosis", "pneumonia"])
    assert [row.path for row in ordered] == ["urgent-tb", "urgent-pna", "review", "routine-high", "routine-low",
                                             "failed"]
