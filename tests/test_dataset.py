"""Dataset layer on the real default data and on hand-made layouts."""

import shutil

import pytest

from tests.conftest import make_subset
from training.data import dataset_fingerprint, discover_dataset


def test_default_dataset_matches_manifest(data_dir, manifest_counts, manifest_rows):
    dataset = discover_dataset(data_dir)
    assert dataset.classes == ["normal", "pneumonia", "tuberculosis"]
    assert dataset.splits == ["train", "val", "test"]
    counts = {(r.split, r.label) for r in dataset.records}
    assert counts == set(manifest_counts)
    for (split, label), expected in manifest_counts.items():
        assert sum(1 for r in dataset.records if r.split == split and r.label == label) == expected
    assert "unknown" not in dataset.sources()
    assert set(dataset.sources()) == {row["source_dataset"] for row in manifest_rows}
    assert len(dataset_fingerprint(dataset)) == 64


def test_classes_come_from_folders(data_dir, tmp_path):
    subset = make_subset(data_dir, tmp_path / "two", {"normal": 2, "tuberculosis": 3}, splits=("train", "val"))
    dataset = discover_dataset(subset)
    assert dataset.classes == ["normal", "tuberculosis"]
    assert dataset.splits == ["train", "val"]
    assert len(dataset.split("train")) == 5


def test_flat_class_layout_is_one_split(data_dir, tmp_path):
    make_subset(data_dir, tmp_path / "s", {"normal": 2, "pneumonia": 2}, splits=("test",))
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "s" / "test", flat)
    dataset = discover_dataset(flat)
    assert dataset.splits == ["all"] and dataset.classes == ["normal", "pneumonia"]
    assert dataset.manifest_sha256 is None and all(r.source == "unknown" for r in dataset.records)


def test_missing_or_empty_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        discover_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class folders"):
        discover_dataset(tmp_path)
