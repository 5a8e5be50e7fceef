"""`make audit` on the real default data and on a subset with planted duplicates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_subset
from tests.imaging import jpeg_bytes
from training import audit
from training.data import discover_dataset


@pytest.fixture(scope="module")
def full_audit(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    assert audit.main(["--data-dir", str(data_dir), "--out", str(out), "--workers", "2"]) == 0
    return out, json.loads((out / "audit.json").read_text())


def test_counts_equal_the_manifest(full_audit, manifest_counts):
    _, document = full_audit
    assert document["total_images"] == sum(manifest_counts.values())
    for (split, label), expected in manifest_counts.items():
        assert document["counts"][split][label] == expected
    per_source = document["stats"]["per_source"]
    assert sum(s["count"] for s in per_source.values()) == document["total_images"]
    # cxr3 was de-duplicated when it was built: the audit must agree.
    assert document["duplicates"]["cross_class_clusters"] == 0
    assert document["flag_counts"]["undecodable"] == 0


def test_report_files_and_figures(full_audit):
    out, document = full_audit
    for name in ("summary.md", "exclusions.json", "class_distribution.png", "resolution_by_source.png",
                 "intensity_by_class.png", "flagged_contact_sheet.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "| train |" in summary and "tuberculosis" in summary
    # Quality flags are real: the set has bordered and low-contrast images, but not most of it.
    assert 0 < document["flag_counts"]["has_border"] < document["total_images"] / 4
    assert 0 < document["flag_counts"]["low_contrast"] < document["total_images"] / 4


@pytest.fixture()
def planted(data_dir, tmp_path):
    root = make_subset(data_dir, tmp_path / "planted", {"normal": 4, "pneumonia": 4, "tuberculosis": 4})
    source = sorted((root / "train" / "normal").glob("*.jpg"))[0]
    shutil.copy(source, root / "test" / "normal" / "copy-in-test.jpg")  # leakage
    shutil.copy(source, root / "train" / "pneumonia" / "copy-as-pneumonia.jpg")  # label conflict
    near = sorted((root / "val" / "tuberculosis").glob("*.jpg"))[0]
    with Image.open(near) as image:
        brighter = Image.fromarray(np.clip(np.asarray(image.convert("L")).astype(int) + 6, 0, 255).astype(np.uint8))
    (root / "val" / "tuberculosis" / "near-copy.jpg").write_bytes(jpeg_bytes(brighter, quality=70))
    (root / "train" / "tuberculosis" / "broken.jpg").write_bytes(near.read_bytes()[:500])
    small = sorted((root / "train" / "normal").glob("*.jpg"))[1]
    with Image.open(small) as image:
        image.convert("L").crop((0, 0, 80, 60)).save(root / "train" / "normal" / "tiny.png")
    return root, source


def test_planted_duplicates_conflicts_and_bad_files(planted):
    root, source = planted
    dataset = discover_dataset(root)
    document, _ = audit.run_audit(dataset, audit.AuditConfig(), workers=1)
    clusters = document["duplicates"]["list"]
    leak = next(c for c in clusters if f"train/normal/{source.name}" in c["members"])
    assert set(leak["members"]) == {f"train/normal/{source.name}", "test/normal/copy-in-test.jpg",
                                   "train/pneumonia/copy-as-pneumonia.jpg"}
    assert leak["exact"] and leak["splits"] == ["test", "train"] and leak["labels"] == ["normal", "pneumonia"]
    assert any(c for c in clusters if "val/tuberculosis/near-copy.jpg" in c["members"] and not c["exact"])
    excluded = {item["relpath"]: item["reasons"] for item in document["excluded"]}
    assert "label_conflict" in excluded["train/pneumonia/copy-as-pneumonia.jpg"]
    assert "label_conflict" in excluded["test/normal/copy-in-test.jpg"]
    assert excluded["train/tuberculosis/broken.jpg"] == ["undecodable"]
    assert excluded["train/normal/tiny.png"] == ["too_small"]
    near_excluded = [p for p in excluded if p.startswith("val/tuberculosis/")]
    assert len(near_excluded) == 1  # one copy of the within-split near duplicate is kept
    assert document["flag_counts"]["cross_split_leak"] >= 2
    assert document["errors"][0]["error"] == "truncated"

    exclusions = root.parent / "exclusions.json"
    audit.write_exclusions(document, exclusions)
    honoured = discover_dataset(root, exclusions=exclusions)
    assert len(honoured.records) == len(dataset.records) - len(excluded)
    assert set(honoured.excluded) == set(excluded)
    assert not any(r.relpath in excluded for r in honoured.records)


def test_cross_split_copy_keeps_the_held_out_one(planted, tmp_path):
    root, _ = planted
    extra = sorted((root / "train" / "pneumonia").glob("*.jpg"))[-1]
    shutil.copy(extra, root / "val" / "pneumonia" / "leaked.jpg")
    document, _ = audit.run_audit(discover_dataset(root), audit.AuditConfig(), workers=1)
    excluded = {item["relpath"]: item["reasons"] for item in document["excluded"]}
    assert excluded[f"train/pneumonia/{extra.name}"] == ["cross_split_duplicate"]
    assert "val/pneumonia/leaked.jpg" not in excluded
