"""Site re-calibration: refit temperature and policy thresholds on a hospital's labelled set.

    python -m training.recalibrate --bundle DIR --data-dir SITE --out NEW_BUNDLE
        [--fit-split val] [--eval-split test] [--keep-temperature]

No retraining: the weights are copied as they are; only the operating point moves to where the
site's images put it. With a site folder that has splits, thresholds are fitted on
``--fit-split`` and the new bundle is evaluated on ``--eval-split`` (an honest go-live check);
with class folders only, both use all images and the report says so.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
from pathlib import Path

from cxr_core.bundle import MANIFEST_NAME, load_bundle
from cxr_core.operating_point import fit_operating_point
from training.data import discover_dataset
from training.evaluate_bundle import evaluate_folder, predict_folder
from training.provenance import utc_now

log = logging.getLogger("training.recalibrate")


def recalibrate(bundle: Path, site_dir: Path, out: Path, fit_split: str | None = None,
                eval_split: str | None = None, keep_temperature: bool = False) -> dict:
    predictor = load_bundle(bundle)
    splits = discover_dataset(site_dir).splits
    fit_split = fit_split or ("val" if "val" in splits else splits[0])
    eval_split = eval_split or ("test" if "test" in splits else fit_split)
    fit = predict_folder(predictor, site_dir, fit_split)
    manifest = predictor.manifest
    point = fit_operating_point(fit.logits, fit.labels, manifest.classes, manifest.policy.config,
                                temperature=manifest.temperature if keep_temperature else None)
    temperature, policy = point.temperature, point.policy
    site_hash = hashlib.sha256("\n".join(sorted(fit.relpaths)).encode()).hexdigest()
    new_manifest = manifest.model_copy(update={
        "temperature": temperature,
        "policy": policy,
        "provenance": type(manifest.provenance).model_validate({
            **manifest.provenance.model_dump(),
            "recalibrated_from": str(bundle),
            "recalibrated_at": utc_now(),
            "site_data_dir": str(site_dir),
            "site_fit_split": fit_split,
            "site_images_sha256": site_hash,
            "previous_temperature": manifest.temperature,
            "previous_thresholds": manifest.policy.thresholds,
        }),
    })
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    (out / MANIFEST_NAME).write_text(new_manifest.model_dump_json(indent=1) + "\n")
    recalibrated = load_bundle(out)
    evaluation = predict_folder(recalibrated, site_dir, eval_split)
    metrics = evaluate_folder(recalibrated, evaluation, site_dir, out.parent / f"{out.name}-site-evaluation")
    log.info("recalibrated on %s/%s (%d images): T %.3f -> %.3f, thresholds %s -> %s", site_dir, fit_split,
             len(fit.labels), manifest.temperature, temperature, manifest.policy.thresholds, policy.thresholds)
    return {"fit_split": fit_split, "eval_split": eval_split, "temperature": temperature,
            "thresholds": policy.thresholds, "warnings": policy.warnings, "evaluation": metrics,
            "same_images": fit_split == eval_split}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.recalibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="the site's labelled images")
    parser.add_argument("--out", type=Path, required=True, help="new bundle directory")
    parser.add_argument("--fit-split")
    parser.add_argument("--eval-split")
    parser.add_argument("--keep-temperature", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = recalibrate(args.bundle, args.data_dir, args.out, args.fit_split, args.eval_split, args.keep_temperature)
    print(f"recalibrate: new bundle {args.out}; T={result['temperature']:.3f}; thresholds {result['thresholds']}")
    if result["same_images"]:
        print("recalibrate: fitted and evaluated on the same images (no split): the report is optimistic")
    for name in result["evaluation"]["disease_classes"]:
        policy = result["evaluation"]["per_class"]["policy"][name]
        print(f"recalibrate: {result['eval_split']} {name} sensitivity {policy['sensitivity']}, "
              f"specificity {policy['specificity']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
