"""``make shortcuts``: does the model encode the hospital and the age, and does it look outside the lungs?

    python -m training.robustness.shortcuts (--bundle [NAME=]DIR ... | --from-loso reports/robustness/loso.json)
        [--data-dir DIR]
        [--out reports/robustness] [--robustness configs/robustness.yaml]

Per bundle:

(a) **Linear probes** on the model's penultimate features (pre-logits for neural families, the HOG
    descriptor for classical ones), cross-validated logistic regression, against chance (the
    majority share): source dataset, age group (pediatric / adult, from the source — see
    :mod:`training.robustness.populations`), and — the telling ones, because source and label are
    confounded in cxr3 — the source *within* one label (normal: kaggle-cxr / kermany / tbdb;
    tuberculosis: kaggle-cxr / tbx11k / tbdb) and the age group within normal images.
(b) **Lung masking**: the central chest region of the prepared image (the region
    :mod:`cxr_core.explain` calls the chest) filled with the image mean; accuracy and AUC that
    survive come from outside the lungs — a shortcut. The converse (only the chest kept) is shown
    beside it.
(c) **Where the evidence lies**: Grad-CAM (``cxr_core.explain.cam_heatmap``) energy outside the
    central chest region for the decided class, over a per-class sample of the test split (neural
    families; a uniform map puts 0.28 there). HOG + linear models get the exact linear analogue:
    the share of |w_c . x| of the decided class c carried by HOG blocks centred outside the region.

Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (name: ``shortcuts``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from cxr_core.bundle import Predictor, load_bundle
from cxr_core.explain import ZoneConfig, cam_heatmap, central_chest_box, lung_zone_shares
from cxr_core.hog import hog_features
from cxr_core.preprocess import pixels_to_tensor
from cxr_core.reporting import markdown_table
from training.cache import load_pixel_array
from training.data import ImageRecord
from training.datasets import open_dataset, sample_per_class
from training.robustness.config import RobustnessConfig, ShortcutConfig
from training.robustness.measures import operating_point_metrics, value
from training.robustness.perturb import (add_audit_arguments, audit_document, bundle_name, bundle_specs,
                                         write_audit_report)
from training.robustness.populations import UNKNOWN_AGE, age_group

log = logging.getLogger("training.robustness.shortcuts")


# ----------------------------------------------------------------------------------------------
# (a) linear probes


def penultimate_features(predictor: Predictor, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pre-logits features (neural) or HOG descriptors (classical) of prepared pixels."""
    if predictor.torch_model is None:
        return hog_features(pixels, predictor.manifest.model.hog)
    model = predictor.torch_model.eval()
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(pixels), batch_size), desc="shortcuts: features", file=sys.stderr, leave=False):
            tensor = pixels_to_tensor(pixels[start:start + batch_size], predictor.manifest.preprocess)
            chunks.append(model.forward_head(model.forward_features(tensor), pre_logits=True).float())
    return torch.cat(chunks).numpy()


def probe_accuracy(features: np.ndarray, targets: list[str], folds: int = 5, c: float = 0.1, seed: int = 0) -> dict:
    """Cross-validated logistic-regression accuracy of predicting ``targets`` from ``features``.

    Chance is the majority share (what always answering the commonest value scores) and 1/k for
    balanced accuracy. Classes with fewer members than ``folds`` are dropped (and counted).
    """
    targets_array = np.asarray(targets, dtype=object)
    counts = Counter(targets)
    kept_classes = sorted(k for k, n in counts.items() if n >= folds)
    rows = np.isin(targets_array, kept_classes)
    result: dict[str, Any] = {"n": int(rows.sum()), "counts": dict(sorted(counts.items())),
                              "dropped_classes": sorted(set(counts) - set(kept_classes))}
    if len(kept_classes) < 2:
        return {**result, "accuracy": None, "chance": None, "balanced_accuracy": None, "balanced_chance": None}
    x, y = features[rows], targets_array[rows].astype(str)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    predicted = cross_val_predict(classifier, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    chance = max(Counter(y.tolist()).values()) / len(y)
    return {**result, "accuracy": round(float(np.mean(predicted == y)), 4), "chance": round(chance, 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(y, predicted)), 4),
            "balanced_chance": round(1.0 / len(kept_classes), 4)}


def source_and_age_probes(features: np.ndarray, records: list[ImageRecord], settings: ShortcutConfig,
                          seed: int) -> dict[str, dict]:
    sources = [r.source for r in records]
    ages = [age_group(r) for r in records]
    labels = [r.label for r in records]

    def probe(rows: np.ndarray, targets: list[str]) -> dict:
        return probe_accuracy(features[rows], [targets[i] for i in np.flatnonzero(rows)], settings.cv_folds,
                              settings.probe_c, seed)

    everyone = np.ones(len(records), dtype=bool)
    known_age = np.asarray([a != UNKNOWN_AGE for a in ages])
    probes = {"label (reference: what the model is for)": probe(everyone, labels),
              "source": probe(everyone, sources), "age_group": probe(known_age, ages)}
    for label in sorted(set(labels)):
        rows = np.asarray([lab == label for lab in labels])
        if len({sources[i] for i in np.flatnonzero(rows)}) > 1:
            probes[f"source within {label}"] = probe(rows, sources)
        if len({ages[i] for i in np.flatnonzero(rows & known_age)}) > 1:
            probes[f"age_group within {label}"] = probe(rows & known_age, ages)
    return probes


# ----------------------------------------------------------------------------------------------
# (b) lung masking


def chest_box(shape: tuple[int, int], zones: ZoneConfig = ZoneConfig()) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the central chest region of a prepared (already cropped) image."""
    height, width = shape
    return central_chest_box((0, height, 0, width), zones)


def mask_chest(pixels: np.ndarray, keep: str = "outside", zones: ZoneConfig = ZoneConfig()) -> np.ndarray:
    """Fill the central chest region (``keep="outside"``) or everything else (``keep="chest"``)
    of (N, H, W) prepared pixels with each image's mean."""
    top, bottom, left, right = chest_box(pixels.shape[1:], zones)
    out = pixels.copy()
    for image, original in zip(out, pixels):
        fill = np.uint8(round(float(original.mean())))
        if keep == "outside":
            image[top:bottom, left:right] = fill
        else:
            inner = original[top:bottom, left:right].copy()
            image[:] = fill
            image[top:bottom, left:right] = inner
    return out


def masking_audit(predictor: Predictor, pixels: np.ndarray, labels: np.ndarray, records: list[ImageRecord]) -> dict:
    classes = predictor.classes
    ages = [age_group(r) for r in records]
    chance = max(Counter(labels.tolist()).values()) / len(labels)
    result: dict[str, Any] = {"n": int(len(labels)), "chance_accuracy": round(chance, 4),
                              "chest_box_fraction": ZoneConfig().model_dump(include={"left", "right", "top", "bottom"})}
    for name, view in (("unmasked", pixels), ("chest_masked", mask_chest(pixels, "outside")),
                       ("only_chest", mask_chest(pixels, "chest"))):
        scores = predictor.score(view)
        probs, decisions = scores.probabilities, scores.decisions
        m = operating_point_metrics(classes, labels, probs, decisions, ages)
        result[name] = {
            "accuracy_argmax": m["accuracy_argmax"], "accuracy_policy": m["accuracy_policy"], "macro_auc": m["macro_auc"],
            "auc": {c: e["auc"] for c, e in m["classes"].items()} | {"normal": m["auc_reference"]},
            "sensitivity": {c: value(e["sensitivity"]) for c, e in m["classes"].items()},
            "same_population_auc": {c: {age: v["auc"] for age, v in (e.get("same_population") or {}).items()}
                                    for c, e in m["classes"].items()},
        }
    return result


# ----------------------------------------------------------------------------------------------
# (c) evidence outside the chest


def gradcam_outside_share(predictor: Predictor, pixels: np.ndarray, decisions: np.ndarray,
                          zones: ZoneConfig = ZoneConfig()) -> np.ndarray:
    """Per image: share of the Grad-CAM heat of the decided class outside the central chest region."""
    model = predictor.torch_model
    heatmaps = [cam_heatmap(model, pixels_to_tensor(image, predictor.manifest.preprocess)[None], int(decided))
                for image, decided in tqdm(list(zip(pixels, decisions)), desc="shortcuts: Grad-CAM", file=sys.stderr,
                                           leave=False)]
    return outside_shares(np.stack(heatmaps), zones)


def hog_block_boxes(size: int, pixels_per_cell: int, cells_per_block: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) pixel footprint of every HOG block, in skimage's feature order (row-major)."""
    blocks = size // pixels_per_cell - cells_per_block + 1
    span = cells_per_block * pixels_per_cell
    return [(r * pixels_per_cell, r * pixels_per_cell + span, c * pixels_per_cell, c * pixels_per_cell + span)
            for r in range(blocks) for c in range(blocks)]


def hog_linear_heatmaps(predictor: Predictor, pixels: np.ndarray, decisions: np.ndarray) -> np.ndarray | None:
    """Linear attribution maps for HOG + logistic regression, (N, H, W).

    The pipeline is StandardScaler -> LogisticRegression, so the decided class's score is a sum
    over HOG blocks of w_c . z_block (z: standardized features). Each block's |contribution| is
    spread evenly over its pixel footprint (blocks overlap); the map is then read like a Grad-CAM
    heatmap. None when the bundle is not that pipeline or the image is not square.
    """
    steps = dict(getattr(predictor.sklearn_model, "named_steps", {}))
    scaler, linear = steps.get("standardscaler"), steps.get("logisticregression")
    if scaler is None or linear is None or pixels.shape[1] != pixels.shape[2]:
        return None
    hog = predictor.manifest.model.hog
    boxes = hog_block_boxes(pixels.shape[1], hog.pixels_per_cell, hog.cells_per_block)
    per_block = hog.orientations * hog.cells_per_block**2
    z = scaler.transform(hog_features(pixels, hog))
    if z.shape[1] != len(boxes) * per_block:
        return None
    contributions = np.abs((linear.coef_[decisions] * z).reshape(len(z), len(boxes), per_block).sum(axis=2))
    maps = np.zeros(pixels.shape, dtype=np.float64)
    for k, (top, bottom, left, right) in enumerate(boxes):
        maps[:, top:bottom, left:right] += (contributions[:, k] / float((bottom - top) * (right - left)))[:, None, None]
    return maps


def outside_shares(heatmaps: np.ndarray, zones: ZoneConfig = ZoneConfig()) -> np.ndarray:
    """Share of each (H, W) map's mass outside the central chest region (NaN for an empty map)."""
    result = []
    for heat in heatmaps:
        share = lung_zone_shares(heat, (0, heat.shape[0], 0, heat.shape[1]), zones)
        result.append(np.nan if share.empty_heatmap else share.outside_chest)
    return np.asarray(result, dtype=np.float64)


def evidence_audit(predictor: Predictor, records: list[ImageRecord], pixels: np.ndarray) -> dict:
    classes = predictor.classes
    scores = predictor.score(pixels)
    probs, decisions = scores.probabilities, scores.decisions
    zones = ZoneConfig()
    top, bottom, left, right = chest_box(pixels.shape[1:], zones)
    uniform = 1 - (bottom - top) * (right - left) / float(pixels.shape[1] * pixels.shape[2])
    if predictor.torch_model is not None:
        method, shares = "gradcam (decided class)", gradcam_outside_share(predictor, pixels, decisions, zones)
    else:
        maps = hog_linear_heatmaps(predictor, pixels, decisions)
        if maps is None:
            return {"method": "unavailable for this classical model (not StandardScaler + LogisticRegression)"}
        method, shares = "linear attribution over HOG blocks (decided class)", outside_shares(maps, zones)
        hog = predictor.manifest.model.hog
        flat = np.zeros(pixels.shape[1:], dtype=np.float64)  # equal contribution from every block
        for b_top, b_bottom, b_left, b_right in hog_block_boxes(pixels.shape[1], hog.pixels_per_cell, hog.cells_per_block):
            flat[b_top:b_bottom, b_left:b_right] += 1.0 / ((b_bottom - b_top) * (b_right - b_left))
        uniform = float(outside_shares(flat[None], zones)[0])
    valid = ~np.isnan(shares)

    def stats(rows: np.ndarray) -> dict:
        rows = rows & valid
        if not rows.any():
            return {"n": 0}
        return {"n": int(rows.sum()), "mean_outside": round(float(shares[rows].mean()), 4),
                "median_outside": round(float(np.median(shares[rows])), 4),
                "share_warned": round(float(np.mean(shares[rows] >= zones.shortcut_share)), 4)}

    sources = np.asarray([r.source for r in records], dtype=object)
    labels = np.asarray([r.label for r in records], dtype=object)
    return {
        "method": method, "uniform_outside": round(uniform, 4), "warn_at": zones.shortcut_share,
        "all": stats(np.ones(len(records), dtype=bool)),
        "per_true_class": {c: stats(labels == c) for c in classes if (labels == c).any()},
        "per_decided_class": {c: stats(decisions == k) for k, c in enumerate(classes) if (decisions == k).any()},
        "per_source": {s: stats(sources == s) for s in sorted(set(sources.tolist()))},
    }


# ----------------------------------------------------------------------------------------------
# driver and report


def audit_bundle(predictor: Predictor, dataset, settings: ShortcutConfig, seed: int) -> dict[str, Any]:
    config = predictor.manifest.preprocess
    probe_records = [r for s in settings.probe_splits for r in dataset.split(s)]
    probe_pixels = load_pixel_array([r.path for r in probe_records], config)
    features = penultimate_features(predictor, probe_pixels)
    probes = source_and_age_probes(features, probe_records, settings, seed)
    log.info("shortcuts: probes done (%d images, %d features)", len(probe_records), features.shape[1])

    mask_records = dataset.split(settings.mask_split)
    mask_pixels = load_pixel_array([r.path for r in mask_records], config)
    labels = np.asarray([predictor.classes.index(r.label) for r in mask_records], dtype=np.int64)
    masking = masking_audit(predictor, mask_pixels, labels, mask_records)

    cam_records = dataset.split(settings.gradcam_split)
    if predictor.torch_model is not None:
        cam_records = sample_per_class(cam_records, settings.gradcam_per_class, seed)
    cam_pixels = load_pixel_array([r.path for r in cam_records], config)
    evidence = evidence_audit(predictor, cam_records, cam_pixels)
    return {"probe_images": len(probe_records), "feature_dim": int(features.shape[1]),
            "probe_splits": settings.probe_splits, "probes": probes, "masking": masking, "evidence": evidence}


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def write_markdown(document: dict[str, Any], path: Path) -> None:
    lines = ["# Shortcut audit", "",
             f"Generated by `python -m training.robustness.shortcuts` ({document['created_at']}, commit "
             f"`{document['git_commit'][:10]}`) on `{document['data_dir']}`. Do not edit by hand.", "",
             "(a) Linear probes (logistic regression, stratified CV) on the model's penultimate features; chance = "
             "majority share. Source and label are confounded in cxr3, so the rows *within* one label are the "
             "telling ones: a model that separates kermany from kaggle-cxr normals, or adult from pediatric "
             "normals, encodes the hospital/age. (b) The central chest region filled with the image mean: accuracy "
             "above chance and AUC above 0.5 with the lungs hidden come from outside the lungs. (c) Share of the "
             "decided class's evidence outside the central chest region.", ""]
    for name, result in document["bundles"].items():
        lines += [f"## {name}", "", f"Bundle `{result['bundle']}`; probes on {result['probe_images']} images "
                  f"({'+'.join(result['probe_splits'])}), {result['feature_dim']} features.", ""]
        lines += markdown_table(
            ["probe target", "n", "classes", "accuracy", "chance", "balanced accuracy", "balanced chance"],
            [[target, p["n"], ", ".join(f"{k} {v}" for k, v in p["counts"].items()), _f(p["accuracy"]),
              _f(p["chance"]), _f(p["balanced_accuracy"]), _f(p["balanced_chance"])]
             for target, p in result["probes"].items()])
        m = result["masking"]
        lines += ["", f"Masking ({m['n']} test images, chance accuracy {_f(m['chance_accuracy'])}):", ""]
        lines += markdown_table(
            ["view", "accuracy (argmax)", "accuracy (policy)", "macro AUC", "AUC normal", "AUC pneumonia", "AUC TB",
             "TB sens (policy)", "same-pop TB AUC (adult)"],
            [[view, _f(v["accuracy_argmax"]), _f(v["accuracy_policy"]), _f(v["macro_auc"]),
              _f(v["auc"].get("normal")), _f(v["auc"].get("pneumonia")), _f(v["auc"].get("tuberculosis")),
              _f(v["sensitivity"].get("tuberculosis")),
              _f(v["same_population_auc"].get("tuberculosis", {}).get("adult"))]
             for view, v in ((view, m[view]) for view in ("unmasked", "chest_masked", "only_chest"))])
        e = result["evidence"]
        lines += ["", f"Evidence outside the central chest region — {e['method']} (uniform map: "
                      f"{_f(e.get('uniform_outside'))}; warning at {_f(e.get('warn_at'))}):", ""]
        if "all" in e:
            rows = [("all", e["all"])] + [(f"true {k}", v) for k, v in e["per_true_class"].items()] \
                + [(f"decided {k}", v) for k, v in e["per_decided_class"].items()] \
                + [(f"source {k}", v) for k, v in e["per_source"].items()]
            lines += markdown_table(
                ["group", "n", "mean share outside", "median", "share of images warned"],
                [[group, s["n"], _f(s.get("mean_outside")), _f(s.get("median_outside")), _f(s.get("share_warned"))]
                 for group, s in rows])
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.robustness.shortcuts", description=__doc__.split("\n\n")[0])
    add_audit_arguments(parser, "shortcuts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    specs = bundle_specs(parser, args)
    torch.set_num_threads(2)
    settings = RobustnessConfig.from_yaml(args.robustness).shortcuts
    dataset = open_dataset(args.data_dir, args.exclusions)
    document = audit_document(args, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        name, directory = bundle_name(spec)
        result = audit_bundle(load_bundle(directory), dataset, settings, args.seed)
        result["bundle"] = str(directory)
        document["bundles"][name] = result
        p = result["probes"]
        print(f"shortcuts: {name}: source probe {_f(p['source']['accuracy'])} (chance {_f(p['source']['chance'])}), "
              f"age probe {_f(p['age_group']['accuracy'])} (chance {_f(p['age_group']['chance'])}); masked-chest "
              f"accuracy {_f(result['masking']['chest_masked']['accuracy_argmax'])} (chance "
              f"{_f(result['masking']['chance_accuracy'])}); outside-chest evidence "
              f"{_f(result['evidence'].get('all', {}).get('mean_outside'))}")
    write_audit_report(document, args, write_markdown, "shortcuts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
