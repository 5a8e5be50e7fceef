"""A small real Ray Tune sweep registers a champion in a real MLflow registry."""

import json

import mlflow
import pytest

from cxr_core.bundle import load_bundle
from training import registry
from training.sweep import REPO_ROOT, run_sweep

FAST = {
    "subset": {"train": 20, "val": 15, "test": 15},
    "preprocess": {"image_size": 64},
    "epochs": 2,
    "n_bootstrap": 20,
    "figures": False,
    "exclusions": None,
}


@pytest.fixture(scope="module")
def sweep(data_dir, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    document = run_sweep("small", data_dir, out / "storage", REPO_ROOT / "configs" / "sweep.yaml", FAST,
                         experiment="test-sweep", report_dir=out / "reports")
    return document, out


def test_every_trial_is_an_mlflow_run_under_the_sweep(sweep, mlflow_server, manifest_rows):
    document, out = sweep
    families = {row["family"] for row in document["trials"]}
    assert {"hog_logreg", "cnn3"} <= families
    # ASHA may cut a trial at a rung before its last epoch, never at it: with 2 epochs and grace
    # period 2 the only rung is the final report, so every trial finishes with an objective.
    assert all(row["status"] == "completed" and row["objective"] is not None for row in document["trials"])
    client = mlflow.MlflowClient(mlflow_server.url)
    children = client.search_runs(
        [client.get_experiment_by_name("test-sweep").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{document['mlflow_parent_run_id']}'")
    assert len(children) == len(document["trials"])
    completed = [r for r in children if "objective" in r.data.metrics]
    assert completed and all(-2 <= r.data.metrics["objective"] <= 1.01 for r in completed)
    board = json.loads((out / "reports" / "leaderboard.json").read_text())
    assert board["winner"]["objective"] == max(r["objective"] for r in board["trials"] if r["objective"] is not None)
    markdown = (out / "reports" / "leaderboard.md").read_text()
    assert "| 1 |" in markdown and "## Best trial per family" in markdown
    assert f"## Winner on the test split ({board['winner']['family']})" in markdown
    sources = {row["source_dataset"] for row in manifest_rows if row["split"] == "test"}
    assert set(board["winner_test"]["per_source"]) <= sources
    assert sum(m["n"] for m in board["winner_test"]["per_source"].values()) == FAST["subset"]["test"] * 3


def test_champion_loads_from_the_registry_and_predicts(sweep, data_dir, tmp_path):
    document, _ = sweep
    version = document["registered_version"]
    assert registry.alias_version(registry.CHAMPION) == version
    bundle_dir, fetched = registry.fetch_bundle("models:/cxr-screen@champion", tmp_path / "champion")
    assert fetched == version
    predictor = load_bundle(bundle_dir)
    assert predictor.manifest.reference_profile and (bundle_dir / predictor.manifest.reference_profile["file"]).exists()
    image = sorted((data_dir / "test" / "tuberculosis").glob("*.jpg"))[0]
    prediction = predictor.predict_bytes(image.read_bytes())
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.decision.label in predictor.classes
    tags = registry.client().get_model_version(registry.REGISTERED_MODEL, version).tags
    assert tags["family"] == document["winner"]["family"] and "objective" in tags and "git_commit" in tags


def test_promote_and_rollback_move_the_aliases(sweep):
    document, _ = sweep
    first = document["registered_version"]
    source = registry.client().get_model_version(registry.REGISTERED_MODEL, first)
    second = mlflow.register_model(source.source, registry.REGISTERED_MODEL).version  # the same pyfunc model again
    assert registry.promote_version(second) == {"champion": second, "previous": first}
    assert registry.alias_version("champion") == second and registry.alias_version("previous") == first
    assert registry.rollback() == {"champion": first, "previous": second}
    assert registry.alias_version("champion") == first
    assert registry.rollback()["champion"] == second  # a second rollback undoes the first


@pytest.mark.slow
def test_worst_source_objective_ranks_a_trial_by_its_worst_held_out_source(data_dir, tmp_path):
    """``objective_mode: worst_source``: the trial's config is retrained without each source and
    scored on the one it never saw; the objective is the worst of those, not the validation score."""
    from training.config import TrainConfig
    from training.objective import worst_source_objective
    from training.sweep import trial_objective
    from training.train import run_training

    config = TrainConfig.from_yaml(REPO_ROOT / "configs" / "train" / "hog_logreg.yaml",
                                   {**FAST, "subset": {"train": 10, "val": 6, "test": 4}})
    result = run_training(config, data_dir, tmp_path / "runs", track=False)
    validation = trial_objective("validation", config, result, data_dir, tmp_path / "unused")
    worst = trial_objective("worst_source", config, result, data_dir, tmp_path / "loso")
    scores = {k.removeprefix("heldout_score_"): v for k, v in worst.items() if k.startswith("heldout_score_")}
    assert set(scores) == {"tbx11k", "tbdb", "kaggle-cxr", "kermany"}
    assert worst["worst_source_score"] == min(scores.values())
    assert worst["objective"] == pytest.approx(worst["worst_source_score"], abs=2e-3)  # + 0.001 x AUC tie-break
    assert worst["validation_objective"] == validation["objective"] and worst["objective"] != validation["objective"]
    assert not list((tmp_path / "unused").glob("*"))  # validation mode trains nothing more
    assert len(list((tmp_path / "loso").rglob("bundle"))) == 4  # one retraining per held-out source
    with pytest.raises(ValueError):
        worst_source_objective({}, config.policy.floors)


def test_champion_pyfunc_gives_the_endpoint_decision(sweep, data_dir, tmp_path):
    """What an MLOps engineer tries first: ``mlflow.pyfunc.load_model`` on the champion alias."""
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/cxr-screen@champion")
    assert [spec.name for spec in model.metadata.get_input_schema().inputs] == ["image"]
    images = [sorted((data_dir / "test" / label).glob("*.jpg"))[0] for label in ("normal", "pneumonia", "tuberculosis")]
    answers = model.predict(pd.DataFrame({"image": [path.read_bytes() for path in images] + [b"not an image"]}))
    by_path = model.predict(pd.DataFrame({"image": [str(path) for path in images]}))
    bundle_dir, _ = registry.fetch_bundle("models:/cxr-screen@champion", tmp_path / "champion")
    predictor = load_bundle(bundle_dir)
    for row, again, path in zip(answers.to_dict("records"), by_path.to_dict("records"), images):
        expected = predictor.predict_bytes(path.read_bytes())
        assert (row["label"], row["triage"], row["fired_class"]) == (
            expected.decision.label, expected.decision.triage, expected.decision.fired_class)
        assert row["p_tuberculosis"] == pytest.approx(expected.probabilities["tuberculosis"], abs=1e-6)
        assert row["error_code"] is None and again["label"] == row["label"]
    refused = answers.to_dict("records")[-1]
    assert refused["label"] is None and refused["error_code"] == "not_an_image" and refused["error"]
