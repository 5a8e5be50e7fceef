"""``make drift-demo``: the drift job's three scenarios on the default data with a real bundle.

    python -m monitoring.drift_demo --bundle BUNDLE_DIR [--data-dir ../shared/data/cxr3] [--out reports/drift]

Reference: the bundle's features on the **validation** split (computed here with
``cxr_core.reference``; the bundle's own profile also holds the test split, which is "current" below).
Current: audit logs built by replaying images through the bundle offline (``monitoring.replay``,
the serving feature code), in a shuffled order spread over one day:

- (a) ``a_same_source``: the held-out test images, half of them with a radiologist's confirmed
  label in a feedback store -> expected ``ok``;
- (b) ``b_darkened`` / ``b_black_border`` / ``b_low_contrast``: the same images after an
  acquisition shift (``monitoring.shifts``) -> PSI above threshold on the affected features, ``retrain``;
- (c) ``c_overconfident_feedback``: (a)'s requests whose logged probabilities were made
  over-confident (temperature / ``--sharpness``), same confirmed labels -> ECE above threshold, ``retrain``.

Writes ``<out>/summary.json`` (all scenarios, the numbers and whether each matched its
expectation) and ``<out>/<scenario>/report.html`` + ``summary.json``; the logs, the reference CSV
and the feedback store go to ``--work-dir``. Exit 0 when every scenario decided as expected, 1 if not.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cxr_core.bundle import load_bundle
from cxr_core.reference import dataset_items, reference_rows, write_rows_csv
from monitoring.config import DEFAULT_CONFIG, DriftConfig, load_config
from monitoring.decision import decide
from monitoring.drift import SUMMARY_JSON, run_drift
from monitoring.feedback import FeedbackStore
from monitoring.replay import model_version_of, replay_images, write_audit_log
from monitoring.shifts import AFFECTED_FEATURES, SHIFTS, overconfident

log = logging.getLogger(__name__)

DEMO_START = datetime(2026, 1, 15, tzinfo=timezone.utc)  # fixed, so the committed summary is reproducible
REVIEWER = "drift-demo (dataset label)"


def _default_data_dir() -> Path:
    from training.data import default_data_dir

    return default_data_dir()


def _scenario_summary(summary: dict[str, Any], expected: str, out: Path, name: str) -> dict[str, Any]:
    key = summary.get("key_features", [])
    return {
        "expected": expected,
        "decision": summary["decision"],
        "as_expected": summary["decision"] == expected,
        "reasons": summary["reasons"],
        "rows": summary["current"]["window"]["rows"],
        "labelled": summary["current"]["window"].get("labelled", 0),
        "psi_key_features": {c: summary["psi"].get(c) for c in key},
        "max_key_psi": max((summary["psi"].get(c) or 0.0 for c in key), default=None),
        "class_share_shift": {c: v.get("shift") for c, v in summary["class_share"].items()},
        "ece": summary["ece"].get("current"),
        "report": f"{name}/report.html",
        "summary": f"{name}/{SUMMARY_JSON}",
    }


def run_demo(bundle_dir: Path, data_dir: Path, out: Path, work: Path, *, config: DriftConfig,
             max_per_class: int | None = None, sharpness: float = 10.0, labelled_fraction: float = 0.5,
             seed: int = 0) -> dict[str, Any]:
    predictor = load_bundle(bundle_dir)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    log.info("reference: validation split through %s", bundle_dir)
    reference_csv = write_rows_csv(reference_rows(predictor, dataset_items(data_dir, ["val"], max_per_class)),
                                   work / "reference_val.csv")
    test = dataset_items(data_dir, ["test"], max_per_class)
    random.Random(seed).shuffle(test)  # served traffic is not sorted by class
    interval = timedelta(seconds=86400 / max(len(test), 1))
    labels = {f"req-{k:05d}": label for k, (_, _, label) in enumerate(test)}
    step = max(1, round(1 / labelled_fraction)) if labelled_fraction > 0 else 0
    labelled_ids = [rid for k, rid in enumerate(labels) if step and k % step == 0]

    feedback_db = work / "feedback.db"
    feedback_db.unlink(missing_ok=True)
    store = FeedbackStore(feedback_db)
    for request_id in labelled_ids:
        store.add(request_id, labels[request_id], classes=predictor.classes, reviewer=REVIEWER)

    def replay(name: str, transform=None) -> list[dict[str, Any]]:
        items = [(f"req-{k:05d}", transform(data) if transform else data) for k, (_, data, _) in enumerate(test)]
        return replay_images(predictor, items, start=DEMO_START, interval=interval)

    def drift(name: str, records: list[dict[str, Any]], expected: str, with_feedback: bool) -> dict[str, Any]:
        log_path = write_audit_log(records, work / name / "audit.jsonl")
        summary = run_drift(log_path, reference_csv, out / name, config=config,
                            feedback_db=feedback_db if with_feedback else None)
        result = _scenario_summary(summary, expected, out, name)
        log.info("%s: %s (expected %s) %s", name, result["decision"], expected, "; ".join(result["reasons"]))
        return result

    scenarios: dict[str, Any] = {}
    same = replay("a_same_source")
    scenarios["a_same_source"] = drift("a_same_source", same, "ok", with_feedback=True)

    threshold = config.thresholds.psi
    for shift_name, shift in SHIFTS.items():
        name = f"b_{shift_name}"
        result = drift(name, replay(name, shift), "retrain", with_feedback=False)
        summary = json.loads((out / name / SUMMARY_JSON).read_text())
        affected = {c: summary["psi"].get(c) for c in AFFECTED_FEATURES[shift_name]}
        result["affected_features"] = affected
        result["affected_above_threshold"] = all(v is not None and v > threshold for v in affected.values())
        result["as_expected"] = result["as_expected"] and result["affected_above_threshold"]
        scenarios[name] = result

    name = "c_overconfident_feedback"
    sharpened = [overconfident(r, sharpness) if "error" not in r else r for r in same]
    result = drift(name, sharpened, "retrain", with_feedback=True)
    summary = json.loads((out / name / SUMMARY_JSON).read_text())
    ece_only = decide({"ece": summary["ece"]}, config.thresholds)
    labelled = [r for r in sharpened if r["request_id"] in set(labelled_ids) and "error" not in r]
    result.update({
        "sharpness": sharpness,
        "ece_alone_decides": ece_only.decision,
        "feedback_accuracy": round(sum(r["decision"] == labels[r["request_id"]] for r in labelled)
                                   / max(len(labelled), 1), 4),
        "feedback_argmax_accuracy": round(sum(
            max((c for c in r if c.startswith("p_")), key=lambda c: r[c])[2:] == labels[r["request_id"]]
            for r in labelled) / max(len(labelled), 1), 4),
        "feedback_mean_confidence": round(sum(r["confidence"] for r in labelled) / max(len(labelled), 1), 4),
    })
    ece_value = (summary["ece"].get("current") or {}).get("equal_width")
    result["as_expected"] = result["as_expected"] and ece_value is not None and ece_value > config.thresholds.ece
    scenarios[name] = result

    manifest = predictor.manifest
    document = {
        "what": "python -m monitoring.drift_demo: reference = validation split, current = replayed test images",
        "bundle": {"path": str(bundle_dir), "model": manifest.model.name, "classes": manifest.classes,
                   "version": model_version_of(predictor), "temperature": manifest.temperature},
        "data_dir": str(data_dir),
        "reference": {"split": "val", "rows": sum(1 for _ in open(reference_csv)) - 1},
        "current": {"split": "test", "rows": len(test), "labelled_requests": len(labelled_ids),
                    "window": {"start": DEMO_START.isoformat(), "days": 1}},
        "thresholds": config.thresholds.model_dump(),
        "scenarios": scenarios,
        "all_as_expected": all(s["as_expected"] for s in scenarios.values()),
    }
    (out / SUMMARY_JSON).write_text(json.dumps(document, indent=1) + "\n")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.drift_demo",
        description="Reproduce the drift scenarios (same source -> ok; darkened / black border / low contrast -> "
                    "retrain on PSI; over-confident labelled feedback -> retrain on ECE) with a real bundle on "
                    "the default data. Writes <out>/summary.json and a report per scenario.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (e.g. the champion's)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ../shared/data/cxr3")
    parser.add_argument("--out", type=Path, default=Path("reports/drift"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/drift-demo"),
                        help="replayed audit logs, the reference CSV and the feedback store")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--max-per-class", type=int, default=None, help="first N images per class and split")
    parser.add_argument("--sharpness", type=float, default=10.0,
                        help="(c): probabilities p ** sharpness, renormalised (= temperature / sharpness)")
    parser.add_argument("--labelled-fraction", type=float, default=0.5, help="share of requests given a label")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    document = run_demo(args.bundle, args.data_dir or _default_data_dir(), args.out, args.work_dir,
                        config=load_config(args.config), max_per_class=args.max_per_class,
                        sharpness=args.sharpness, labelled_fraction=args.labelled_fraction, seed=args.seed)
    for name, scenario in document["scenarios"].items():
        psi = scenario.get("affected_features") or {"max key PSI": scenario["max_key_psi"]}
        ece = (scenario.get("ece") or {}).get("equal_width")
        print(f"{name:26s} {scenario['decision']:8s} (expected {scenario['expected']}) "
              f"PSI {json.dumps({k: round(v, 3) for k, v in psi.items() if v is not None})}"
              + (f" ECE {ece:.3f}" if ece is not None else ""))
    print(f"summary: {args.out / SUMMARY_JSON}")
    return 0 if document["all_as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
