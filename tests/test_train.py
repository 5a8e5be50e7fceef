"""A short real training run against a real MLflow server, and the bundle it yields."""

import json

import mlflow
import numpy as np
import pytest

from cxr_core.bundle import UnsupportedBundleError, load_bundle, model_logits
from cxr_core.calibration import softmax
from cxr_core.preprocess import prepare_image
from training.config import TrainConfig
from training.train import run_training

TINY = dict(
    preprocess={"image_size": 64},
    subset={"train": 40, "val": 25, "test": 20},
    n_bootstrap=100,
    exclusions=None,
)


@pytest.fixture(scope="module")
def cnn3_run(data_dir, mlflow_server, tmp_path_factory):
    config = TrainConfig(run_name="test-cnn3", model="cnn3", mode="scratch",
                         model_kwargs={"channels": [8, 16, 32]}, epochs=2, experiment="test-train", **TINY)
    return run_training(config, data_dir, tmp_path_factory.mktemp("runs"))


def test_run_is_tracked_in_mlflow(cnn3_run, mlflow_server):
    client = mlflow.MlflowClient(mlflow_server.url)
    run = client.get_run(cnn3_run.mlflow_run_id)
    assert run.data.params["model"] == "cnn3" and run.data.params["epochs"] == "2"
    assert run.data.tags["family"] == "cnn3" and len(run.data.tags["data_manifest_sha256"]) == 64
    history = client.get_metric_history(run.info.run_id, "val_macro_f1")
    assert [m.step for m in history] == [0, 1]
    assert "test.macro_auc" in run.data.metrics and 0 <= run.data.metrics["test.macro_auc"] <= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")}
    for name in ("metrics.json", "report.md", "roc_curves.png", "confusion_matrix_policy.png",
                 "reliability_after.png", "worklist_missed.csv"):
        assert f"evaluation/test/{name}" in artifacts, name
    bundle_files = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert {"bundle/bundle.json", "bundle/weights.pt"} <= bundle_files


def test_bundle_predicts_like_the_in_memory_model(cnn3_run, data_dir, tmp_path, mlflow_server):
    paths = sorted((data_dir / "test" / "tuberculosis").glob("*.jpg"))[:3] + sorted(
        (data_dir / "test" / "pneumonia").glob("*.jpg"))[:3]
    config = cnn3_run.config
    pixels = np.stack([prepare_image(p.read_bytes(), config.preprocess).pixels for p in paths])
    expected = softmax(model_logits(cnn3_run.model, pixels, config.preprocess), cnn3_run.temperature)
    downloaded = mlflow.artifacts.download_artifacts(run_id=cnn3_run.mlflow_run_id, artifact_path="bundle",
                                                     dst_path=str(tmp_path), tracking_uri=mlflow_server.url)
    for bundle_dir in (cnn3_run.bundle_dir, downloaded):
        predictor = load_bundle(bundle_dir)
        for path, row in zip(paths, expected):
            prediction = predictor.predict_bytes(path.read_bytes())
            got = np.array([prediction.probabilities[c] for c in predictor.classes])
            np.testing.assert_allclose(got, row, atol=1e-5)
            assert prediction.decision.label == predictor.manifest.policy.classes[
                predictor.manifest.policy.decide_indices(row[None])[0]]
    manifest = load_bundle(cnn3_run.bundle_dir).manifest
    assert manifest.provenance.mlflow_run_id == cnn3_run.mlflow_run_id
    assert manifest.provenance.data_manifest_sha256 and manifest.provenance.git_commit
    assert set(manifest.policy.thresholds) == {"tuberculosis", "pneumonia"}
    assert manifest.temperature == pytest.approx(cnn3_run.temperature)


def test_unknown_bundle_schema_is_refused(cnn3_run, tmp_path):
    import shutil

    copy = tmp_path / "future"
    shutil.copytree(cnn3_run.bundle_dir, copy)
    payload = json.loads((copy / "bundle.json").read_text())
    payload["schema_version"] = 99
    (copy / "bundle.json").write_text(json.dumps(payload))
    with pytest.raises(UnsupportedBundleError, match="schema_version 99"):
        load_bundle(copy)


def test_classical_family_end_to_end_without_tracking(data_dir, tmp_path):
    config = TrainConfig(run_name="test-hog", model="hog_logreg", mode="classical", **TINY)
    result = run_training(config, data_dir, tmp_path, track=False)
    predictor = load_bundle(result.bundle_dir)
    path = sorted((data_dir / "test" / "normal").glob("*.jpg"))[0]
    pixels = prepare_image(path.read_bytes(), config.preprocess).pixels[None]
    expected = softmax(model_logits(result.model, pixels, config.preprocess, config.classical.hog), result.temperature)[0]
    got = predictor.predict_bytes(path.read_bytes()).probabilities
    np.testing.assert_allclose([got[c] for c in predictor.classes], expected, atol=1e-6)
    assert result.test_metrics["n"] == 60 and result.test_metrics["macro_auc"] > 0.6
