"""The champion's report card: every key issue 13 names, computed as the endpoint decides.

Runs the real report writer on the small HOG bundle the fixtures train, on a per-class sample of
the real test split, and checks its numbers against the Predictor's own answers image by image.
"""

from __future__ import annotations

import json

import numpy as np

from cxr_core.bundle import load_bundle
from training.data import discover_dataset
from training.datasets import sample_per_class
from training.model_report import TARGETS, build_report, main, write_markdown
from training.robustness.populations import ADULT, age_group

REQUIRED = ["test.macro_auc", "test.ece", "test.tb_vs_adult_normal_auc", "test.tb_sensitivity",
            "test.tb_specificity_adult_normal", "test.adult_pneumonia_vs_adult_normal_auc",
            "test.adult_pneumonia_called_tb", "test.adult_pneumonia_flagged", "loso.worst_source_tb_sensitivity",
            "shortcuts.age_probe_accuracy", "shortcuts.view_probe_accuracy"]


def test_report_has_every_key_and_matches_the_predictor(monitoring_bundle, data_dir, tmp_path):
    limit = 8
    report = build_report(monitoring_bundle, data_dir, None, tmp_path / "no-segmenter.json", limit=limit)
    for key in REQUIRED:
        section, name = key.split(".")
        assert name in report[section], key
    assert set(TARGETS) <= set(report["targets"])
    assert report["loso"]["worst_source_tb_sensitivity"] is None and "LOSO" in report["loso"]["reason"]
    assert set(report["per_nih_view"]) <= {"AP", "PA"} and report["per_nih_view"] and "nih-cxr14" in report["per_source"]
    assert set(report["per_population"]) == {"adult", "pediatric"}

    # the headline rates, recomputed one image at a time through the endpoint's path (no gate)
    predictor = load_bundle(monitoring_bundle, gate=False)
    records = sample_per_class(discover_dataset(data_dir).split("test"), limit, 0)
    decided = {r.relpath: predictor.predict_bytes(r.path.read_bytes()).decision.label for r in records}
    adult_normals = [r for r in records if r.label == "normal" and age_group(r) == ADULT]
    nih_pneumonia = [r for r in records if r.label == "pneumonia" and r.source == "nih-cxr14"]
    tb = [r for r in records if r.label == "tuberculosis"]
    test = report["test"]
    assert test["n"] == len(records) and test["n_adult_normal"] == len(adult_normals) > 0
    assert test["tb_specificity_adult_normal"] == round(
        float(np.mean([decided[r.relpath] != "tuberculosis" for r in adult_normals])), 4)
    assert test["tb_sensitivity"] == round(float(np.mean([decided[r.relpath] == "tuberculosis" for r in tb])), 4)
    if nih_pneumonia:
        assert test["adult_pneumonia_called_tb"] == round(
            float(np.mean([decided[r.relpath] == "tuberculosis" for r in nih_pneumonia])), 4)
    assert sum(map(sum, test["confusion_policy"])) == len(records)
    # a floor is met or missed by what the value says, never by a lowered bar
    entry = report["targets"]["test.tb_specificity_adult_normal"]
    assert entry["met"] == (test["tb_specificity_adult_normal"] >= 0.80)

    write_markdown(report, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "## Per source" in text and "## NIH images per view" in text and "nih-cxr14" in text


def test_cli_writes_json_and_markdown(monitoring_bundle, data_dir, tmp_path, capsys):
    assert main(["--bundle", str(monitoring_bundle), "--data-dir", str(data_dir), "--out", str(tmp_path),
                 "--name", "m", "--limit", "4"]) == 0
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["limit_per_class"] == 4 and (tmp_path / "m.md").exists()
    assert "model-report: test.macro_auc" in capsys.readouterr().out
