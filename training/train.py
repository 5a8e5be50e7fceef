"""``make train``: train one model family, calibrate, fit the policy, evaluate, bundle, log.

    python -m training.train --config configs/train/cnn3.yaml [--data-dir DIR] [--out runs] [key=value ...]

Steps: load the splits through the preprocessed cache -> train (scratch / fine-tune / probe /
classical) -> validation logits -> temperature (validation NLL) -> policy thresholds (validation,
floors per class) -> full evaluation on test -> bundle (weights + everything serving needs) ->
MLflow run with params, per-epoch metrics, final metrics, figures, worklists and the bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_core.bundle import BundleManifest, ModelSpec, Provenance, load_bundle, model_logits, save_bundle
from cxr_core.calibration import softmax
from cxr_core.models import model_kind
from cxr_core.operating_point import fit_operating_point
from cxr_core.policy import FittedPolicy
from cxr_core.config import parse_overrides
from training.config import TrainConfig
from training.data import dataset_fingerprint, default_data_dir
from training.datasets import SplitArrays, TrainingData, load_training_data
from training.evaluate import evaluate_predictions
from training.provenance import git_commit, package_versions, utc_now

log = logging.getLogger("training.train")


@dataclass
class TrainResult:
    """What a training run produced; the sweep and train-all read this."""

    config: TrainConfig
    bundle_dir: Path
    out_dir: Path
    classes: list[str]
    temperature: float
    policy: FittedPolicy
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    train_seconds: float
    mlflow_run_id: str | None
    val_logits: np.ndarray
    val_labels: np.ndarray
    model: Any = None


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def fit_model(config: TrainConfig, train: SplitArrays, val: SplitArrays, num_classes: int, out_dir: Path,
              on_epoch=None) -> tuple[Any, dict]:
    """Dispatch on the training mode; returns a torch module or a fitted scikit-learn pipeline."""
    if config.mode == "classical":
        from training.train_classical import train_classical

        return train_classical(config, train, val, num_classes)
    from training.train_torch import train_linear_probe, train_network

    if config.mode == "probe":
        return train_linear_probe(config, train, val, num_classes, on_epoch)
    return train_network(config, train, val, num_classes, out_dir, on_epoch)


def model_spec(config: TrainConfig) -> ModelSpec:
    """How the bundle rebuilds the model; the registry says the family's kind."""
    kind = model_kind(config.model)
    if kind == "sklearn_hog":
        return ModelSpec(kind=kind, name=config.model, training_mode=config.mode, hog=config.classical.hog)
    return ModelSpec(kind=kind, name=config.model, kwargs=dict(config.model_kwargs), training_mode=config.mode)


def run_training(config: TrainConfig, data: Path | TrainingData, out_root: Path, track: bool = True,
                 parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None,
                 on_epoch=None) -> TrainResult:
    """The whole pipeline for one config. ``track=False`` skips MLflow (offline experiments).

    ``data`` is a data folder (loaded with the config's exclusions, preprocessing and subset) or
    the :class:`TrainingData` a caller prepared, e.g. without a held-out source.
    """
    seed_everything(config.seed, config.num_threads)
    if not isinstance(data, TrainingData):
        data = load_training_data(Path(data), config.exclusions, config.preprocess, config.subset, config.seed)
    data_dir, dataset, splits = data.data_dir, data.dataset, data.splits
    classes = dataset.classes
    for name, split in splits.items():
        if len(split.labels) == 0:
            raise ValueError(f"split {name!r} is empty in {data_dir}")
    out_dir = out_root / f"{config.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)

    run_context = None
    if track:
        import mlflow

        from training.tracking import log_metrics, log_params, mlflow_run

        tags = {"family": config.family, "model": config.model, "mode": config.mode,
                "git_commit": git_commit(), "data_manifest_sha256": dataset_fingerprint(dataset)}
        tags.update(extra_tags or {})
        run_context = mlflow_run(config.experiment, config.run_name, tags, nested=parent_run_id is not None,
                                 parent_run_id=parent_run_id)
        run = run_context.__enter__()
        log_params(config.model_dump(mode="json") | {"data_dir": str(data_dir),
                   "n_train": len(splits["train"].labels), "n_val": len(splits["val"].labels),
                   "n_test": len(splits["test"].labels)})

        def epoch_callback(epoch: int, metrics: dict[str, float]) -> None:
            log_metrics(metrics, step=epoch)
            if on_epoch:
                on_epoch(epoch, metrics)
    else:
        run = None
        epoch_callback = on_epoch
    try:
        started = time.perf_counter()
        model, training_info = fit_model(config, splits["train"], splits["val"], len(classes), out_dir, epoch_callback)
        train_seconds = time.perf_counter() - started

        spec = model_spec(config)
        logits = {name: model_logits(model, splits[name].pixels, config.preprocess, spec.hog) for name in ("val", "test")}
        val, test = splits["val"], splits["test"]
        point = fit_operating_point(logits["val"], val.labels, classes, config.policy)
        temperature, policy = point.temperature, point.policy
        evaluations = {}
        for name, split in (("val", val), ("test", test)):
            probs = softmax(logits[name], temperature)
            evaluations[name] = evaluate_predictions(
                classes=classes, y_true=split.labels, logits=logits[name], temperature=temperature,
                policy_decisions=policy.decide_indices(probs), thresholds=policy.thresholds,
                floors={k: v for k, v in policy.config.floors.items() if k in classes},
                sources=split.sources, relpaths=split.relpaths, out_dir=out_dir / "evaluation" / name,
                image_root=data_dir, n_bootstrap=config.n_bootstrap if name == "test" else 0,
                seed=config.seed, gray_zone_margin=config.policy.gray_zone,
                figures=config.figures,
            )
        summary_metrics = {
            "val_macro_f1": training_info.get("best_val_macro_f1"),
            "val_macro_f1_argmax": evaluations["val"]["macro"]["argmax"]["f1"] if "macro" in evaluations["val"] else None,
            "test_macro_auc": evaluations["test"].get("macro_auc"),
            "temperature": temperature,
            "train_seconds": round(train_seconds, 1),
        }
        manifest = BundleManifest(
            model=spec,
            classes=classes,
            preprocess=config.preprocess,
            temperature=temperature,
            policy=policy,
            metrics={"summary": summary_metrics, "test": _headline(evaluations["test"]),
                     "policy_fit": {k: v.model_dump() for k, v in policy.fits.items()}},
            provenance=Provenance(
                data_dir=str(data_dir), data_manifest_sha256=dataset_fingerprint(dataset), git_commit=git_commit(),
                mlflow_run_id=run.info.run_id if run else None, created_at=utc_now(), packages=package_versions(),
                train_config=config.model_dump(mode="json"), seed=config.seed,
                excluded_files=len(dataset.excluded), training_info={k: v for k, v in training_info.items() if k != "history"},
            ),
        )
        bundle_dir = save_bundle(out_dir / "bundle", manifest, model)
        fit_bundle_gate(bundle_dir, splits)
        (out_dir / "summary.json").write_text(json.dumps(
            {"family": config.family, **summary_metrics, "thresholds": policy.thresholds,
             "policy_warnings": policy.warnings}, indent=1, default=float) + "\n")
        if run is not None:
            from training.tracking import log_metrics, numeric_metrics

            log_metrics(numeric_metrics({"val": evaluations["val"], "test": evaluations["test"]}))
            log_metrics({f"best_{k}" if k == "val_macro_f1" else k: float(v)
                         for k, v in summary_metrics.items() if isinstance(v, (int, float))})
            mlflow.log_artifacts(str(out_dir / "evaluation"), artifact_path="evaluation")
            mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
            mlflow.log_artifact(str(out_dir / "summary.json"))
            mlflow.set_tags({f"threshold.{k}": f"{v:.4f}" for k, v in policy.thresholds.items()})
        log.info("bundle written to %s", bundle_dir)
        return TrainResult(
            config=config, bundle_dir=bundle_dir, out_dir=out_dir, classes=classes, temperature=temperature,
            policy=policy, val_metrics=evaluations["val"], test_metrics=evaluations["test"],
            train_seconds=train_seconds, mlflow_run_id=run.info.run_id if run else None,
            val_logits=logits["val"], val_labels=val.labels, model=model,
        )
    finally:
        if run_context is not None:
            run_context.__exit__(*sys.exc_info())


def fit_bundle_gate(bundle_dir: Path, splits: dict) -> None:
    """The gradability gate (cxr_core.gate), fitted on this run's train/val images, into the bundle."""
    from cxr_core.gate import attach_gate, fit_gate, lung_failures, train_corners

    predictor = load_bundle(bundle_dir, gate=False)
    preprocess = predictor.manifest.preprocess
    gate = fit_gate(predictor, splits["train"].pixels, splits["val"].pixels,
                    extra_splits={"test": (splits["test"].pixels, lung_failures(splits["test"].records, preprocess))},
                    val_lung_failed=lung_failures(splits["val"].records, preprocess),
                    crop_negatives=train_corners(splits["train"].records, preprocess))
    attach_gate(bundle_dir, gate)
    log.info("gate: refusal rates %s", gate.config.refusal_rates)


def _headline(evaluation: dict) -> dict:
    """The few test numbers that travel in the bundle and the registry tags."""
    keys = ("macro_auc", "n", "calibration", "policy_vs_argmax", "floor_holds_bootstrap")
    headline = {k: evaluation[k] for k in keys if k in evaluation}
    per_class = evaluation["per_class"]
    headline["policy"] = {c: {m: values.get(m) for m in ("sensitivity", "specificity")}
                          for c, values in per_class["policy"].items()}
    headline["auc"] = {c: values.get("auc") for c, values in per_class["argmax"].items()}
    return headline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/train/cnn3.yaml"))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (offline experiments)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. epochs=3 subset.train=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = TrainConfig.from_yaml(args.config, parse_overrides(args.overrides))
    result = run_training(config, args.data_dir, args.out, track=not args.no_mlflow)
    predictor = load_bundle(result.bundle_dir)
    print(f"train: {config.family} val macro-F1 {result.val_metrics['macro']['argmax']['f1']:.3f}, "
          f"test macro AUC {result.test_metrics.get('macro_auc', float('nan')):.3f}, T={result.temperature:.2f}")
    print(f"train: thresholds {json.dumps({k: round(v, 4) for k, v in result.policy.thresholds.items()})}")
    print(f"train: bundle {result.bundle_dir} ({predictor.manifest.model.name}); report "
          f"{result.out_dir / 'evaluation' / 'test' / 'report.md'}; MLflow run {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
