"""The gradability gate: fitted when a bundle is written, stored in it, applied by the Predictor.

Real bundles (the small HOG one and the tiny cnn3, both trained by the fixtures, so both families),
real radiographs, synthetic garbage and scikit-image's natural photographs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cxr_core.bundle import UNGRADABLE, load_bundle
from cxr_core.gate import GATE_ARRAYS, main as gate_main
from cxr_core.errors import TruncatedImageError
from serving.gate_report import garbage_kinds, incomplete_png, measure


@pytest.fixture(scope="module")
def grays(data_dir):
    paths = sorted((data_dir / "test").glob("*/*.jpg"))[::97][:6]
    return [np.asarray(Image.open(path).convert("L")) for path in paths]


@pytest.fixture(scope="module")
def real_test(data_dir):
    return [path.read_bytes() for path in sorted((data_dir / "test").glob("*/*.jpg"))[::6]]


RULE_KINDS = {"all_black": "blank", "all_white": "blank", "uniform_gray": "blank", "transparent": "blank",
              "large_black": "blank", "uniform_noise": "noise", "gaussian_noise": "noise", "rgb_noise": "noise",
              "salt_and_pepper": "noise", "strip_wide": "aspect_ratio", "strip_tall": "aspect_ratio"}


@pytest.mark.parametrize("bundle_fixture", ["monitoring_bundle", "tiny_bundle"])
def test_gate_is_fitted_stored_and_applied(bundle_fixture, request, grays, real_test):
    bundle = request.getfixturevalue(bundle_fixture)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["gate"]["ood_threshold"] > 0 and (bundle / GATE_ARRAYS).exists()
    assert manifest["gate"]["refusal_rates"]["val"] <= 0.011 + 1.0 / manifest["gate"]["n_fit"]
    predictor = load_bundle(bundle)
    assert predictor.gate is not None
    halves = ["first" if k < len(real_test) // 2 else "second" for k in range(len(real_test))]
    report = measure(predictor, real_test, garbage_kinds(grays), real_sources=halves)
    assert report["real_test"]["refusal_rate"] <= 0.05, report["real_test"]  # small bundles, small val splits
    per_source = report["real_test"]["per_source"]
    assert sum(row["n"] for row in per_source.values()) == len(real_test)
    assert sum(row["refused"] for row in per_source.values()) == report["real_test"]["refused"]
    for kind, code in RULE_KINDS.items():  # image statistics: whatever the model
        codes = report["garbage"][kind]["codes"]
        # noise shrunk to a 64 px model input averages out to a flat image: blank is also right
        allowed = {f"ungradable:{code}"} | ({"ungradable:blank"} if code == "noise" else set())
        assert set(codes) <= allowed and sum(codes.values()) == report["garbage"][kind]["n"], (kind, codes)
    for kind in ("truncated_png", "truncated_jpeg", "cut_png"):
        assert report["garbage"][kind]["codes"] == {"truncated": report["garbage"][kind]["n"]}, kind
    assert report["garbage"]["natural_photo"]["refusal_rate"] >= 0.75
    # an ungradable image gets no diagnosis: decision ungradable, triage review, the gate's reason
    answer = predictor.predict_many(garbage_kinds(grays)["all_black"][:1])[0]
    assert answer.decision.label == UNGRADABLE and answer.decision.triage == "review"
    assert answer.gate.code == "blank" and "blank" in answer.gate.reason and not answer.gradable
    # the gate does not change what a gradable image gets
    ungated = load_bundle(bundle, gate=False)
    for data in real_test[:10]:
        gated, plain = predictor.predict_bytes(data), ungated.predict_bytes(data)
        if gated.gradable:
            assert gated.decision == plain.decision and gated.probabilities == plain.probabilities


def test_an_image_too_small_to_grade_is_refused_by_its_size(monitoring_bundle, grays):
    """The size rule reads the original's shorter side: under ``min_side`` it is too_small, at it the rule
    is silent (whatever else the gate says)."""
    import io

    predictor = load_bundle(monitoring_bundle)
    limit = predictor.gate.config.min_side
    assert limit == 100

    def shrunk(side: int) -> bytes:
        image = Image.fromarray(grays[0])
        scale = side / min(image.size)
        buffer = io.BytesIO()
        image.resize((round(image.width * scale), round(image.height * scale))).save(buffer, "PNG")
        return buffer.getvalue()

    small, enough = predictor.predict_many([shrunk(limit - 10), shrunk(limit)])
    assert small.gate.code == "too_small" and small.decision.label == UNGRADABLE and "too small" in small.gate.reason
    assert enough.gate.code != "too_small"


def test_incomplete_png_and_jpeg_are_truncated_not_padded(grays):
    from cxr_core.decode import decode_grayscale

    with pytest.raises(TruncatedImageError):
        decode_grayscale(incomplete_png(grays[0], 0.4), 20)
    assert decode_grayscale(incomplete_png(grays[0], 1.0), 20).height == grays[0].shape[0]  # complete: fine


def test_gate_refit_command(monitoring_bundle, data_dir, tmp_path, capsys):
    bundle = shutil.copytree(monitoring_bundle, tmp_path / "bundle")
    before = json.loads((bundle / "bundle.json").read_text())["gate"]
    gate_main(["fit", "--bundle", str(bundle), "--data-dir", str(data_dir), "--limit", "30"])
    after = json.loads((bundle / "bundle.json").read_text())["gate"]
    assert after["n_fit"] == 90 != before["n_fit"] and set(after["refusal_rates"]) == {"val", "test"}
    assert json.loads(capsys.readouterr().out)["ood_threshold"] == after["ood_threshold"]
    assert load_bundle(bundle).gate.config.n_fit == 90


def test_a_mixed_batch_keeps_one_answer_per_image_in_order(monitoring_bundle, grays, real_test):
    """A refused image in a batch must not shift the answers of the others (it once produced N+1)."""
    predictor = load_bundle(monitoring_bundle)
    blank = garbage_kinds(grays)["all_black"][0]
    batch = [real_test[0], blank, real_test[1], blank]
    answers = predictor.predict_many(batch)
    assert len(answers) == len(batch)
    assert [answer.decision.label == UNGRADABLE for answer in answers] == [
        not predictor.predict_bytes(real_test[0]).gradable, True, not predictor.predict_bytes(real_test[1]).gradable, True]
    for position in (0, 2):
        assert answers[position].decision == predictor.predict_bytes(batch[position]).decision


def _refusal_rate(predictor, files: list[bytes]) -> float:
    from cxr_core.errors import InputError

    return float(np.mean([isinstance(a, InputError) or not a.gradable for a in predictor.predict_many(files)]))


def test_crop_discriminator_refuses_corners_the_unsupervised_scores_miss(monitoring_bundle, data_dir):
    """Corners of held-out test radiographs (the discriminator learned on corners of training ones):
    the crop rule refuses most and more than the gate does without it, with its own code and reason."""
    predictor = load_bundle(monitoring_bundle)
    gate = predictor.gate
    assert gate.crop is not None and gate.config.crop_threshold is not None
    paths = sorted((data_dir / "test").glob("*/*.jpg"))[::41][:15]
    corners = garbage_kinds([np.asarray(Image.open(path).convert("L")) for path in paths])["radiograph_corner_any"]
    answers = predictor.predict_many(corners)
    cropped = [a for a in answers if not isinstance(a, Exception) and a.gate and a.gate.code == "cropped"]
    assert cropped and all(a.decision.label == UNGRADABLE and "part of a chest" in a.gate.reason for a in cropped)
    with_rule = _refusal_rate(predictor, corners)
    gate.config.crop_threshold = None
    without_rule = _refusal_rate(predictor, corners)
    assert with_rule >= 0.8 and with_rule > without_rule, (with_rule, without_rule)


def test_crop_limit_spends_what_the_other_rules_leave(monitoring_bundle, data_dir):
    """Thresholds re-set on a validation sample at a 5% budget: all rules together refuse exactly the
    budget (the crop limit is set last, on what the others let through), and the crop rule takes part."""
    from cxr_core.gate import lung_failures, set_thresholds, split_arrays

    predictor = load_bundle(monitoring_bundle)
    gate, preprocess = predictor.gate, predictor.manifest.preprocess
    val = split_arrays(data_dir, preprocess, "val", 40)
    failed = lung_failures(val.records, preprocess)
    gate.config.target_refusal = 0.05
    set_thresholds(gate, predictor, val.pixels, failed)
    flags = None if failed is None else [bool(f) for f in failed]
    verdicts = gate.verdicts(predictor, val.pixels, [1.0] * len(val.pixels), None, flags)
    codes = [v.code for v in verdicts if not v.gradable]
    assert len(codes) == int(0.05 * len(val.pixels)), codes
    assert "cropped" in codes and "not_a_chest_radiograph" in codes, codes


def test_a_gate_without_crop_discriminator_still_loads(monitoring_bundle, tmp_path, grays):
    """Bundles fitted before the crop rule (no crop.* arrays, no crop_threshold) load and never answer
    'cropped'; everything else about their verdicts is unchanged."""
    bundle = shutil.copytree(monitoring_bundle, tmp_path / "bundle")
    with np.load(bundle / GATE_ARRAYS) as arrays:
        kept = {name: arrays[name] for name in arrays.files if not name.startswith("crop.")}
    assert len(kept) < len(np.load(bundle / GATE_ARRAYS).files)
    np.savez(bundle / GATE_ARRAYS, **kept)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["gate"].pop("crop_threshold")
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    old, new = load_bundle(bundle), load_bundle(monitoring_bundle)
    assert old.gate.crop is None and old.gate.config.crop_threshold is None
    files = garbage_kinds(grays)["radiograph_corner_any"] + garbage_kinds(grays)["all_black"]
    for before, now in zip(old.predict_many(files), new.predict_many(files)):
        assert before.gate.code != "cropped" and "crop" not in before.gate.scores
        if now.gate.code != "cropped":
            assert before.gate.code == now.gate.code
