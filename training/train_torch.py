"""Training loops for the neural families: from scratch, fine-tune, and linear probe.

Scratch and fine-tune share one loop: class-weighted cross-entropy with label smoothing,
optional weighted sampler, AdamW, cosine schedule with warmup, gradient clipping, early stopping
on validation macro-F1, best and last checkpoints. Fine-tuning unfreezes backbone stages
top-down (progressive unfreezing) with a lower backbone learning rate. The linear probe caches
backbone features once per backbone + preprocessing config, so training the head takes seconds.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from cxr_core.models import create_model
from cxr_core.preprocess import pixels_to_tensor
from training.cache import CACHE_ROOT
from training.config import TrainConfig
from training.datasets import PixelDataset, SplitArrays

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
FEATURE_CACHE = CACHE_ROOT / "features"


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 (absent classes get weight 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    kwargs = dict(config.model_kwargs)
    if config.model != "cnn3":
        kwargs.update(pretrained=config.pretrained, weights_path=config.weights_path)
    model = create_model(config.model, num_classes, **kwargs)
    if config.mode == "finetune":
        # A new head on pretrained features starts near zero. timm's EfficientNet init scales the
        # classifier by 1/sqrt(num_classes): with 3 classes its first logits are +-10 and the first
        # epoch is spent unlearning them.
        classifier = model.get_classifier()
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
    return model


@torch.inference_mode()
def predict_logits(model: nn.Module, pixels: np.ndarray, config: TrainConfig, batch_size: int = 64) -> np.ndarray:
    model.eval()
    outputs = []
    for start in range(0, len(pixels), batch_size):
        outputs.append(model(pixels_to_tensor(pixels[start : start + batch_size], config.preprocess)).float())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)


def macro_f1(labels: np.ndarray, logits: np.ndarray, num_classes: int) -> float:
    return float(f1_score(labels, logits.argmax(1), average="macro", labels=list(range(num_classes)), zero_division=0))


def _backbone_stages(model: nn.Module) -> list[nn.Module]:
    """Backbone parts in input-to-output order, for top-down progressive unfreezing."""
    classifier = model.get_classifier()
    stages: list[nn.Module] = []
    for name, child in model.named_children():
        if child is classifier:
            continue
        if name in ("blocks", "layers", "features") and isinstance(child, nn.Sequential):
            stages.extend(child.children())
        else:
            stages.append(child)
    return [stage for stage in stages if any(True for _ in stage.parameters())]


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad = trainable


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train_network(config: TrainConfig, train: SplitArrays, val: SplitArrays, num_classes: int, out_dir: Path,
                  on_epoch: EpochCallback | None = None) -> tuple[nn.Module, dict]:
    """Scratch / fine-tune loop. Returns the best model (by val macro-F1) and a history."""
    torch.manual_seed(config.seed)
    model = build_model(config, num_classes)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stages = _backbone_stages(model) if config.mode == "finetune" else []
    head = model.get_classifier()
    if config.mode == "finetune":
        _set_trainable(model, False)
        _set_trainable(head, True)
    head_ids = {id(p) for p in head.parameters()}
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
    backbone_lr = config.optim.lr * (config.optim.backbone_lr_multiplier if config.mode == "finetune" else 1.0)
    optimizer = torch.optim.AdamW(
        [{"params": list(head.parameters()), "lr": config.optim.lr},
         {"params": backbone_params, "lr": backbone_lr}],
        weight_decay=config.optim.weight_decay,
    )
    dataset = PixelDataset(train, config.preprocess, config.augment, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if config.weighted_sampler or config.source_balanced_sampler:
        keys = [r.source for r in train.records] if config.source_balanced_sampler else train.labels.tolist()
        if config.source_balanced_sampler:
            keys = [f"{s}|{label}" for s, label in zip(keys, train.labels.tolist())]
        counts = {k: keys.count(k) for k in set(keys)}
        weights = torch.tensor([1.0 / counts[k] for k in keys], dtype=torch.double)
        loader = DataLoader(dataset, batch_size=config.batch_size, generator=generator,
                            sampler=WeightedRandomSampler(weights, config.samples_per_epoch or len(weights),
                                                          generator=generator))
    elif config.samples_per_epoch:
        loader = DataLoader(dataset, batch_size=config.batch_size, generator=generator, sampler=RandomSampler(
            dataset, replacement=True, num_samples=config.samples_per_epoch, generator=generator))
    else:
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    weight = class_weights(train.labels, num_classes) if config.class_weighted_loss else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    steps_per_epoch = max(len(loader), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(steps_per_epoch * config.epochs, int(config.optim.warmup_epochs * steps_per_epoch))
    )
    checkpoints = out_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    best_f1, best_state, best_epoch, stale = -1.0, copy.deepcopy(model.state_dict()), -1, 0
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        if stages and config.head_warmup_epochs is not None:
            if epoch == config.head_warmup_epochs:
                _set_trainable(model, True)  # end to end after the head's warm-up
        elif stages:
            unfrozen = min(len(stages), epoch // config.unfreeze_every)
            for stage in stages[len(stages) - unfrozen :]:
                _set_trainable(stage, True)
        dataset.epoch = epoch
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(loader, desc=f"{config.family} epoch {epoch + 1}/{config.epochs}", file=sys.stderr, leave=False)
        for images, targets in bar:
            optimizer.zero_grad(set_to_none=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = criterion(model(images), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(targets)
            seen += len(targets)
            bar.set_postfix(loss=f"{running / seen:.3f}")
        val_logits = predict_logits(model, val.pixels, config)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val.labels)))
        metrics = {"train_loss": running / max(seen, 1), "val_loss": val_loss,
                   "val_macro_f1": macro_f1(val.labels, val_logits, num_classes),
                   "lr": optimizer.param_groups[0]["lr"]}
        history.append(metrics)
        log.info("%s epoch %d: %s", config.family, epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
        if on_epoch:
            on_epoch(epoch, metrics)
        torch.save(model.state_dict(), checkpoints / "last.pt")
        if metrics["val_macro_f1"] > best_f1:
            best_f1, best_epoch, stale = metrics["val_macro_f1"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            torch.save(best_state, checkpoints / "best.pt")
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stopping after epoch %d (best %d)", epoch + 1, best_epoch + 1)
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"history": history, "best_epoch": best_epoch + 1, "best_val_macro_f1": best_f1}


@torch.inference_mode()
def backbone_features(model: nn.Module, pixels: np.ndarray, config: TrainConfig, batch_size: int = 64,
                      desc: str = "features") -> np.ndarray:
    """Penultimate (pre-logits) features of any registered family."""
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, file=sys.stderr, leave=False):
        tensor = pixels_to_tensor(pixels[start : start + batch_size], config.preprocess)
        chunks.append(model.forward_head(model.forward_features(tensor), pre_logits=True).float())
    return torch.cat(chunks).numpy()


def cached_features(model: nn.Module, split: SplitArrays, config: TrainConfig) -> np.ndarray:
    """Backbone features of a split, cached per backbone + weights + preprocessing + images."""
    key = hashlib.sha256()
    key.update(f"{config.model}|{config.pretrained}|{config.weights_path}|{config.preprocess.fingerprint()}".encode())
    key.update(hashlib.sha256(split.pixels.tobytes()).digest())
    path = FEATURE_CACHE / f"{config.model}-{key.hexdigest()[:20]}.npy"
    if path.exists():
        return np.load(path)
    features = backbone_features(model, split.pixels, config, desc=f"{config.model} features ({split.name})")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, features)
    return features


def train_linear_probe(config: TrainConfig, train: SplitArrays, val: SplitArrays, num_classes: int,
                       on_epoch: EpochCallback | None = None) -> tuple[nn.Module, dict]:
    """Frozen backbone + a linear head fitted on cached features (full-batch AdamW).

    Source balancing and resolution augmentation are materialized on the training split
    (:mod:`training.materialize`), like the classical families.
    """
    from training.materialize import fixed_matrix_training_split, source_label_counts

    train = fixed_matrix_training_split(train, config)
    torch.manual_seed(config.seed)
    model = build_model(config, num_classes)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_x = torch.from_numpy(cached_features(model, train, config))
    val_x = torch.from_numpy(cached_features(model, val, config))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    head = nn.Linear(train_x.shape[1], num_classes)
    weight = class_weights(train.labels, num_classes) if config.class_weighted_loss else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    targets = torch.from_numpy(train.labels)
    best = (-1.0, copy.deepcopy(head.state_dict()), 0)
    history = []
    for step in range(config.probe_epochs):
        head.train()
        optimizer.zero_grad()
        loss = criterion(head((train_x - mean) / std), targets)
        loss.backward()
        optimizer.step()
        if step % 10 == 9 or step == config.probe_epochs - 1:
            with torch.no_grad():
                logits = head((val_x - mean) / std).numpy()
            f1 = macro_f1(val.labels, logits, num_classes)
            metrics = {"train_loss": float(loss), "val_macro_f1": f1}
            history.append(metrics)
            if on_epoch:
                on_epoch(step, metrics)
            if f1 > best[0]:
                best = (f1, copy.deepcopy(head.state_dict()), step + 1)
    head.load_state_dict(best[1])
    # Fold the feature standardisation into the classifier so the model is one plain network.
    classifier = model.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(head.weight / std)
        classifier.bias.copy_(head.bias - (head.weight * (mean / std)).sum(1))
    model.eval()
    return model, {"history": history, "best_step": best[2], "best_val_macro_f1": best[0],
                   "fitted_rows": source_label_counts(train)}
