"""Shared fixtures: the real default dataset and small real subsets of it."""

from __future__ import annotations

import csv
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "cxr3")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "manifest.csv").exists(), f"default dataset missing at {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(scope="session")
def manifest_rows(data_dir: Path) -> list[dict[str, str]]:
    with open(data_dir / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def manifest_counts(manifest_rows) -> Counter:
    return Counter((row["split"], row["label"]) for row in manifest_rows)


def first_images(data_dir: Path, split: str, label: str, count: int) -> list[Path]:
    return sorted((data_dir / split / label).glob("*.jpg"))[:count]


def make_subset(data_dir: Path, target: Path, per_class: dict[str, int], splits=("train", "val", "test")) -> Path:
    """Copy the first N images of each split/class into ``target`` (real files, small set)."""
    for split in splits:
        for label, count in per_class.items():
            destination = target / split / label
            destination.mkdir(parents=True, exist_ok=True)
            for path in first_images(data_dir, split, label, count):
                shutil.copy(path, destination / path.name)
    shutil.copy(data_dir / "manifest.csv", target / "manifest.csv")
    return target


@pytest.fixture(scope="session")
def sample_image(data_dir: Path) -> Path:
    """A real adult tuberculosis radiograph with no black border of its own."""
    return first_images(data_dir, "test", "tuberculosis", 1)[0]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend) for the whole test session."""
    from training.mlflow_server import start_server

    server = start_server(tmp_path_factory.mktemp("mlflow"), free_port())
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    try:
        yield server
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
