"""External evaluation of any labelled folder, and site re-calibration without retraining."""

import json
import shutil

import numpy as np
import pytest

from cxr_core.bundle import load_bundle, model_logits
from cxr_core.calibration import softmax
from training.config import TrainConfig
from training.datasets import load_split, open_dataset
from training.evaluate_bundle import evaluate_folder, main as evaluate_main, predict_folder
from training.recalibrate import recalibrate
from training.train import run_training

SUBSET = {"train": 40, "val": 30, "test": 25}


@pytest.fixture(scope="module")
def hog_run(data_dir, tmp_path_factory):
    config = TrainConfig(run_name="ext", model="hog_logreg", mode="classical", preprocess={"image_size": 96},
                         subset=SUBSET, n_bootstrap=50, exclusions=None, figures=False)
    return run_training(config, data_dir, tmp_path_factory.mktemp("ext"), track=False)


def _flat_copy(records, target):
    for record in records:
        destination = target / record.label
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy(record.path, destination / record.path.name)
    return target


def test_external_folder_gives_the_in_split_metrics(hog_run, data_dir, tmp_path):
    config = hog_run.config
    test = load_split(open_dataset(data_dir, None), "test", config.preprocess, config.subset, config.seed)
    flat = _flat_copy(test.records, tmp_path / "hospital")
    (flat / "normal" / "not-an-image.jpg").write_bytes(b"scanner log, not an image")
    predictor = load_bundle(hog_run.bundle_dir)
    predictions = predict_folder(predictor, flat, apply_gate=False)  # the model on every readable image
    assert [f["relpath"] for f in predictions.failures] == ["normal/not-an-image.jpg"]
    order = np.argsort(predictions.relpaths)
    in_split = model_logits(hog_run.model, test.pixels, config.preprocess, config.classical.hog)
    in_split_order = np.argsort([r.path.name for r in test.records])
    np.testing.assert_allclose(predictions.logits[order], in_split[in_split_order], atol=1e-6)
    assert evaluate_main(["--bundle", str(hog_run.bundle_dir), "--data-dir", str(flat), "--out",
                          str(tmp_path / "report"), "--bootstrap", "50", "--no-gate"]) == 0
    external = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert external["macro_auc"] == pytest.approx(hog_run.test_metrics["macro_auc"], abs=1e-9)
    for name in ("tuberculosis", "pneumonia"):
        assert external["per_class"]["policy"][name]["sensitivity"] == pytest.approx(
            hog_run.test_metrics["per_class"]["policy"][name]["sensitivity"])
    assert (tmp_path / "report" / "failures.csv").read_text().count("not_an_image") == 1
    assert external["gate"]["refused"] == 0


def test_external_evaluation_refuses_what_the_endpoint_refuses(hog_run, data_dir, tmp_path):
    """By default the folder goes through the bundle's gate as served images do: a blank image (and
    any radiograph the gate refuses) leaves the metrics and is listed with its code, per source."""
    from PIL import Image

    config = hog_run.config
    test = load_split(open_dataset(data_dir, None), "test", config.preprocess, config.subset, config.seed)
    flat = _flat_copy(test.records, tmp_path / "hospital")
    Image.new("L", (400, 400), 0).save(flat / "tuberculosis" / "blank.png")
    predictor = load_bundle(hog_run.bundle_dir)
    served = {record.path.name: predictor.predict_bytes(record.path.read_bytes()).gradable for record in test.records}
    assert evaluate_main(["--bundle", str(hog_run.bundle_dir), "--data-dir", str(flat), "--out",
                          str(tmp_path / "report"), "--bootstrap", "50"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    refused = (tmp_path / "report" / "refused.csv").read_text().splitlines()[1:]
    assert "tuberculosis/blank.png,unknown,tuberculosis,blank" in refused, refused
    refused_real = sorted(line.split(",")[0].split("/")[1] for line in refused if "blank.png" not in line)
    assert refused_real == sorted(name for name, gradable in served.items() if not gradable)  # as served
    gate = metrics["gate"]
    assert gate["refused"] == len(refused) == metrics["gate"]["codes"].get("blank", 0) + len(refused_real)
    assert gate["n"] == len(test.records) + 1 and metrics["n"] == gate["n"] - gate["refused"]
    # a hospital's folder has no manifest: one source, "unknown", holding every image
    assert gate["per_source"] == {"unknown": {"n": gate["n"], "refused": gate["refused"],
                                              "refusal_rate": round(gate["refused"] / gate["n"], 4)}}


def test_site_recalibration_refits_thresholds_without_retraining(hog_run, data_dir, tmp_path):
    site = tmp_path / "site"
    dataset = open_dataset(data_dir, None)
    _flat_copy(dataset.split("val")[::7], site / "val")
    _flat_copy(dataset.split("test")[::7], site / "test")
    out = tmp_path / "recalibrated"
    result = recalibrate(hog_run.bundle_dir, site, out)
    assert result["fit_split"] == "val" and result["eval_split"] == "test"
    new = load_bundle(out).manifest
    old = load_bundle(hog_run.bundle_dir).manifest
    assert (out / "model.joblib").read_bytes() == (hog_run.bundle_dir / "model.joblib").read_bytes()
    assert new.provenance.model_dump()["recalibrated_from"] == str(hog_run.bundle_dir)
    assert new.policy.thresholds != old.policy.thresholds
    fit = predict_folder(load_bundle(out), site, "val")
    decided = new.policy.decide_indices(softmax(fit.logits, new.temperature))
    for rule in new.policy.config.ranked:
        index = new.classes.index(rule.name)
        if new.policy.fits[rule.name].floor_met:
            assert (decided[fit.labels == index] == index).mean() >= rule.min_sensitivity
