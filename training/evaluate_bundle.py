"""``make evaluate``: the full evaluation of a bundle on any labelled folder.

    python -m training.evaluate_bundle (--bundle DIR | --model-uri models:/cxr-screen@champion)
        --data-dir FOLDER [--split test] [--out reports/evaluate/NAME]

The folder may have splits (``{split}/{class}/*``; ``--split`` picks one) or only class folders
(``{class}/*``), so a hospital can test a model on its own images before go-live: per-class
metrics, policy vs argmax, calibration, per-source and same-population views, worklists and
figures, with the bundle's own temperature and thresholds. Files that cannot be read are listed
in ``failures.csv``, never skipped silently.

The bundle's gradability gate is applied as the endpoint applies it (``Predictor.gate_verdicts``):
images it refuses get no diagnosis there, so the metrics are computed on the gradable images and
the refusals are reported beside them (``gate`` in metrics.json: rate, per source, per code;
``refused.csv``). ``--no-gate`` measures the model on every image instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr_core.bundle import Predictor, load_bundle
from cxr_core.errors import InputError
from cxr_core.preprocess import prepare_image
from training.data import discover_dataset
from training.evaluate import METRICS_FILE, evaluate_predictions

log = logging.getLogger("training.evaluate_bundle")


@dataclass
class FolderPredictions:
    """Logits and the bundle's decisions for every readable image of a labelled folder, aligned with its metadata."""

    classes: list[str]
    logits: np.ndarray
    decisions: np.ndarray  # the policy decisions of the bundle that produced these logits
    labels: np.ndarray
    sources: list[str]
    relpaths: list[str]
    failures: list[dict[str, str]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)  # gradable images only above; these were not


def gate_summary(refused: list[dict[str, str]], sources: list[str], n_total: int) -> dict:
    """Refusals of the gate: overall, per source (of that source's readable images), per code."""
    from collections import Counter

    per_source_total = Counter(sources) + Counter(row["source"] for row in refused)
    per_source_refused = Counter(row["source"] for row in refused)
    return {"n": n_total, "refused": len(refused), "refusal_rate": round(len(refused) / max(n_total, 1), 4),
            "per_source": {source: {"n": per_source_total[source], "refused": per_source_refused[source],
                                    "refusal_rate": round(per_source_refused[source] / per_source_total[source], 4)}
                           for source in sorted(per_source_total)},
            "codes": dict(Counter(row["code"] for row in refused))}


def predict_folder(predictor: Predictor, data_dir: Path, split: str | None = None, batch_size: int = 32,
                   apply_gate: bool = True) -> FolderPredictions:
    """Run ``predictor`` over a labelled folder; folder classes must be among the model's.

    With ``apply_gate`` (and a bundle that has a gate) the images it refuses leave the predictions
    and are listed in ``refused`` with the gate's code, as the endpoint would refuse them.
    """
    dataset = discover_dataset(data_dir)
    unknown = [c for c in dataset.classes if c not in predictor.classes]
    if unknown:
        raise ValueError(f"{data_dir} has classes the model does not know: {unknown} (model: {predictor.classes})")
    if split is None:
        split = "test" if "test" in dataset.splits else dataset.splits[0]
    records = dataset.split(split)
    if not records:
        raise ValueError(f"no images in split {split!r} of {data_dir} (splits: {dataset.splits})")
    kept, prepared, failures = [], [], []
    for record in tqdm(records, desc=f"evaluate: preprocessing {split}", unit="img", file=sys.stderr):
        try:
            prepared.append(prepare_image(record.path.read_bytes(), predictor.manifest.preprocess))
            kept.append(record)
        except InputError as error:
            failures.append({"relpath": record.relpath, "error": error.code, "message": str(error)})
    if not kept:
        raise ValueError(f"none of the {len(records)} images of {data_dir} could be read")
    stacked = np.stack([image.pixels for image in prepared])
    refused = []
    if apply_gate and predictor.gate is not None:
        verdicts = []
        for start in range(0, len(stacked), batch_size):
            chunk = prepared[start:start + batch_size]
            verdicts += predictor.gate_verdicts(stacked[start:start + batch_size], [image.flags for image in chunk],
                                                [image.colourfulness for image in chunk])
        gradable = np.asarray([verdict is None or verdict.gradable for verdict in verdicts])
        refused = [{"relpath": record.relpath, "source": record.source, "label": record.label, "code": verdict.code}
                   for record, verdict in zip(kept, verdicts) if verdict is not None and not verdict.gradable]
        if not gradable.any():
            raise ValueError(f"the gate refused all {len(kept)} readable images of {data_dir}")
        kept = [record for record, keep in zip(kept, gradable) if keep]
        stacked = stacked[gradable]
    batches = [predictor.score(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size)]
    return FolderPredictions(
        classes=predictor.classes,
        logits=np.concatenate([batch.logits for batch in batches]),
        decisions=np.concatenate([batch.decisions for batch in batches]),
        labels=np.asarray([predictor.classes.index(r.label) for r in kept]),
        sources=[r.source for r in kept],
        relpaths=[r.relpath for r in kept],
        failures=failures,
        refused=refused,
    )


def evaluate_folder(predictor: Predictor, predictions: FolderPredictions, data_dir: Path, out: Path,
                    n_bootstrap: int = 1000) -> dict:
    """Evaluate with the bundle's temperature and thresholds; writes the report into ``out``."""
    manifest = predictor.manifest
    floors = {k: v for k, v in manifest.policy.config.floors.items() if k in predictions.classes}
    metrics = evaluate_predictions(
        classes=predictions.classes, y_true=predictions.labels, logits=predictions.logits,
        temperature=manifest.temperature, policy_decisions=predictions.decisions,
        thresholds=manifest.policy.thresholds, floors=floors, sources=predictions.sources,
        relpaths=predictions.relpaths, out_dir=out, image_root=data_dir, n_bootstrap=n_bootstrap,
        gray_zone_margin=manifest.policy.config.gray_zone,
    )
    with open(out / "failures.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["relpath", "error", "message"])
        writer.writeheader()
        writer.writerows(predictions.failures)
    with open(out / "refused.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["relpath", "source", "label", "code"])
        writer.writeheader()
        writer.writerows(predictions.refused)
    metrics["gate"] = gate_summary(predictions.refused, predictions.sources, len(predictions.sources) + len(predictions.refused))
    metrics_path = out / METRICS_FILE
    if metrics_path.exists():  # the report's own file carries the refusals beside the metrics
        stored = json.loads(metrics_path.read_text())
        stored["gate"] = metrics["gate"]
        metrics_path.write_text(json.dumps(stored, indent=2) + "\n")
    return metrics


def resolve_bundle(bundle: Path | None, model_uri: str | None, staging: Path) -> Path:
    if bundle is not None:
        return bundle
    if model_uri is None:
        raise SystemExit("give --bundle DIR or --model-uri models:/cxr-screen@champion")
    from training.registry import fetch_bundle

    return fetch_bundle(model_uri, staging)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--model-uri")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--split", default=None, help="split folder to evaluate (default: test, or the only one)")
    parser.add_argument("--out", type=Path, default=Path("reports/evaluate/latest"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--no-gate", action="store_true",
                        help="score every readable image, including those the bundle's gate refuses")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    predictor = load_bundle(resolve_bundle(args.bundle, args.model_uri, args.out / "bundle"))
    predictions = predict_folder(predictor, args.data_dir, args.split, apply_gate=not args.no_gate)
    metrics = evaluate_folder(predictor, predictions, args.data_dir, args.out, args.bootstrap)
    print(f"evaluate: {metrics['n']} gradable images, macro AUC {metrics['macro_auc']}, "
          f"{len(predictions.failures)} unreadable, {len(predictions.refused)} refused by the gate "
          f"({metrics['gate']['codes'] or 'none'})")
    for name in metrics["disease_classes"]:
        policy = metrics["per_class"]["policy"][name]
        print(f"evaluate: {name} policy sensitivity {policy['sensitivity']}, specificity {policy['specificity']}")
    print(f"evaluate: report {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
