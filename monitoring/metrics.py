"""Small Evidently 0.7 metrics the drift report adds to the PSI preset.

Evidently has PSI per column (``DataDriftPreset(method="psi")`` -> one ``ValueDrift`` each); what
it lacks for a triage model is the share of each *decided* class and the calibration of the
probabilities on confirmed labels. These metrics compute them inside the same ``Report``, so every
number the retrain decision reads is in one snapshot (and in its HTML):

- ``DecidedClassShare(dataset="reference"|"current")``: share of each class among the decisions;
- ``DecidedClassShareShift``: current share minus reference share, per class;
- ``CalibrationError(adaptive=False|True, dataset=...)``: top-label ECE (``cxr_core.calibration``)
  on the rows that have a label.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import pandas as pd
from evidently.core.metric_types import ByLabelCalculation, ByLabelMetric, SingleValueCalculation, SingleValueMetric
from evidently.legacy.renderers.html_widgets import table_data

from cxr_core.calibration import expected_calibration_error, reliability_curve
from cxr_core.features import probability_column

DATASETS = ("current", "reference")


def _frame(metric, current_data, reference_data) -> pd.DataFrame:
    dataset = current_data if metric.dataset == "current" else reference_data
    if dataset is None:
        raise ValueError(f"{type(metric).__name__} on the reference needs reference data")
    return dataset.as_dataframe()


def class_shares(decisions: pd.Series, classes: List[str]) -> dict:
    """Share of each class in ``decisions`` (0 for a class never decided); NaN decisions are left out."""
    values = decisions.dropna().astype(str)
    total = len(values)
    counts = values.value_counts()
    return {c: (float(counts.get(c, 0)) / total if total else 0.0) for c in classes}


class DecidedClassShare(ByLabelMetric):
    """Share of each class among the logged decisions of one dataset."""

    column: str = "decision"
    classes: List[str]
    dataset: str = "current"


class DecidedClassShareCalculation(ByLabelCalculation[DecidedClassShare]):
    def calculate(self, context, current_data, reference_data):
        shares = class_shares(_frame(self.metric, current_data, reference_data)[self.metric.column], self.metric.classes)
        result = self.result(shares)
        result.widget = [table_data(
            title=self.display_name(), column_names=["class", "share"],
            data=[[c, f"{v:.3f}"] for c, v in shares.items()])]
        return result

    def display_name(self) -> str:
        return f"Share of each decided class ({self.metric.dataset})"


class DecidedClassShareShift(ByLabelMetric):
    """Current share minus reference share of each decided class."""

    column: str = "decision"
    classes: List[str]


class DecidedClassShareShiftCalculation(ByLabelCalculation[DecidedClassShareShift]):
    def calculate(self, context, current_data, reference_data):
        if reference_data is None:
            raise ValueError("the class-share shift needs reference data")
        current = class_shares(current_data.as_dataframe()[self.metric.column], self.metric.classes)
        reference = class_shares(reference_data.as_dataframe()[self.metric.column], self.metric.classes)
        shift = {c: current[c] - reference[c] for c in self.metric.classes}
        result = self.result(shift)
        result.widget = [table_data(
            title=self.display_name(), column_names=["decided class", "reference share", "current share", "shift"],
            data=[[c, f"{reference[c]:.3f}", f"{current[c]:.3f}", f"{shift[c]:+.3f}"] for c in self.metric.classes])]
        return result

    def display_name(self) -> str:
        return "Shift in the share of each decided class (current - reference)"


class CalibrationError(SingleValueMetric):
    """Top-label expected calibration error of ``p_<class>`` against ``label`` (labelled rows only)."""

    label_column: str = "label"
    classes: List[str]
    n_bins: int = 15
    adaptive: bool = False
    dataset: str = "current"
    min_rows: Optional[int] = 1


def labelled_probabilities(frame: pd.DataFrame, label_column: str, classes: List[str]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, label indices) of the rows whose label is one of ``classes``."""
    if label_column not in frame:
        return np.zeros((0, len(classes))), np.zeros(0, dtype=np.int64)
    labels = frame[label_column].astype("string")
    mask = labels.isin(classes).fillna(False).to_numpy(dtype=bool)
    probs = frame.loc[mask, [probability_column(c) for c in classes]].to_numpy(dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    return probs, np.array([index[str(v)] for v in labels[mask]], dtype=np.int64)


class CalibrationErrorCalculation(SingleValueCalculation[CalibrationError]):
    def calculate(self, context, current_data, reference_data):
        probs, labels = labelled_probabilities(_frame(self.metric, current_data, reference_data),
                                               self.metric.label_column, self.metric.classes)
        if len(labels) < (self.metric.min_rows or 1):
            raise ValueError(f"{self.display_name()}: {len(labels)} labelled rows, need {self.metric.min_rows}")
        value = expected_calibration_error(probs, labels, n_bins=self.metric.n_bins, adaptive=self.metric.adaptive)
        curve = reliability_curve(probs, labels, n_bins=self.metric.n_bins, adaptive=self.metric.adaptive)
        result = self.result(value)
        rows = [[f"{lo:.3f}-{hi:.3f}", f"{conf:.3f}", f"{acc:.3f}", f"{conf - acc:+.3f}", n]
                for lo, hi, conf, acc, n in zip(curve["lower"], curve["upper"], curve["confidence"],
                                                curve["accuracy"], curve["count"])]
        result.widget = [table_data(
            title=f"{self.display_name()}: {value:.3f} on {len(labels)} labelled requests",
            column_names=["confidence bin", "mean confidence", "accuracy", "gap", "requests"], data=rows)]
        return result

    def display_name(self) -> str:
        binning = "adaptive" if self.metric.adaptive else "equal-width"
        return f"ECE ({binning}, {self.metric.n_bins} bins, {self.metric.dataset})"
