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


@pytest.fixture(scope="session")
def monitoring_bundle(data_dir, tmp_path_factory) -> Path:
    """A small real bundle for the monitoring tests: HOG + logistic regression on 40 images per class.

    Not the 2-epoch cnn3: after temperature scaling that one answers ~1/3 for every class, which
    leaves nothing for PSI on probabilities or for ECE to measure. This one is ~70% accurate with
    spread-out, calibrated probabilities, and trains in seconds without MLflow.
    """
    from training.config import TrainConfig
    from training.train import run_training

    config = TrainConfig(run_name="monitoring", model="hog_logreg", mode="classical", preprocess={"image_size": 64},
                         subset={"train": 40, "val": 40, "test": 20}, n_bootstrap=50, exclusions=None)
    return run_training(config, data_dir, tmp_path_factory.mktemp("monitoring-bundle"), track=False).bundle_dir


@pytest.fixture(scope="session")
def tiny_bundle(data_dir, tmp_path_factory) -> Path:
    """A tiny real cnn3 bundle (64 px, 2 epochs on a small subset, no MLflow): serving, explain, triage."""
    from training.config import TrainConfig
    from training.train import run_training

    config = TrainConfig(run_name="tiny", model="cnn3", mode="scratch", model_kwargs={"channels": [8, 16, 32]},
                         preprocess={"image_size": 64}, subset={"train": 40, "val": 25, "test": 20}, epochs=2,
                         n_bootstrap=50, exclusions=None, figures=False)
    return run_training(config, data_dir, tmp_path_factory.mktemp("tiny-bundle"), track=False).bundle_dir


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory):
    """A real control plane (etcd, kube-apiserver, controller-manager, scheduler) for the session."""
    from tests.cluster import Cluster

    cluster = Cluster.start(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
