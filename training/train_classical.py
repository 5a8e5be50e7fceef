"""HOG + classical classifiers (logistic regression, MLP, random forest), scikit-learn."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.pipeline import Pipeline

from cxr_core.hog import hog_features
from cxr_core.models import create_model
from training.config import TrainConfig
from training.datasets import SplitArrays
from training.materialize import fixed_matrix_training_split, source_label_counts
from training.train_torch import macro_f1

log = logging.getLogger(__name__)


def build_classifier(config: TrainConfig, num_classes: int) -> Pipeline:
    """The unfitted HOG family the config names, through the one model registry."""
    settings = config.classical
    return create_model(config.model, num_classes, c=settings.c, hidden=settings.hidden,
                        n_estimators=settings.n_estimators, seed=config.seed, n_jobs=config.num_threads)


def train_classical(config: TrainConfig, train: SplitArrays, val: SplitArrays, num_classes: int) -> tuple[Pipeline, dict]:
    """Fit on HOG features of the training split; report validation macro-F1.

    The config's source balancing and resolution augmentation are materialized on the training
    split first (:mod:`training.materialize`): a fixed matrix has no sampler to ask.
    """
    train = fixed_matrix_training_split(train, config)
    train_x = hog_features(train.pixels, config.classical.hog)
    classifier = build_classifier(config, num_classes)
    classifier.fit(train_x, train.labels)
    if list(classifier.classes_) != list(range(num_classes)):
        raise ValueError(f"training split lacks classes: saw {list(classifier.classes_)} of {num_classes}")
    val_probs = classifier.predict_proba(hog_features(val.pixels, config.classical.hog))
    f1 = macro_f1(val.labels, np.log(np.clip(val_probs, 1e-7, 1)), num_classes)
    return classifier, {"history": [{"val_macro_f1": f1}], "best_val_macro_f1": f1, "features": int(train_x.shape[1]),
                        "fitted_rows": source_label_counts(train)}
