"""Every model family behind one interface: builds, trains one step, predicts."""

import numpy as np
import pytest
import torch

from cxr_core.hog import HogConfig, hog_features
from cxr_core.models import TIMM_BACKBONES, create_model, efficientnet_lite0_imagenet_state_dict, list_models
from training.config import TrainConfig
from training.datasets import SplitArrays
from training.train_classical import train_classical


@pytest.mark.parametrize("name", ["cnn3", *TIMM_BACKBONES])
def test_each_family_trains_one_step_and_predicts(name):
    torch.manual_seed(0)
    size = 224 if name.startswith("swin") else 64
    model = create_model(name, num_classes=3)
    images, targets = torch.randn(2, 1, size, size), torch.tensor([0, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        logits = model(images)
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert features.ndim == 2 and features.shape[0] == 2


def test_registry_is_the_only_door():
    assert {"cnn3", "efficientnet_lite0", "resnet18"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model"):
        create_model("vgg99", 3)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        create_model("resnet18", 3, pretrained=True)


def test_efficientnet_lite0_weights_map_every_key():
    import timm

    mapped = efficientnet_lite0_imagenet_state_dict()
    reference = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).state_dict()
    assert set(mapped) == set(reference)
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    model = create_model("efficientnet_lite0", 3, pretrained=True)
    state = model.state_dict()
    # every backbone tensor came from the package (stem summed to one gray channel)
    assert torch.allclose(state["conv_stem.weight"], mapped["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(state["blocks.6.0.conv_pwl.weight"], mapped["blocks.6.0.conv_pwl.weight"])
    assert torch.equal(state["bn2.running_var"], mapped["bn2.running_var"])
    assert state["classifier.weight"].shape == (3, 1280)


def test_user_weights_file_loads(tmp_path):
    source = create_model("resnet18", 3)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    loaded = create_model("resnet18", 3, weights_path=str(path))
    assert torch.equal(loaded.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])


@pytest.mark.parametrize("name", ["hog_logreg", "hog_mlp", "hog_rf"])
def test_classical_families_fit_and_predict(data_dir, name):
    from training.cache import load_pixel_array
    from cxr_core.preprocess import PreprocessConfig

    config = TrainConfig(model=name, mode="classical", preprocess=PreprocessConfig(image_size=96),
                         classical={"n_estimators": 20, "hidden": 16})
    paths, labels = [], []
    for index, label in enumerate(["normal", "pneumonia", "tuberculosis"]):
        chosen = sorted((data_dir / "val" / label).glob("*.jpg"))[:8]
        paths += chosen
        labels += [index] * len(chosen)
    pixels = load_pixel_array(paths, config.preprocess, workers=1)
    split = SplitArrays("train", pixels, np.asarray(labels), [])
    classifier, info = train_classical(config, split, split, 3)
    probs = classifier.predict_proba(hog_features(pixels, HogConfig()))
    assert probs.shape == (24, 3) and np.allclose(probs.sum(1), 1)
    assert info["best_val_macro_f1"] > 0.5  # fits its own training data
