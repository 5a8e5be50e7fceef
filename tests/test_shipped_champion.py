"""The champion committed under models/champion: small enough to ship, carries its provenance, serves.

What a fresh clone's ``make demo`` registers (``training.registry register-shipped``), so its
bundle must load with the project's own loader, apply the lungs step it names and the gate it
carries, and decide real radiographs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cxr_core.bundle import UNGRADABLE, load_bundle
from cxr_core.errors import InputError

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "champion"
pytestmark = pytest.mark.skipif(not (SHIPPED / "bundle.json").exists(), reason="no champion ships in models/")


def test_shipped_champion_is_small_traceable_and_answers(data_dir):
    manifest = json.loads((SHIPPED / "bundle.json").read_text())
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 20 * 1024 * 1024
    provenance = manifest["provenance"]
    assert provenance["git_commit"] and provenance["data_manifest_sha256"] and provenance["train_config"]
    lungs = manifest["preprocess"].get("lung_fields", "none")
    if lungs != "none":  # the segmenter travels inside the bundle, named by its sha256
        shas = {hashlib.sha256(p.read_bytes()).hexdigest() for p in SHIPPED.glob("*.pt")}
        assert manifest["preprocess"]["lung_segmenter_sha256"] in shas
    predictor = load_bundle(SHIPPED)
    assert predictor.gate is not None and predictor.classes == ["normal", "pneumonia", "tuberculosis"]
    images = [next((data_dir / "test" / c).glob("*.jpg")).read_bytes() for c in predictor.classes]
    answers = predictor.predict_many(images + [bytes(8) + images[0][8:]])
    assert all(a.decision.label in predictor.classes + [UNGRADABLE] for a in answers[:3])
    assert sum(a.gradable for a in answers[:3]) >= 2
    assert isinstance(answers[3], InputError)  # a broken header is an input error, not a diagnosis
    assert abs(sum(answers[0].probabilities.values()) - 1) < 1e-5


def test_shipped_champion_explains_on_the_original_image(data_dir):
    """Grad-CAM of the decided class, mapped back through the lung crop onto the image the hospital sent."""
    from PIL import Image

    from cxr_core.explain import explain_image

    predictor = load_bundle(SHIPPED)
    path = next((data_dir / "test" / "tuberculosis").glob("*.jpg"))
    with Image.open(path) as original:
        width, height = original.size
    prediction, explanation = explain_image(predictor, path.read_bytes())
    assert explanation.target_class == prediction.decision.label
    assert explanation.heatmap.shape == (height, width) and explanation.heatmap.max() > 0
    assert 0.0 <= explanation.shares.outside_chest <= 1.0


def test_shipped_champion_refuses_radiograph_corners_and_photographs(data_dir):
    """Cropped to a 'lung box', a corner of a radiograph can pass for lung tissue; its failed lung
    segmentation is one tell (lungs_not_found), its size another (too_small), the crop discriminator
    the one that catches the rest (cropped). No photograph and no corner gets a diagnosis."""
    import numpy as np
    from PIL import Image

    from serving.gate_report import garbage_kinds

    predictor = load_bundle(SHIPPED)
    assert predictor.gate.config.lung_failure_threshold is not None
    assert predictor.gate.crop is not None and predictor.gate.config.crop_threshold is not None
    assert predictor.gate.config.refusal_rates["val"] <= 0.01 and predictor.gate.config.refusal_rates["test"] <= 0.01
    grays = [np.asarray(Image.open(p).convert("L")) for p in sorted((data_dir / "test").glob("*/*.jpg"))[::97][:6]]
    kinds = garbage_kinds(grays)
    answers = predictor.predict_many(kinds["natural_photo"])
    diagnosed = [a.decision.label for a in answers if not isinstance(a, InputError) and a.gradable]
    assert diagnosed == [], diagnosed
    # corners: the crop discriminator (reports/serving/gate.json: every corner kind 100%)
    for kind in ("radiograph_corner", "radiograph_corner_full_size", "radiograph_corner_any"):
        answers = predictor.predict_many(kinds[kind])
        diagnosed = [a.decision.label for a in answers if not isinstance(a, InputError) and a.gradable]
        assert diagnosed == [], (kind, diagnosed)
