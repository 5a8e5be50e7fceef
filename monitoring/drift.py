"""The drift job: today's requests against the model's reference profile, and whether to retrain.

    python -m monitoring.drift --current logs/ --reference runs/.../bundle --out reports/drift/today \\
        [--window-last N | --window-days D | --window-start T --window-end T] [--compare-previous-window] \\
        [--feedback-db monitoring/feedback.db] [--config configs/drift.yaml] [--trigger none|local|kubernetes]

One Evidently 0.7 ``Report``: PSI per image feature, per class probability and per categorical
column (``DataDriftPreset(method="psi")`` -> one ``ValueDrift`` each), the share of each decided
class in the reference and now and its shift, and top-label ECE (equal-width and adaptive) on the
requests a radiologist has labelled (``monitoring.feedback``). It writes ``report.html`` and
``summary.json`` to ``--out``; the decision (``monitoring.decision.decide``) reads only the
snapshot's numbers and the thresholds of ``configs/drift.yaml``.

Exit status, for a scheduler: 0 = ok, 3 = retrain, 4 = retrain but the retrain trigger failed,
1 = the job failed (bad input), 2 = bad arguments.

``--reference`` is a bundle directory (its ``reference_profile.csv``, see ``cxr_core.reference``),
a profile CSV, or an MLflow URI of a logged bundle (``models:/cxr-screen@champion``, ``runs:/...``).
``--current`` is an audit-log file, a folder of ``*.jsonl``, or a feature CSV.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_core.reporting import json_ready
from monitoring.config import DEFAULT_CONFIG, DriftConfig, expand_columns, load_config
from monitoring.decision import DriftDecision, decide, summary_from_snapshot
from monitoring.features import (
    LABEL_COLUMN,
    FeatureTable,
    Window,
    WindowSpec,
    load_features,
    parse_time,
    probability_classes,
    select_window,
)

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
PREVIOUS_HTML = "report_previous_window.html"
SUMMARY_JSON = "summary.json"
SUMMARY_DIGITS = 6  # the summary's floats: more would be noise of the estimate
EXIT_TRIGGER_FAILED = 4
TRIGGER_ENV = "CXR_RETRAIN_TRIGGER"
_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "file://")


# --- inputs ---------------------------------------------------------------------------------------


@dataclass
class Reference:
    table: FeatureTable
    info: dict[str, Any]


def load_reference(reference: str | Path) -> Reference:
    """A bundle directory, a profile CSV, or an MLflow URI of a logged bundle -> the reference table."""
    text = str(reference)
    if text.startswith(_URI_SCHEMES):
        from training.registry import fetch_bundle  # the one bundle store (registry, serving and here)

        with tempfile.TemporaryDirectory(prefix="cxr-reference-") as folder:
            bundle, _ = fetch_bundle(text, Path(folder) / "bundle")
            loaded = _reference_of_bundle(bundle)
        loaded.info.update({"source": text, "bundle": text, "file": f"{text} -> {loaded.info['file_name']}"})
        return loaded
    path = Path(text)
    if path.is_dir():
        return _reference_of_bundle(path)
    if path.is_file():
        table = load_features(path)
        return Reference(table=table, info={"source": text, "file": str(path), "rows": int(len(table.frame))})
    raise FileNotFoundError(f"reference {text} is neither a bundle directory, a CSV nor an MLflow URI")


def _reference_of_bundle(bundle: Path) -> Reference:
    from cxr_core.bundle import read_manifest
    from cxr_core.reference import reference_profile_path

    path = reference_profile_path(bundle)
    manifest = read_manifest(bundle)
    table = load_features(path)
    info = {"source": str(bundle), "bundle": str(bundle), "file": str(path), "file_name": path.name,
            "rows": int(len(table.frame)), "profile": manifest.reference_profile, "model": manifest.model.name,
            "mlflow_run_id": manifest.provenance.mlflow_run_id}
    return Reference(table=table, info=info)


def _categorical(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    frame = frame.copy()
    for column in columns:
        frame[column] = frame[column].astype("string").fillna("missing").astype(str)
    return frame


@dataclass
class Prepared:
    current: pd.DataFrame
    reference: pd.DataFrame
    numerical: list[str]
    categorical: list[str]
    classes: list[str]
    key_features: list[str]


def prepare(current: pd.DataFrame, reference: pd.DataFrame, config: DriftConfig) -> Prepared:
    """Monitored columns present on both sides, categorical ones as strings; the model's classes."""
    classes = probability_classes(reference)
    current_classes = probability_classes(current)
    if not classes:
        raise ValueError("the reference has no p_<class> columns: is it a cxr-screen reference profile?")
    if current_classes and set(current_classes) != set(classes):
        raise ValueError(f"current requests have classes {current_classes} but the reference {classes}: "
                         "compare a model version with its own reference profile")
    common = [c for c in reference.columns if c in current.columns]
    numerical = expand_columns(config.numerical_features, common)
    categorical = [c for c in expand_columns(config.categorical_features, common) if c not in numerical]
    missing = [p for p in (*config.numerical_features, *config.categorical_features)
               if not expand_columns([p], common)]
    if missing:
        log.warning("monitored columns missing on one side, not compared: %s", missing)
    return Prepared(
        current=_categorical(current, categorical),
        reference=_categorical(reference, categorical),
        numerical=numerical,
        categorical=categorical,
        classes=classes,
        key_features=[c for c in numerical + categorical if config.thresholds.is_key(c)],
    )


def n_labelled(frame: pd.DataFrame, classes: Sequence[str]) -> int:
    if LABEL_COLUMN not in frame:
        return 0
    return int(frame[LABEL_COLUMN].astype("string").isin(list(classes)).fillna(False).sum())


# --- the Evidently report ---------------------------------------------------------------------------


def build_report(prepared: Prepared, config: DriftConfig, ece_current: bool, ece_reference: bool):
    """The Report: PSI preset over the monitored columns, class shares and their shift, ECE."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    from monitoring.metrics import CalibrationError, DecidedClassShare, DecidedClassShareShift

    columns = prepared.numerical + prepared.categorical
    metrics: list[Any] = [DataDriftPreset(columns=columns, method="psi", threshold=config.thresholds.psi)]
    if "decision" in prepared.categorical:
        metrics += [
            DecidedClassShare(classes=prepared.classes, dataset="reference"),
            DecidedClassShare(classes=prepared.classes, dataset="current"),
            DecidedClassShareShift(classes=prepared.classes),
        ]
    for dataset, wanted in (("current", ece_current), ("reference", ece_reference)):
        if wanted:
            metrics += [CalibrationError(classes=prepared.classes, n_bins=config.ece_bins, adaptive=adaptive,
                                         dataset=dataset) for adaptive in (False, True)]
    return Report(metrics)


def run_report(prepared: Prepared, config: DriftConfig):
    """Run the report; returns the Evidently snapshot."""
    from evidently import DataDefinition, Dataset

    definition = DataDefinition(numerical_columns=prepared.numerical, categorical_columns=prepared.categorical)
    keep = prepared.numerical + prepared.categorical
    extra = [c for c in (LABEL_COLUMN, *[f"p_{k}" for k in prepared.classes]) if c not in keep]

    def dataset(frame: pd.DataFrame) -> Dataset:
        columns = keep + [c for c in extra if c in frame]
        return Dataset.from_pandas(frame[columns].reset_index(drop=True), data_definition=definition)

    report = build_report(prepared, config,
                          ece_current=n_labelled(prepared.current, prepared.classes) > 0,
                          ece_reference=n_labelled(prepared.reference, prepared.classes) > 0)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # Evidently's drift widgets correlate columns; a constant column (a flag never set) divides by 0.
        warnings.simplefilter("ignore", RuntimeWarning)
        return report.run(current_data=dataset(prepared.current), reference_data=dataset(prepared.reference))


def compare(current: pd.DataFrame, reference: pd.DataFrame, config: DriftConfig,
            html_path: Path | None = None) -> tuple[dict[str, Any], DriftDecision, Prepared]:
    """One comparison: snapshot -> numbers -> decision (and the HTML report if asked)."""
    prepared = prepare(current, reference, config)
    snapshot = run_report(prepared, config)
    numbers = summary_from_snapshot(snapshot.dict())
    numbers["rows"] = {"current": int(len(current)), "reference": int(len(reference))}
    numbers["psi_noise_floor"] = psi_noise_floor(len(current), len(reference))
    for side, frame in (("current", prepared.current), ("reference", prepared.reference)):
        labelled = n_labelled(frame, prepared.classes)
        if numbers["ece"].get(side) is not None or labelled:
            numbers["ece"][side] = (numbers["ece"].get(side) or {}) | {"n_labelled": labelled}
    decision = decide(numbers, config.thresholds)
    if html_path is not None:
        write_html(snapshot, html_path, decision, prepared.key_features, config)
    return numbers, decision, prepared


def write_html(snapshot: Any, path: Path, decision: DriftDecision, key_features: Sequence[str],
               config: DriftConfig) -> Path:
    """The Evidently report with a banner on top: the decision, its reasons and the thresholds."""
    thresholds = config.thresholds
    items = "".join(f"<li>{html.escape(reason)}</li>" for reason in decision.reasons + decision.notes)
    banner = (
        '<div style="font-family:sans-serif;padding:12px 20px;border-bottom:1px solid #ccc">'
        f"<h2>cxr-screen drift: {html.escape(decision.decision)}</h2><ul>{items}</ul>"
        f"<p>retrain when PSI &gt; {thresholds.psi} on a key feature ({html.escape(', '.join(key_features))}), "
        f"a decided class's share moves by more than {thresholds.class_share}, or ECE ({thresholds.ece_binning}) "
        f"&gt; {thresholds.ece} on confirmed labels.</p></div>"
    )
    text = snapshot.get_html_str(as_iframe=False)
    text = text.replace("<body>", "<body>" + banner, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def psi_noise_floor(n_current: int, n_reference: int) -> float:
    """PSI expected from sampling alone between two samples of one distribution: (B - 1)(1/n + 1/m).

    B is the number of bins Evidently's PSI uses for a continuous column (Sturges on both samples).
    Reported next to the PSI values so a reader can tell a small window's noise from drift: for
    ~200 vs ~200 requests it is ~0.08, and single columns then reach 0.2 by chance.
    """
    if n_current < 1 or n_reference < 1:
        return float("nan")
    bins = math.ceil(math.log2(n_current + n_reference)) + 1
    return (bins - 1) * (1.0 / n_current + 1.0 / n_reference)


# --- the job ----------------------------------------------------------------------------------------


def _empty_html(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!doctype html><html><body><h1>cxr-screen drift</h1><p>{message}</p></body></html>\n")


def run_drift(current: str | Path, reference: str | Path, out_dir: str | Path, *, config: DriftConfig | None = None,
              window: WindowSpec = WindowSpec(), now: datetime | None = None, compare_previous: bool = False,
              feedback_db: str | Path | None = None, model_version: str | None = None) -> dict[str, Any]:
    """Compare a window of ``current`` with ``reference``; write report.html + summary.json; return the summary."""
    config = config or load_config()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = now or datetime.now(timezone.utc)

    ref = load_reference(reference)
    table = load_features(current)
    frame = table.frame
    notes: list[str] = []
    if model_version is not None and "model_version" in frame:
        frame = frame[frame["model_version"].astype(str) == model_version].reset_index(drop=True)
    versions = ({str(k): int(v) for k, v in frame["model_version"].value_counts().items()}
                if "model_version" in frame else {})
    if len(versions) > 1:
        notes.append(f"the window mixes model versions {sorted(versions)}; pass --model-version to compare one "
                     "version with its own reference")

    feedback_info: dict[str, Any] = {"db": None, "labels": 0}
    db_path = Path(feedback_db) if feedback_db else None
    if db_path is not None and db_path.exists() and "request_id" in frame:
        from monitoring.feedback import FeedbackStore, join_labels

        labels = FeedbackStore(db_path).labels()
        frame = join_labels(frame, labels)
        feedback_info = {"db": str(db_path), "labels": int(len(labels))}
    elif db_path is not None and not db_path.exists():
        notes.append(f"feedback store {db_path} does not exist: no confirmed labels")

    selected = select_window(frame, window, now=now)
    summary: dict[str, Any] = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "now": now.isoformat(timespec="seconds"),
        "thresholds": config.thresholds.model_dump(),
        "current": table.describe() | {"window": selected.describe(), "model_versions": versions,
                                       "feedback": feedback_info},
        "reference": ref.info,
    }
    html_path = out_dir / REPORT_HTML
    if len(selected.frame) == 0:
        _empty_html(html_path, f"No requests in the window {selected.describe()}.")
        decision = DriftDecision("ok", notes=["no requests in the window: nothing to compare"])
        summary.update({"psi": {}, "class_share": {}, "ece": {"current": None, "reference": None}})
    else:
        numbers, decision, prepared = compare(selected.frame, ref.table.frame, config, html_path)
        summary.update(numbers)
        summary["key_features"] = prepared.key_features
        summary["current"]["window"]["labelled"] = n_labelled(prepared.current, prepared.classes)
    summary["report_html"] = REPORT_HTML

    if compare_previous:
        summary["previous_window"] = _compare_previous(frame, selected, window, now, config, out_dir)
    decision.notes = notes + decision.notes
    verdict = decision.as_dict()
    checks = verdict.pop("checks")
    summary = json_ready(verdict | summary | {"checks": checks}, digits=SUMMARY_DIGITS)
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _compare_previous(frame: pd.DataFrame, selected: Window, window: WindowSpec, now: datetime,
                      config: DriftConfig, out_dir: Path) -> dict[str, Any]:
    """This window against the one before it (today vs yesterday): reported, does not decide."""
    if window.kind == "all":
        return {"skipped": "no window given (use --window-last, --window-days or a range)"}
    previous = select_window(frame, window, now=now, offset=1)
    info: dict[str, Any] = {"window": previous.describe()}
    if len(previous.frame) == 0 or len(selected.frame) == 0:
        info["skipped"] = "one of the two windows is empty"
        return info
    numbers, decision, _ = compare(selected.frame, previous.frame, config, out_dir / PREVIOUS_HTML)
    info |= numbers | {"report_html": PREVIOUS_HTML, "would_retrain": decision.decision == "retrain",
                       "reasons": decision.reasons}
    return info


# --- CLI --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.drift",
        description="Drift of served requests against the model's reference profile (Evidently PSI per feature "
                    "and class probability, decided-class share shift, ECE on confirmed labels). Writes "
                    "report.html and summary.json. Exit status: 0 ok, 3 retrain, 4 retrain but the trigger "
                    "failed, 1 error.",
    )
    parser.add_argument("--current", required=True, help="audit-log file, folder of *.jsonl, or feature CSV")
    parser.add_argument("--reference", required=True,
                        help="bundle directory, reference_profile.csv, or MLflow URI (models:/cxr-screen@champion)")
    parser.add_argument("--out", "--output", dest="out", type=Path, required=True,
                        help="folder for report.html and summary.json")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="drift YAML config (configs/drift.yaml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--window-last", type=int, default=None, metavar="N", help="the last N requests")
    group.add_argument("--window-days", type=float, default=None, metavar="D", help="the last D days before --now")
    parser.add_argument("--window-start", default=None, help="range start (ISO 8601, UTC), with --window-end")
    parser.add_argument("--window-end", default=None, help="range end, exclusive")
    parser.add_argument("--now", default=None, help="end of --window-days (ISO 8601; default: the current time)")
    parser.add_argument("--compare-previous-window", action="store_true",
                        help="also compare the window with the one before it (today vs yesterday; reported only)")
    parser.add_argument("--feedback-db", type=Path, default=None,
                        help="SQLite feedback store (default: $CXR_FEEDBACK_DB, else the config's feedback_db)")
    parser.add_argument("--model-version", default=None, help="only requests served by this model version")
    parser.add_argument("--psi-threshold", type=float, default=None, help="override thresholds.psi")
    parser.add_argument("--class-share-threshold", type=float, default=None, help="override thresholds.class_share")
    parser.add_argument("--ece-threshold", type=float, default=None, help="override thresholds.ece")
    parser.add_argument("--trigger", choices=("none", "local", "kubernetes"),
                        default=os.environ.get(TRIGGER_ENV, "none"),
                        help=f"on retrain: run the sweep locally or create the RayJob (env {TRIGGER_ENV})")
    parser.add_argument("--dry-run-trigger", action="store_true",
                        help="kubernetes: build and validate the RayJob, ask the API server for a dry run only")
    args = parser.parse_args(argv)
    if (args.window_start is None) != (args.window_end is None):
        parser.error("--window-start and --window-end go together")
    if args.window_start is not None and (args.window_last is not None or args.window_days is not None):
        parser.error("choose one window: --window-last, --window-days or --window-start/--window-end")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config).with_thresholds(
            psi=args.psi_threshold, class_share=args.class_share_threshold, ece=args.ece_threshold)
        window = WindowSpec(last_n=args.window_last, last_days=args.window_days,
                            start=parse_time(args.window_start) if args.window_start else None,
                            end=parse_time(args.window_end) if args.window_end else None)
        feedback_db = args.feedback_db or config.feedback_db_path()
        summary = run_drift(args.current, args.reference, args.out, config=config, window=window,
                            now=parse_time(args.now) if args.now else None,
                            compare_previous=args.compare_previous_window, feedback_db=feedback_db,
                            model_version=args.model_version)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    code = summary["exit_code"]
    if summary["decision"] == "retrain" and args.trigger != "none":
        from monitoring.trigger import trigger_retrain

        result = trigger_retrain(summary, target=args.trigger, config=config.trigger,
                                 dry_run=args.dry_run_trigger, log_dir=args.out)
        summary["trigger"] = result
        (args.out / SUMMARY_JSON).write_text(json.dumps(json_ready(summary, digits=SUMMARY_DIGITS), indent=1) + "\n")
        if not result.get("ok"):
            code = EXIT_TRIGGER_FAILED
    print(json.dumps({k: summary[k] for k in ("decision", "exit_code", "reasons", "notes")}, indent=1))
    print(f"report: {args.out / REPORT_HTML}  summary: {args.out / SUMMARY_JSON}")
    return code


if __name__ == "__main__":
    sys.exit(main())
