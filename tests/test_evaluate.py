"""Metrics and the evaluation report on hand-made and synthetic predictions (no model, no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr_core.calibration import softmax
from cxr_core.policy import ClassRule, FittedPolicy, PolicyConfig
from training.evaluate import evaluate_predictions, write_evaluation_markdown
from training.metrics import (
    average_metrics,
    bootstrap_intervals,
    classification_report,
    confusion_matrix,
    normalized_confusion_matrix,
    one_vs_rest_auc,
    per_class_metrics,
)

CLASSES = ["normal", "pneumonia", "tuberculosis"]
FLOORS = {"tuberculosis": 0.9, "pneumonia": 0.85}
THRESHOLDS = {"tuberculosis": 0.25, "pneumonia": 0.35}

# confusion (rows true, columns decided): [[3,1,0],[1,2,0],[0,1,2]]
HAND_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
HAND_PRED = np.array([0, 0, 0, 1, 0, 1, 1, 1, 2, 2])


def policy_decisions(probs: np.ndarray, classes: list[str], floors: dict[str, float], thresholds: dict) -> np.ndarray:
    """Decisions of the real :class:`FittedPolicy` (priority = the order of ``floors``) at fixed thresholds."""
    fallback = next(name for name in classes if name not in floors)
    config = PolicyConfig(priority=[ClassRule(name=name, min_sensitivity=floor) for name, floor in floors.items()]
                          + [ClassRule(name=fallback, triage="routine")])
    return FittedPolicy(config=config, classes=classes, thresholds=thresholds).decide_indices(probs)


def top_label_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Equal-width top-label ECE written out by hand: sum over bins of |accuracy - confidence| x share."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    total = 0.0
    for k in range(n_bins):
        low, high = k / n_bins, (k + 1) / n_bins
        members = (confidence > low) & (confidence <= high) if k else (confidence >= low) & (confidence <= high)
        if members.any():
            gap = abs((predicted[members] == labels[members]).mean() - confidence[members].mean())
            total += gap * members.sum() / len(labels)
    return float(total)


# ----------------------------------------------------------------------------------------------
# metrics on hand-made arrays


def test_per_class_metrics_equal_hand_computed_numbers():
    np.testing.assert_array_equal(confusion_matrix(HAND_TRUE, HAND_PRED, 3), [[3, 1, 0], [1, 2, 0], [0, 1, 2]])
    np.testing.assert_allclose(normalized_confusion_matrix(HAND_TRUE, HAND_PRED, 3)[0], [0.75, 0.25, 0.0])
    m = per_class_metrics(HAND_TRUE, HAND_PRED, ["a", "b", "c"])
    expected = {
        "a": dict(precision=3 / 4, sensitivity=3 / 4, specificity=5 / 6, f1=6 / 8, support=4),
        "b": dict(precision=2 / 4, sensitivity=2 / 3, specificity=5 / 7, f1=4 / 7, support=3),
        "c": dict(precision=1.0, sensitivity=2 / 3, specificity=1.0, f1=4 / 5, support=3),
    }
    for name, values in expected.items():
        for key, value in values.items():
            assert m[name][key] == pytest.approx(value), (name, key)
    averages = average_metrics(m, ["a", "b", "c"])
    assert averages["macro"]["sensitivity"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert averages["weighted"]["sensitivity"] == pytest.approx(0.7)  # = accuracy
    assert averages["macro"]["precision"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_four_classes_and_undefined_rates():
    y_true = np.array([0, 1, 2, 3, 3])
    y_pred = np.array([0, 1, 3, 3, 3])
    m = per_class_metrics(y_true, y_pred, list("abcd"))
    assert m["c"]["sensitivity"] == 0.0 and m["c"]["precision"] is None and m["d"]["precision"] == pytest.approx(2 / 3)
    absent = per_class_metrics(np.array([0, 0]), np.array([0, 1]), ["x", "y"])
    assert absent["y"]["sensitivity"] is None and absent["y"]["specificity"] == 0.5
    assert np.isnan(normalized_confusion_matrix(np.array([0, 0]), np.array([0, 1]), 2)[1]).all()


def test_auc_is_none_for_an_absent_class():
    rng = np.random.default_rng(1)
    y_true = np.array([0, 0, 1, 1, 0, 1])
    probs = softmax(rng.normal(size=(6, 3)))
    auc = one_vs_rest_auc(y_true, probs, CLASSES)
    assert auc["tuberculosis"] is None
    assert auc["normal"] == pytest.approx(roc_auc_score(y_true == 0, probs[:, 0]))
    only = one_vs_rest_auc(np.zeros(4, dtype=int), probs[:4], CLASSES)
    assert all(value is None for value in only.values())
    report = classification_report(y_true, probs.argmax(1), probs, CLASSES, n_bootstrap=50)
    assert report["per_class"]["tuberculosis"]["auc"] is None and report["macro_auc"] is not None


def test_bootstrap_interval_contains_point_and_is_seeded():
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 3, 300)
    y_pred = np.where(rng.random(300) < 0.8, y_true, rng.integers(0, 3, 300))
    point = per_class_metrics(y_true, y_pred, CLASSES)
    first = bootstrap_intervals(y_true, y_pred, CLASSES, n_bootstrap=400, seed=3)
    assert first == bootstrap_intervals(y_true, y_pred, CLASSES, n_bootstrap=400, seed=3)
    assert first != bootstrap_intervals(y_true, y_pred, CLASSES, n_bootstrap=400, seed=4)
    for name in CLASSES:
        for key in ("sensitivity", "specificity"):
            low, high = first[name][f"{key}_ci"]
            assert 0.0 <= low <= point[name][key] <= high <= 1.0
            assert high - low > 0.01


# ----------------------------------------------------------------------------------------------
# evaluate_predictions on a synthetic 3-class set with fake sources


def make_synthetic(classes, layout, seed=0, confident_wrong_rows=4):
    """layout: {source: {class: count}}; logits favour the true class with noise."""
    rng = np.random.default_rng(seed)
    y_true, sources = [], []
    for source, counts in layout.items():
        for name, count in counts.items():
            y_true += [classes.index(name)] * count
            sources += [source] * count
    y_true = np.array(y_true)
    logits = rng.normal(0.0, 1.0, size=(len(y_true), len(classes)))
    logits[np.arange(len(y_true)), y_true] += 1.8
    wrong = rng.choice(len(y_true), confident_wrong_rows, replace=False)
    logits[wrong, (y_true[wrong] + 1) % len(classes)] += 12.0  # confidently wrong
    relpaths = [f"test/{classes[t]}/img{i:04d}.png" for i, t in enumerate(y_true)]
    return y_true, logits, sources, relpaths


LAYOUT = {
    "adult": {"normal": 60, "tuberculosis": 50},
    "peds": {"normal": 70, "pneumonia": 80},
    "tbonly": {"tuberculosis": 30},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    y_true, logits, sources, relpaths = make_synthetic(CLASSES, LAYOUT)
    image_root = tmp_path_factory.mktemp("images")
    for i, relpath in enumerate(relpaths):
        path = image_root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), (i * 7) % 255, dtype=np.uint8)).save(path)
    temperature = 1.3
    probs = softmax(logits, temperature)
    policy = policy_decisions(probs, CLASSES, FLOORS, THRESHOLDS)
    out = tmp_path_factory.mktemp("eval")
    metrics = evaluate_predictions(
        CLASSES, y_true, logits, temperature, policy, THRESHOLDS, FLOORS, sources, relpaths, out,
        image_root=image_root, n_bootstrap=200, seed=0,
    )
    return dict(y_true=y_true, logits=logits, probs=probs, policy=policy, sources=np.array(sources),
                out=out, metrics=metrics, temperature=temperature)


def test_every_file_is_written(synthetic):
    out, metrics = synthetic["out"], synthetic["metrics"]
    expected = [
        "metrics.json", "report.md",
        "confusion_matrix_argmax.png", "confusion_matrix_policy.png", "roc_curves.png",
        "reliability_before.png", "reliability_after.png", "per_source_sensitivity.png",
        "worklist_missed.csv", "worklist_gray_zone.csv", "worklist_confident_wrong.csv",
        "worklist_missed.png", "worklist_gray_zone.png", "worklist_confident_wrong.png",
    ]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert set(expected) == set(metrics["files"])
    strict = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert strict["n"] == len(synthetic["y_true"]) and strict["reference_class"] == "normal"
    report = (out / "report.md").read_text()
    for heading in ("Per class", "Policy vs argmax", "Calibration", "Per source", "Same population", "Worklists"):
        assert heading in report


def test_policy_vs_argmax_equals_direct_computation(synthetic):
    y, probs, policy, metrics = synthetic["y_true"], synthetic["probs"], synthetic["policy"], synthetic["metrics"]
    argmax = probs.argmax(1)
    for name in FLOORS:
        k = CLASSES.index(name)
        pos, neg = y == k, y != k
        sens_a, sens_p = (argmax[pos] == k).mean(), (policy[pos] == k).mean()
        spec_a, spec_p = (argmax[neg] != k).mean(), (policy[neg] != k).mean()
        gain = metrics["policy_vs_argmax"][name]
        assert gain["sensitivity_gained"] == pytest.approx(sens_p - sens_a)
        assert gain["specificity_given_up"] == pytest.approx(spec_a - spec_p)
        assert gain["missed_cases_avoided"] == int((argmax[pos] != k).sum() - (policy[pos] != k).sum())
        assert metrics["per_class"]["policy"][name]["sensitivity"] == pytest.approx(sens_p)
        assert metrics["per_class"]["argmax"][name]["specificity"] == pytest.approx(spec_a)
        holds = metrics["floor_holds_bootstrap"][name]
        assert holds["floor"] == FLOORS[name] and holds["n_resamples"] == 200
        assert holds["policy_sensitivity"] == pytest.approx(sens_p)
        # the same 200 seeded resamples (seed 0) drawn by hand: the share whose sensitivity holds the floor
        draws = np.random.default_rng(0).integers(0, len(y), size=(200, len(y)))
        held = [(policy[rows][y[rows] == k] == k).mean() >= FLOORS[name] for rows in draws]
        assert holds["share"] == pytest.approx(np.mean(held))
    assert metrics["policy_vs_argmax"]["tuberculosis"]["sensitivity_gained"] > 0  # low threshold gains
    assert set(metrics["per_class"]) == {"argmax", "policy"}
    ci = metrics["per_class"]["policy"]["tuberculosis"]["sensitivity_ci"]
    assert ci[0] <= metrics["per_class"]["policy"]["tuberculosis"]["sensitivity"] <= ci[1]


def test_same_population_uses_only_sources_holding_both(synthetic):
    y, probs, policy, sources = synthetic["y_true"], synthetic["probs"], synthetic["policy"], synthetic["sources"]
    same = synthetic["metrics"]["same_population"]
    assert same["tuberculosis"]["sources"] == ["adult"]
    assert same["pneumonia"]["sources"] == ["peds"]
    rows = (sources == "adult") & np.isin(y, [0, 2])
    assert same["tuberculosis"]["n"] == int(rows.sum()) == 110
    assert same["tuberculosis"]["auc"] == pytest.approx(roc_auc_score(y[rows] == 2, probs[rows, 2]))
    tb = rows & (y == 2)
    normal = rows & (y == 0)
    assert same["tuberculosis"]["policy_sensitivity"] == pytest.approx((policy[tb] == 2).mean())
    assert same["tuberculosis"]["policy_specificity"] == pytest.approx((policy[normal] != 2).mean())


def test_per_source_calibration_and_worklists(synthetic):
    metrics, out, y, policy = synthetic["metrics"], synthetic["out"], synthetic["y_true"], synthetic["policy"]
    tbonly = metrics["per_source"]["tbonly"]
    assert tbonly["counts"] == {"normal": 0, "pneumonia": 0, "tuberculosis": 30}
    assert tbonly["auc"]["tuberculosis"] is None and tbonly["policy"]["tuberculosis"]["specificity"] is None
    assert metrics["per_source"]["adult"]["auc"]["tuberculosis"] is not None
    calibration = metrics["calibration"]
    assert calibration["temperature"] == synthetic["temperature"]
    n_bins, temperature = calibration["n_bins"], synthetic["temperature"]
    assert calibration["ece_before"] == pytest.approx(top_label_ece(softmax(synthetic["logits"]), y, n_bins))
    assert calibration["ece_after"] == pytest.approx(top_label_ece(softmax(synthetic["logits"], temperature), y, n_bins))
    for key in ("adaptive_ece_before", "adaptive_ece_after"):
        assert 0 < calibration[key] < 0.5

    with open(out / "worklist_missed.csv", newline="") as handle:
        missed = list(csv.DictReader(handle))
    assert list(missed[0])[:7] == ["relpath", "source", "true", "decided", "p_normal", "p_pneumonia", "p_tuberculosis"]
    expected_missed = sum(int(((y == CLASSES.index(d)) & (policy != CLASSES.index(d))).sum()) for d in FLOORS)
    assert len(missed) == metrics["worklists"]["missed"] == expected_missed
    assert all(row["true"] in FLOORS and row["true"] != row["decided"] for row in missed)
    with open(out / "worklist_confident_wrong.csv", newline="") as handle:
        wrong = list(csv.DictReader(handle))
    assert len(wrong) >= 4 and all(row["true"] != row["argmax"] for row in wrong)
    assert all(max(float(row[f"p_{c}"]) for c in CLASSES) > 0.95 for row in wrong)
    with open(out / "worklist_gray_zone.csv", newline="") as handle:
        gray = list(csv.DictReader(handle))
    assert gray and len(gray) == metrics["worklists"]["gray_zone"]


def test_two_classes_work(tmp_path):
    classes = ["normal", "tuberculosis"]
    layout = {"adult": {"normal": 40, "tuberculosis": 40}, "tbx": {"tuberculosis": 20}}
    y_true, logits, sources, relpaths = make_synthetic(classes, layout, seed=2, confident_wrong_rows=2)
    probs = softmax(logits)
    policy = policy_decisions(probs, classes, {"tuberculosis": 0.9}, {"tuberculosis": 0.3})
    metrics = evaluate_predictions(
        classes, y_true, logits, 1.0, policy, {"tuberculosis": 0.3}, {"tuberculosis": 0.9}, sources, relpaths,
        tmp_path, n_bootstrap=0,  # training evaluates validation without resampling
    )
    assert metrics["per_class"]["policy"]["tuberculosis"]["sensitivity_ci"] is None
    assert metrics["floor_holds_bootstrap"]["tuberculosis"]["share"] is None
    assert metrics["reference_class"] == "normal"
    assert set(metrics["per_class"]["policy"]) == set(classes)
    assert metrics["same_population"]["tuberculosis"]["sources"] == ["adult"]
    assert metrics["per_source"]["tbx"]["auc"]["tuberculosis"] is None
    for name in ("metrics.json", "confusion_matrix_policy.png", "roc_curves.png", "worklist_missed.csv"):
        assert (tmp_path / name).is_file()
    write_evaluation_markdown(json.loads((tmp_path / "metrics.json").read_text()), tmp_path / "again.md")
    assert "tuberculosis" in (tmp_path / "again.md").read_text()


def test_policy_class_missing_from_model_is_an_error(tmp_path):
    y_true, logits, sources, relpaths = make_synthetic(["normal", "pneumonia"], {"s": {"normal": 5, "pneumonia": 5}},
                                                       confident_wrong_rows=0)
    with pytest.raises(ValueError, match="tuberculosis"):
        evaluate_predictions(
            ["normal", "pneumonia"], y_true, logits, 1.0, np.zeros(10, dtype=int), {"pneumonia": 0.3},
            {"pneumonia": 0.85, "tuberculosis": 0.9}, sources, relpaths, Path(tmp_path), figures=False,
        )
