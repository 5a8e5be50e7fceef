"""Robustness suite: LOSO on a tiny real subset, perturbation identity, probes at chance, worst-source objective."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_core.bundle import load_bundle
from cxr_core.policy import FittedPolicy, PolicyConfig
from training.config import TrainConfig
from training.data import discover_dataset
from training.objective import clinical_objective, select_objective, worst_source_objective
from training.robustness.config import FoldSpec, RobustnessConfig
from training.robustness.loso import run_loso, write_markdown
from training.robustness.perturb import IDENTITY, PERTURBATIONS, decode_records, perturb, predict_perturbed
from training.robustness.populations import ADULT, PEDIATRIC, age_group, heldout_records, kept_for_training
from training.robustness.shortcuts import mask_chest, probe_accuracy

TINY = {"subset": {"train": 8, "val": 5, "test": 4}, "exclusions": None}


@pytest.fixture(scope="module")
def dataset(data_dir):
    return discover_dataset(data_dir)


@pytest.fixture(scope="module")
def tiny_loso(data_dir, tmp_path_factory):
    """LOSO for HOG + logistic regression on a tiny real subset: tbx11k held out, plus all sources."""
    settings = RobustnessConfig.from_yaml("configs/robustness.yaml")
    base = TrainConfig.from_yaml("configs/train/hog_logreg.yaml", TINY)
    runs = tmp_path_factory.mktemp("loso-runs")
    document = run_loso(base, data_dir, settings, ["baseline", "source_balanced"], ["tbx11k", "all-sources"], runs)
    return document


@pytest.mark.slow
def test_loso_runs_end_to_end_and_never_trains_on_the_held_out_source(tiny_loso, dataset, tmp_path):
    for name in ("baseline", "source_balanced"):
        folds = {f["fold"]: f for f in tiny_loso["mitigations"][name]["folds"]}
        assert set(folds) == {"all-sources", "tbx11k"}
        assert [f["fold"] for f in tiny_loso["mitigations"][name]["folds"]] == ["tbx11k", "all-sources"]  # as asked
        held = folds["tbx11k"]
        for split in ("train", "val"):
            trained = held["trained_on"][split]
            assert trained and not any(key.startswith("tbx11k/") for key in trained), trained
            assert any(key.startswith("kaggle-cxr/tuberculosis") for key in trained)  # TB still learned
        assert any(key.startswith("tbx11k/") for key in folds["all-sources"]["trained_on"]["train"])
        # tested on every tbx11k image, against adult normals from the other sources' test split
        counts = held["heldout_counts"]
        assert counts["source_label"]["tbx11k/tuberculosis"] == sum(1 for r in dataset.records if r.source == "tbx11k")
        assert set(counts["age_label"]) == {"adult/normal", "adult/tuberculosis"}
        sens = held["heldout"]["classes"]["tuberculosis"]["sensitivity"]
        assert 0 <= sens["value"] <= 1 and sens["n"] == counts["source_label"]["tbx11k/tuberculosis"]
        summary = tiny_loso["mitigations"][name]["summary"]
        assert summary["worst_source"] == "tbx11k"
        assert summary["worst_source_tuberculosis_sensitivity"] == sens["value"]
        assert "objective" in summary["objective"] and "all_sources_test" in summary
    # the same images reach training; the source-balanced resample inside training (fixed-matrix
    # family) gives every source of a label the same fitted row count, also in the default config
    for name in ("baseline", "source_balanced"):
        fold = next(f for f in tiny_loso["mitigations"][name]["folds"] if f["fold"] == "tbx11k")
        assert fold["trained_on"] == next(f for f in tiny_loso["mitigations"]["baseline"]["folds"]
                                          if f["fold"] == "tbx11k")["trained_on"]
        fitted = fold["fitted_on"]
        assert sum(fitted.values()) > sum(fold["trained_on"]["train"].values())
        for label in ("normal", "pneumonia", "tuberculosis"):
            sizes = {n for key, n in fitted.items() if key.endswith(f"/{label}")}
            assert len(sizes) == 1, (name, fitted)
    assert tiny_loso["winner"]["mitigation"] in ("baseline", "source_balanced")
    write_markdown(tiny_loso, tmp_path / "loso.md")
    assert "worst-source tuberculosis sens" in (tmp_path / "loso.md").read_text()
    json.dumps(tiny_loso)  # the report is plain JSON


def test_model_report_reads_the_loso_report_its_writer_wrote(tiny_loso, tmp_path):
    """The champion's report card takes its LOSO headline from the real LOSO writer's document."""
    from training.model_report import _same_family, loso_block, loso_markdown

    path = tmp_path / "loso.json"
    path.write_text(json.dumps({**tiny_loso, "recipe": {"config": "configs/train/hog_logreg.yaml", "overrides": ["epochs=8"]}},
                               default=float))
    block = loso_block(path)
    summary = tiny_loso["mitigations"]["baseline"]["summary"]
    assert block["mitigation"] == "baseline" and block["worst_source"] == "tbx11k"
    assert block["worst_source_tb_sensitivity"] == summary["worst_source_tuberculosis_sensitivity"] is not None
    assert set(block["per_source"]) == {"tbx11k"}  # held-out folds only, not the all-sources run
    assert block["folds_not_run"] == []
    stopped = {**tiny_loso, "folds": ["tbx11k", "all-sources", "tbdb"]}  # a run stopped before its tbdb fold
    path.write_text(json.dumps(stopped, default=float))
    assert loso_block(path)["folds_not_run"] == ["tbdb"] and "not run**: tbdb" in "\n".join(loso_markdown(loso_block(path)))
    write_markdown(stopped, tmp_path / "stopped.md")
    assert "**Not run**" in (tmp_path / "stopped.md").read_text() and "tbdb" in (tmp_path / "stopped.md").read_text()
    path.write_text(json.dumps({**tiny_loso, "recipe": {"config": "configs/train/hog_logreg.yaml", "overrides": ["epochs=8"]}},
                               default=float))
    block = loso_block(path)
    tbx = block["per_source"]["tbx11k"]
    assert tbx["tb_sensitivity"] == block["worst_source_tb_sensitivity"] and tbx["counts"]["tuberculosis"] > 0
    text = "\n".join(loso_markdown(block))
    assert "tbx11k" in text and "epochs=8" in text and "hog_logreg.yaml" in text
    # a LOSO report of another family gives this bundle no headline
    assert _same_family(block, {"name": "hog_logreg", "training_mode": "classical"}) == block
    other = _same_family(block, {"name": "efficientnet_lite0", "training_mode": "finetune"})
    assert other["worst_source_tb_sensitivity"] is None and "efficientnet_lite0-finetune" in other["reason"]
    missing = loso_block(tmp_path / "absent.json")
    assert missing["worst_source_tb_sensitivity"] is None and "LOSO" in missing["reason"]


def test_fold_filters_and_held_out_sets(dataset):
    tbdb = FoldSpec(holdout="tbdb")
    copies = [r for r in dataset.records if r.source == "kaggle-cxr" and "tbdb" in r.manifest.get("duplicates_also_in", "")]
    assert copies and not any(kept_for_training(r, tbdb) for r in copies)
    assert all(kept_for_training(r, FoldSpec(holdout="tbdb", drop_duplicates_of_holdout=False)) for r in copies)
    held = heldout_records(dataset, tbdb)
    assert held and {r.source for r in held} == {"tbdb"}  # tbdb has its own normals: no partners
    tbx = heldout_records(dataset, FoldSpec(holdout="tbx11k"))
    partners = [r for r in tbx if r.source != "tbx11k"]
    assert partners and all(r.split == "test" and r.label == "normal" and age_group(r) == ADULT for r in partners)


def test_age_group_rule(dataset):
    by = {}
    for r in dataset.records:
        by.setdefault((r.source, r.label, r.manifest.get("duplicates_also_in", "")), r)
    assert age_group(by[("kermany", "normal", "")]) == PEDIATRIC
    assert age_group(by[("kaggle-cxr", "pneumonia", "kermany")]) == PEDIATRIC
    assert age_group(by[("kaggle-cxr", "normal", "kermany")]) == PEDIATRIC
    assert age_group(by[("kaggle-cxr", "normal", "")]) == ADULT
    assert age_group(by[("tbx11k", "tuberculosis", "")]) == ADULT


@pytest.mark.slow
def test_perturbation_at_severity_zero_leaves_predictions_unchanged(tiny_loso, dataset):
    bundle = tiny_loso["mitigations"]["baseline"]["summary"]["all_sources_test"]["bundle_dir"]
    predictor = load_bundle(bundle)
    records = [r for r in dataset.split("test") if r.label == "tuberculosis"][:3] + \
        [r for r in dataset.split("test") if r.label == "pneumonia"][:3]
    decoded = decode_records(records, predictor.manifest.preprocess.max_megapixels)
    served = np.array([[p.probabilities[c] for c in predictor.classes]
                       for p in (predictor.predict_bytes(r.path.read_bytes()) for r in records)])
    for name in PERTURBATIONS:
        probs, decisions = predict_perturbed(predictor, decoded, name, IDENTITY[name], seed=1)
        np.testing.assert_allclose(probs, served, atol=1e-6, err_msg=name)
        assert decisions.tolist() == predictor.manifest.policy.decide_indices(served).tolist()
        gray = decoded[0][0]
        assert perturb(gray, name, IDENTITY[name], np.random.default_rng(0)) is gray
        harsh = RobustnessConfig().perturb.severities[name][-1]
        changed = perturb(gray, name, harsh, np.random.default_rng(0))
        assert changed.shape != gray.shape or not np.array_equal(changed, gray), f"{name} at {harsh} did nothing"


def test_source_probe_on_random_features_is_near_chance(dataset):
    records = dataset.split("val") + dataset.split("test")
    sources = [r.source for r in records]
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(records), 32))
    result = probe_accuracy(noise, sources, folds=5, c=0.1, seed=0)
    assert result["accuracy"] <= result["chance"] + 0.03, result
    assert abs(result["balanced_accuracy"] - result["balanced_chance"]) < 0.1, result
    # positive control: features that carry the source are probed near perfectly
    codes = {s: k for k, s in enumerate(sorted(set(sources)))}
    informative = noise.copy()
    informative[np.arange(len(sources)), [codes[s] for s in sources]] += 4  # one direction per source
    assert probe_accuracy(informative, sources, folds=5, c=0.1, seed=0)["accuracy"] > 0.9


def test_mask_chest_fills_only_the_central_region():
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 100, 100), dtype=np.uint8)
    masked = mask_chest(pixels, "outside")
    assert np.array_equal(masked[:, :5], pixels[:, :5]) and np.array_equal(masked[:, :, :10], pixels[:, :, :10])
    assert len(np.unique(masked[0, 20:80, 20:80])) == 1
    kept = mask_chest(pixels, "chest")
    assert np.array_equal(kept[:, 20:80, 20:80], pixels[:, 20:80, 20:80]) and len(np.unique(kept[0, :5])) == 1


def test_objective_mode_default_is_unchanged_and_worst_source_picks_the_minimum():
    policy = FittedPolicy.model_validate({
        "config": PolicyConfig().model_dump(), "classes": ["normal", "pneumonia", "tuberculosis"],
        "thresholds": {"tuberculosis": 0.3, "pneumonia": 0.5},
        "fits": {"tuberculosis": {"threshold": 0.3, "target_sensitivity": 0.93, "validation_sensitivity": 0.94,
                                  "validation_specificity": 0.8, "positives": 100, "floor_met": True},
                 "pneumonia": {"threshold": 0.5, "target_sensitivity": 0.88, "validation_sensitivity": 0.9,
                               "validation_specificity": 0.9, "positives": 150, "floor_met": True}},
    })
    assert select_objective("validation", policy, 0.9) == clinical_objective(policy, 0.9)
    heldout = {
        "tbx11k": {"sensitivity": {"tuberculosis": 0.70}, "specificity": {"tuberculosis": 0.40}, "auc": {"tuberculosis": 0.6}},
        "tbdb": {"sensitivity": {"tuberculosis": 0.95}, "specificity": {"tuberculosis": 0.50}, "auc": {"tuberculosis": 0.8}},
        "kermany": {"sensitivity": {"pneumonia": 0.9, "tuberculosis": None},
                    "specificity": {"pneumonia": 0.9, "tuberculosis": 0.95}, "auc": {"pneumonia": 0.97}},
        # good pneumonia does not hide a missed-TB source: a source scores its worst class
        "kaggle-cxr": {"sensitivity": {"pneumonia": 0.95, "tuberculosis": 0.75},
                       "specificity": {"pneumonia": 0.95, "tuberculosis": 0.40}, "auc": {"tuberculosis": 0.7}},
    }
    result = select_objective("worst_source", policy, 0.9, heldout)
    assert result == worst_source_objective(heldout, policy.config.floors)
    assert result["heldout_score_tbx11k"] == result["worst_source_score"] == min(
        v for k, v in result.items() if k.startswith("heldout_score_"))
    assert all(isinstance(v, float) for v in result.values())  # logged as metrics
    assert result["worst_source_score"] == pytest.approx(0.70 + 0.40 - 1 - (0.90 - 0.70))
    assert result["heldout_score_kaggle-cxr"] == pytest.approx(0.75 + 0.40 - 1 - (0.90 - 0.75))
    with pytest.raises(ValueError):
        select_objective("worst_source", policy, 0.9)


def test_fixed_matrix_training_split_materializes_the_default_mitigation_and_nothing_when_unmitigated():
    from training.datasets import SplitArrays
    from training.materialize import fixed_matrix_training_split

    rng = np.random.default_rng(0)
    records = [type("R", (), {"source": s, "relpath": f"{s}{i}"})() for i, s in enumerate(["a"] * 6 + ["b"] * 2)]
    split = SplitArrays(name="train", pixels=rng.integers(0, 256, (8, 32, 32), dtype=np.uint8),
                        labels=np.zeros(8, dtype=np.int64), records=records)
    settings = RobustnessConfig.from_yaml("configs/robustness.yaml")
    unmitigated = TrainConfig.from_yaml("configs/train/hog_logreg.yaml", settings.mitigations["unmitigated"].overrides)
    assert fixed_matrix_training_split(split, unmitigated) is split
    default = TrainConfig.from_yaml("configs/train/hog_logreg.yaml")  # the mitigation is the default
    assert default.preprocess.clahe and default.source_balanced_sampler and default.augment.downscale_probability > 0
    out = fixed_matrix_training_split(split, default)
    assert len(out.labels) == 2 * 12 and [r.source for r in out.records].count("b") == 12
    assert np.array_equal(out.pixels[:8], split.pixels)
    assert not np.array_equal(out.pixels[12:20], split.pixels)  # the copies are resampled / blurred
    no_copies = TrainConfig.from_yaml("configs/train/hog_logreg.yaml", {"augment_copies": 0})
    assert len(fixed_matrix_training_split(split, no_copies).labels) == 12


def test_every_family_config_carries_the_chosen_mitigation():
    """The LOSO winner (CLAHE + resolution/blur augmentation + source balancing) is the default:
    every family config has it, and ``unmitigated`` changes exactly those settings back."""
    from pathlib import Path

    from training.robustness.mitigations import mitigated_config

    settings = RobustnessConfig.from_yaml("configs/robustness.yaml")
    for path in sorted(Path("configs/train").glob("*.yaml")):
        config = TrainConfig.from_yaml(path)
        assert config.preprocess.clahe and config.source_balanced_sampler, path
        assert (config.augment.downscale_probability, config.augment.blur_probability) == (0.5, 0.3), path
        plain = mitigated_config(config, settings.mitigations["unmitigated"])
        assert not plain.preprocess.clahe and not plain.source_balanced_sampler
        assert plain.augment.downscale_probability == 0.0
        changed = {k for k, v in config.model_dump().items() if plain.model_dump()[k] != v}
        assert changed == {"preprocess", "augment", "source_balanced_sampler"}, path


def test_audits_from_a_loso_report_default_to_before_and_after(tmp_path):
    """``make perturb`` / ``make shortcuts`` audit the unmitigated config, the default and the LOSO
    winner; an experimental winner is skipped (its bundle lacks its transform)."""
    from training.robustness.perturb import bundles_from_loso

    def entry(name, deployable=True):
        return {"deployable": deployable, "summary": {"all_sources_test": {"bundle_dir": f"/runs/{name}"}}}

    document = {"family": "hog_logreg", "winner": {"mitigation": "resolution_aug"},
                "mitigations": {n: entry(n) for n in ("baseline", "unmitigated", "resolution_aug")}}
    document["mitigations"]["chest_crop"] = entry("chest_crop", deployable=False)
    path = tmp_path / "loso.json"
    path.write_text(json.dumps(document))
    assert bundles_from_loso(path) == ["hog_logreg-unmitigated=/runs/unmitigated", "hog_logreg=/runs/baseline",
                                       "hog_logreg-resolution_aug=/runs/resolution_aug"]
    assert bundles_from_loso(path, ["chest_crop", "baseline"]) == ["hog_logreg=/runs/baseline"]
    document["winner"]["mitigation"] = "baseline"
    path.write_text(json.dumps(document))
    assert bundles_from_loso(path) == ["hog_logreg-unmitigated=/runs/unmitigated", "hog_logreg=/runs/baseline"]
