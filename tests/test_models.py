"""Every model family behind one interface: builds, trains one step, predicts."""

import numpy as np
import pytest
import torch

from cxr_core.hog import HogConfig, hog_features
from cxr_core.models import (TIMM_BACKBONES, create_model, efficientnet_lite0_imagenet_state_dict, list_models,
                             model_kind, register_model)
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


def test_hog_families_join_the_registry_with_their_kind():
    from sklearn.pipeline import Pipeline

    assert list_models("sklearn_hog") == ["hog_logreg", "hog_mlp", "hog_rf"]
    assert set(list_models("torch")) == {"cnn3", *TIMM_BACKBONES}
    assert model_kind("hog_rf") == "sklearn_hog" and model_kind("cnn3") == "torch"
    forest = create_model("hog_rf", 3, n_estimators=12, seed=5, n_jobs=1)
    assert isinstance(forest, Pipeline) and forest[-1].n_estimators == 12 and forest[-1].random_state == 5
    assert create_model("hog_logreg", 3, c=0.25)[-1].C == 0.25
    assert create_model("hog_mlp", 3, hidden=16)[-1].hidden_layer_sizes == (16,)
    with pytest.raises(TypeError):  # a misspelt setting is refused, not ignored
        create_model("hog_logreg", 3, C=0.25)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("hog_logreg", kind="sklearn_hog")(lambda num_classes: None)
    with pytest.raises(ValueError, match="unknown model kind"):
        register_model("xgb", kind="xgboost")


def test_config_and_bundle_spec_ask_the_registry():
    from pydantic import ValidationError

    from cxr_core.bundle import ModelSpec

    with pytest.raises(ValidationError, match="classical model: set mode: classical"):
        TrainConfig(model="hog_mlp", mode="scratch")
    with pytest.raises(ValidationError, match=r"mode classical needs one of \['hog_logreg', 'hog_mlp', 'hog_rf'\]"):
        TrainConfig(model="cnn3", mode="classical")
    with pytest.raises(ValidationError, match="unknown model 'vgg99'"):
        TrainConfig(model="vgg99")
    with pytest.raises(ValidationError, match="'hog_rf' is a sklearn_hog family, not torch"):
        ModelSpec(kind="torch", name="hog_rf", training_mode="scratch")


def test_save_bundle_takes_one_model_and_refuses_the_wrong_kind(tmp_path):
    from cxr_core.bundle import BundleManifest, ModelSpec, load_bundle, save_bundle
    from cxr_core.policy import FittedPolicy, PolicyConfig
    from cxr_core.preprocess import PreprocessConfig

    classes = ["normal", "pneumonia", "tuberculosis"]
    policy = FittedPolicy(config=PolicyConfig(), classes=classes, thresholds={}, fits={})
    manifest = BundleManifest(model=ModelSpec(kind="torch", name="cnn3", kwargs={"channels": [4, 8, 8]},
                                              training_mode="scratch"),
                              classes=classes, preprocess=PreprocessConfig(image_size=32), policy=policy)
    model = create_model("cnn3", 3, channels=[4, 8, 8])
    with pytest.raises(ValueError, match="a torch bundle cannot hold a Pipeline"):
        save_bundle(tmp_path / "wrong", manifest, create_model("hog_logreg", 3))
    save_bundle(tmp_path / "cnn3", manifest, model)
    assert sorted(p.name for p in (tmp_path / "cnn3").iterdir()) == ["bundle.json", "weights.pt"]
    loaded = load_bundle(tmp_path / "cnn3")
    assert loaded.sklearn_model is None and not loaded.torch_model.training
    assert torch.equal(loaded.torch_model.state_dict()["classifier.weight"], model.state_dict()["classifier.weight"])


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
