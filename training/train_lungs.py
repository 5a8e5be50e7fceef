"""``make train-lungs``: train the lung segmenter of :mod:`cxr_core.lungs` from hand-drawn masks.

    python -m training.train_lungs [--data-dir ../shared/data/lung-masks] [--epochs 30]
        [--weights models/lungs/segmenter.pt] [--report-dir reports/lungs] [--seed 20240611]

Seeded train/val/test split of the mask set (70/15/15), augmentations that imitate what the
classifier's sources differ by (framing, zoom, rotation, squashing, exposure, blur, resolution),
BCE + Dice loss, best epoch by validation Dice. Reports held-out (test) Dice per image as the
chain uses the mask (post-processed at the segmenter's resolution, compared at the mask's own
resolution), the worst cases, and whether the plausibility rules accept every hand-drawn mask.
Writes the weights plus a provenance JSON beside them, and ``<report-dir>/segmenter.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from cxr_core.reporting import markdown_table
from cxr_core.lungs import DEFAULT_WEIGHTS, LungRules, LungSegmenter, LungUNet, fields_from_probability, standardize
from training.provenance import git_commit, utc_now

DEFAULT_MASK_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lung-masks"
SEED = 20240611


@dataclass
class MaskSet:
    """Images and masks of one split: originals (for Dice) and copies at the segmenter's size."""

    ids: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    small_images: np.ndarray
    small_masks: np.ndarray


def read_pairs(data_dir: Path) -> list[tuple[str, Path, Path]]:
    """(id, image, mask) for every manifest row whose two files exist."""
    with open(data_dir / "manifest.csv", newline="") as handle:
        ids = sorted(row["id"] for row in csv.DictReader(handle))
    pairs = [(i, data_dir / "images" / f"{i}.jpg", data_dir / "masks" / f"{i}.png") for i in ids]
    return [p for p in pairs if p[1].exists() and p[2].exists()]


def split_pairs(pairs: list, seed: int, fractions: tuple[float, float] = (0.7, 0.15)) -> dict[str, list]:
    """Seeded 70/15/15 split (a permutation of the sorted ids, so the same seed gives the same split)."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_train, n_val = int(round(fractions[0] * len(pairs))), int(round(fractions[1] * len(pairs)))
    chosen = [pairs[i] for i in order]
    return {"train": chosen[:n_train], "val": chosen[n_train:n_train + n_val], "test": chosen[n_train + n_val:]}


def load_set(pairs: list, size: int) -> MaskSet:
    images = [cv2.imread(str(image), cv2.IMREAD_GRAYSCALE) for _, image, _ in pairs]
    masks = [cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 127 for _, _, mask in pairs]
    small_images = np.stack([cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA) for i in images])
    small_masks = np.stack([cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5
                            for m in masks])
    return MaskSet([p[0] for p in pairs], images, masks, small_images, small_masks)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random view of a (uint8 image, bool mask) pair at the segmenter's size.

    Geometry: flip, rotation <= 10 degrees, zoom 0.7-1.15 (children fill less of the frame),
    anisotropic squashing (Kermany images were squashed to squares), shifts, a black or grey
    surround. Intensity: gamma, contrast, brightness, CLAHE, blur, down-and-up resampling, noise.
    """
    size = image.shape[0]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.7, 1.15)
    squash = rng.uniform(0.88, 1.12)
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[0, :2] *= squash
    matrix[:, 2] += rng.uniform(-0.08, 0.08, size=2) * size + np.array([(1 - squash) * size / 2, 0])
    surround = float(rng.choice([0, rng.integers(0, 120)]))
    image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=surround)
    mask = cv2.warpAffine(np.ascontiguousarray(mask, dtype=np.float32), matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0.5
    unit = image.astype(np.float32) / 255.0
    unit = unit ** rng.uniform(0.6, 1.6)
    unit = (unit - unit.mean()) * rng.uniform(0.7, 1.3) + unit.mean() + rng.uniform(-0.1, 0.1)
    image = np.clip(unit * 255.0, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        image = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.3:
        small = max(16, int(size * rng.uniform(0.3, 0.7)))
        image = cv2.resize(cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                           interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.3:
        image = np.clip(image + rng.normal(0, rng.uniform(2, 8), image.shape), 0, 255).astype(np.uint8)
    return image, mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits)
    intersection = (probability * target).sum(dim=(1, 2, 3))
    total = probability.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1 - (2 * intersection + 1) / (total + 1)).mean()


def evaluate(segmenter: LungSegmenter, data: MaskSet) -> list[dict[str, Any]]:
    """Per image: Dice of the chain's mask at the mask's own resolution, failure verdict, areas."""
    rows = []
    for image_id, image, mask in zip(data.ids, data.images, data.masks):
        fields = segmenter.segment(image)
        predicted = fields.mask_at(*mask.shape)
        rows.append({"id": image_id, "dice": round(dice(predicted, mask), 4), "failure": fields.failure,
                     "lung_areas": list(fields.lung_areas)})
    return rows


def ground_truth_failures(data: MaskSet, rules: LungRules) -> list[dict[str, Any]]:
    """Hand-drawn masks the plausibility rules would refuse (should be none)."""
    refused = []
    for image_id, small in zip(data.ids, data.small_masks):
        fields = fields_from_probability(small.astype(np.float32), small.shape, rules)
        if fields.failure:
            refused.append({"id": image_id, "failure": fields.failure, "lung_areas": list(fields.lung_areas)})
    return refused


def train_segmenter(data_dir: Path, epochs: int, seed: int = SEED, size: int = 96, batch_size: int = 16,
                    lr: float = 3e-3, channels: tuple[int, ...] = (8, 16, 32, 64), threads: int = 2,
                    limit: int | None = None, log=print) -> tuple[LungSegmenter, dict[str, Any]]:
    """Train and evaluate; returns the best-validation segmenter (sha256 unset) and the report."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    pairs = read_pairs(data_dir)
    if limit:
        pairs = pairs[:limit]
    splits = split_pairs(pairs, seed)
    sets = {name: load_set(items, size) for name, items in splits.items()}
    model = LungUNet(channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(len(sets["train"].ids) / batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.15)
    bce = nn.BCEWithLogitsLoss()
    best = {"dice": -1.0, "epoch": 0, "state": None}
    history = []
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(sets["train"].ids))
        losses = []
        for start in range(0, len(order), batch_size):
            batch = [augment(sets["train"].small_images[i], sets["train"].small_masks[i], rng)
                     for i in order[start:start + batch_size]]
            x = torch.from_numpy(np.stack([standardize(image, size) for image, _ in batch]))[:, None]
            y = torch.from_numpy(np.stack([m for _, m in batch]).astype(np.float32))[:, None]
            logits = model(x)
            loss = bce(logits, y) + soft_dice_loss(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        segmenter = LungSegmenter(model, size, sha256="")
        val_rows = evaluate(segmenter, sets["val"])
        val_dice = float(np.mean([r["dice"] for r in val_rows])) if val_rows else 0.0
        model.train()
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "val_dice": round(val_dice, 4),
                        "seconds": round(elapsed, 1)})
        log(f"train-lungs: epoch {epoch}/{epochs} loss {np.mean(losses):.4f} val Dice {val_dice:.4f} "
            f"({elapsed:.0f} s)")
        if val_dice > best["dice"]:
            best = {"dice": val_dice, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    train_seconds = time.perf_counter() - started
    model.load_state_dict(best["state"])
    segmenter = LungSegmenter(model.eval(), size, sha256="")
    test_rows = evaluate(segmenter, sets["test"])
    test_dice = [r["dice"] for r in test_rows]
    timing = _time_inference(segmenter, sets["test"].images[:20])
    rules = segmenter.rules
    report = {
        "created_at": utc_now(), "git_commit": git_commit(), "data_dir": str(data_dir),
        "n_pairs": len(pairs), "split_seed": seed, "split": {k: len(v) for k, v in splits.items()},
        "split_ids": {k: [p[0] for p in v] for k, v in splits.items()},
        "input_size": size, "channels": list(channels),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "epochs": epochs, "best_epoch": best["epoch"], "batch_size": batch_size, "lr": lr, "threads": threads,
        "train_seconds": round(train_seconds, 1),
        "val_dice_mean": round(best["dice"], 4),
        "test": {
            "dice_mean": round(float(np.mean(test_dice)), 4) if test_dice else None,
            "dice_median": round(float(np.median(test_dice)), 4) if test_dice else None,
            "dice_min": round(float(np.min(test_dice)), 4) if test_dice else None,
            "failures": {reason: sum(r["failure"] == reason for r in test_rows) for reason in
                         ("empty_mask", "one_lung", "implausible_area", "outside_chest")},
            "worst": sorted(test_rows, key=lambda r: r["dice"])[:5],
            "per_image": test_rows,
        },
        "ground_truth_failures": ground_truth_failures(sets["train"], rules) + ground_truth_failures(sets["val"], rules)
        + ground_truth_failures(sets["test"], rules),
        "rules": rules.model_dump(mode="json"),
        "inference_ms_per_image": timing,
        "history": history,
    }
    return segmenter, report


def _time_inference(segmenter: LungSegmenter, images: list[np.ndarray]) -> float | None:
    """Median milliseconds of :meth:`LungSegmenter.segment` on single images (threads as set)."""
    if not images:
        return None
    segmenter.segment(images[0])
    times = []
    for image in images:
        started = time.perf_counter()
        segmenter.segment(image)
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.median(times)), 2)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    test = report["test"]
    lines = [
        "# Lung segmenter (`make train-lungs`)",
        "",
        f"Generated by `python -m training.train_lungs` at {report['created_at']} (commit {report['git_commit'][:10]}).",
        "",
        f"- data: `{report['data_dir']}` ({report['n_pairs']} image/mask pairs: adult normals, one annotator)",
        f"- seeded split (seed {report['split_seed']}): train {report['split']['train']}, "
        f"val {report['split']['val']}, test {report['split']['test']}",
        f"- model: U-Net, channels {report['channels']}, {report['parameters']:,} parameters, "
        f"input {report['input_size']} px; {report['inference_ms_per_image']} ms per image (median, CPU)",
        f"- training: {report['epochs']} epochs (best validation Dice at epoch {report['best_epoch']}), "
        f"{report['train_seconds']:.0f} s wall on {report['threads']} threads",
        "",
        "## Held-out (test) Dice",
        "",
        "The mask as the preprocessing chain uses it (two largest regions, holes filled, at the segmenter's "
        "resolution) compared with the hand-drawn mask at its own resolution.",
        "",
        *markdown_table(["mean", "median", "min", "validation mean"],
                        [[test["dice_mean"], test["dice_median"], test["dice_min"], report["val_dice_mean"]]]),
        "",
        "Failure verdicts on the test images: " + ", ".join(f"{k} {v}" for k, v in test["failures"].items()) + ".",
        f"Hand-drawn masks (all splits) the plausibility rules refuse: {len(report['ground_truth_failures'])}.",
        "",
        "### Worst test images",
        "",
    ]
    lines += markdown_table(["id", "Dice", "verdict"], [[r["id"], r["dice"], r["failure"] or "ok"] for r in test["worst"]])
    lines += ["", "### Per test image", ""]
    lines += markdown_table(["id", "Dice"], [[r["id"], r["dice"]] for r in test["per_image"]])
    lines += ["", "Caveat: every mask is an adult normal from one teaching website; see `cxr3-check.md` for how "
              "the masks hold on the classifier's sources and classes.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train_lungs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MASK_DIR)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs (smoke tests)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--report-dir", type=Path, default=Path("reports/lungs"))
    args = parser.parse_args(argv)
    segmenter, report = train_segmenter(args.data_dir, args.epochs, args.seed, args.size, threads=args.threads,
                                        limit=args.limit)
    provenance = {key: report[key] for key in ("created_at", "git_commit", "data_dir", "n_pairs", "split_seed",
                                               "split", "input_size", "channels", "parameters", "epochs",
                                               "best_epoch", "train_seconds", "val_dice_mean")}
    provenance["test_dice_mean"] = report["test"]["dice_mean"]
    provenance["data_manifest_sha256"] = _sha(args.data_dir / "manifest.csv")
    sha = segmenter.save(args.weights, metadata={"data_manifest_sha256": provenance["data_manifest_sha256"],
                                                 "split_seed": args.seed, "epochs": args.epochs})
    provenance["weights_sha256"] = sha
    provenance["weights_bytes"] = args.weights.stat().st_size
    args.weights.with_suffix(".json").write_text(json.dumps(provenance, indent=1) + "\n")
    report["weights"] = {"path": str(args.weights), "sha256": sha, "bytes": provenance["weights_bytes"]}
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "segmenter.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.report_dir / "segmenter.md")
    print(f"train-lungs: test Dice mean {report['test']['dice_mean']} (min {report['test']['dice_min']}), "
          f"{report['train_seconds']:.0f} s; weights {args.weights} ({provenance['weights_bytes']} bytes, "
          f"sha256 {sha[:12]}); report {args.report_dir / 'segmenter.md'}")
    return 0


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
