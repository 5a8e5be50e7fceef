"""Risk-prioritized policy: fitted thresholds meet their floors; the hierarchy decides."""

import numpy as np
import pytest

from cxr_core.policy import ClassRule, PolicyConfig, fit_policy_thresholds, wilson_lower_bound

CLASSES = ["normal", "pneumonia", "tuberculosis"]


def _synthetic(n_per_class=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    logits = rng.normal(0, 1.0, (len(labels), 3))
    logits[np.arange(len(labels)), labels] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


@pytest.mark.parametrize("safety", ["none", "margin", "wilson_lcb"])
def test_fitted_thresholds_meet_every_floor(safety):
    probs, labels = _synthetic()
    config = PolicyConfig(safety=safety)
    policy = fit_policy_thresholds(probs, labels, CLASSES, config)
    decided = policy.decide_indices(probs)
    for rule in config.ranked:
        index = CLASSES.index(rule.name)
        sensitivity = float((decided[labels == index] == index).mean())
        assert sensitivity >= rule.min_sensitivity, (rule.name, sensitivity)
        assert policy.fits[rule.name].floor_met
        assert policy.fits[rule.name].validation_sensitivity == pytest.approx(sensitivity)
    if safety == "margin":
        assert policy.fits["tuberculosis"].validation_sensitivity >= 0.93 - 1e-9
    if safety == "wilson_lcb":
        tb = policy.fits["tuberculosis"]
        captured = round(tb.validation_sensitivity * tb.positives)
        assert wilson_lower_bound(captured, tb.positives, config.confidence) >= 0.90


def test_threshold_is_the_highest_that_meets_the_floor():
    probs, labels = _synthetic()
    policy = fit_policy_thresholds(probs, labels, CLASSES, PolicyConfig(safety="none"))
    tb = CLASSES.index("tuberculosis")
    threshold = policy.thresholds["tuberculosis"]
    higher = np.sort(probs[labels == tb, tb])
    next_up = higher[higher > threshold].min()
    assert float((probs[labels == tb, tb] >= next_up).mean()) < 0.90


def test_hierarchical_rule_on_hand_made_rows():
    probs, labels = _synthetic()
    policy = fit_policy_thresholds(probs, labels, CLASSES, PolicyConfig())
    policy.thresholds.update({"tuberculosis": 0.30, "pneumonia": 0.40})
    rows = np.array([
        [0.10, 0.55, 0.35],  # TB reaches its threshold first, although pneumonia is larger
        [0.47, 0.48, 0.05],  # TB below, pneumonia reaches 0.40 (0.08 above: not gray)
        [0.70, 0.20, 0.10],  # nothing fires: fallback normal
        [0.38, 0.33, 0.29],  # nothing fires, TB 0.01 below its threshold (gray), pneumonia 0.07 below (not)
        [0.40, 0.37, 0.23],  # nothing fires, pneumonia 0.03 below (gray), TB 0.07 below (not)
    ])
    assert [CLASSES[i] for i in policy.decide_indices(rows)] == ["tuberculosis", "pneumonia", "normal", "normal", "normal"]
    first = policy.decide(rows[0])
    assert first.fired_class == "tuberculosis" and first.threshold == 0.30 and first.triage == "urgent"
    assert policy.decide(rows[2]).triage == "routine" and policy.decide(rows[2]).fired_class is None
    assert policy.decide(rows[3]).triage == "review" and policy.decide(rows[3]).gray_zone == ["tuberculosis"]
    assert policy.decide(rows[4]).triage == "review" and policy.decide(rows[4]).gray_zone == ["pneumonia"]
    assert policy.decide(rows[1]).gray_zone == [] and policy.decide(rows[2]).gray_zone == []
    assert policy.decide(rows[2], quality_concern=True).triage == "review"


def test_missing_and_unranked_classes_are_reported_loudly(caplog):
    probs, labels = _synthetic()
    classes = ["normal", "pneumonia", "covid"]
    policy = fit_policy_thresholds(probs, labels, classes, PolicyConfig())
    assert policy.missing_classes == ["tuberculosis"]
    assert policy.unranked_classes == ["covid"]
    assert any("tuberculosis" in w for w in policy.warnings)
    assert "does not have" in caplog.text
    # pneumonia is ranked and present: its threshold still fires; when nothing fires, the fallback
    # (normal) and the unranked class (covid) are decided by argmax between themselves
    policy.thresholds["pneumonia"] = 0.5
    rows = np.array([[0.2, 0.1, 0.7], [0.6, 0.1, 0.3], [0.1, 0.6, 0.3], [0.15, 0.45, 0.40]])
    assert [classes[i] for i in policy.decide_indices(rows)] == ["covid", "normal", "pneumonia", "covid"]
    assert policy.decide(rows[0]).triage == "review"  # a class the policy does not rank asks for a reader


def test_two_class_policy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    p = np.clip(labels * 0.4 + rng.uniform(0, 0.6, 400), 0, 1)
    probs = np.stack([1 - p, p], 1)
    config = PolicyConfig(priority=[ClassRule(name="tuberculosis", min_sensitivity=0.95), ClassRule(name="normal")])
    policy = fit_policy_thresholds(probs, labels, ["normal", "tuberculosis"], config)
    decided = policy.decide_indices(probs)
    assert (decided[labels == 1] == 1).mean() >= 0.95
    assert (probs.argmax(1)[labels == 1] == 1).mean() < 0.95  # argmax misses cases the policy catches


def test_unreachable_floor_is_flagged_not_hidden():
    labels = np.array([0, 1, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    policy = fit_policy_thresholds(probs, labels, CLASSES, PolicyConfig(safety="none"))
    assert not policy.fits["pneumonia"].floor_met
    assert any("cannot be met" in w for w in policy.warnings)


def test_config_validation():
    with pytest.raises(ValueError, match="twice"):
        PolicyConfig(priority=[ClassRule(name="a", min_sensitivity=0.9), ClassRule(name="a")])
    with pytest.raises(ValueError, match="min_sensitivity"):
        PolicyConfig(priority=[ClassRule(name="a"), ClassRule(name="b")])
