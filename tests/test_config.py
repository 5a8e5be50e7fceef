"""The one YAML config loader (cxr_core.config) and the configs that use it."""

from __future__ import annotations

import pytest
from pydantic import ConfigDict, Field

from cxr_core.config import ConfigError, YamlConfig, deep_merge, parse_overrides
from monitoring.config import load_config
from serving.config import ServingConfig
from training.config import TrainConfig
from training.robustness.config import RobustnessConfig


class Inner(YamlConfig):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(3, ge=1)
    name: str = "a"


class Outer(YamlConfig):
    model_config = ConfigDict(extra="forbid")

    inner: Inner = Inner()
    rate: float = 0.5


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = deep_merge(base, {"a": {"c": [3]}, "e": {"f": 2}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 2}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # the base is not changed
    overrides = {"e": {"f": [2]}}
    unchanged = deep_merge(base, overrides)
    unchanged["a"]["c"].append(9)
    unchanged["e"]["f"].append(9)
    assert base["a"]["c"] == [1, 2] and overrides == {"e": {"f": [2]}}  # nor shared with the result


def test_parse_overrides_nests_keys_and_types_values_as_yaml():
    assert parse_overrides(["a.b=3", "a.c=x", "d=0.5", "e=[1, 2]", "f=true", "g=null"]) == {
        "a": {"b": 3, "c": "x"}, "d": 0.5, "e": [1, 2], "f": True, "g": None}
    with pytest.raises(ConfigError, match="'epochs' is not key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="a was already set"):
        parse_overrides(["a=1", "a.b=2"])


def test_from_yaml_applies_overrides_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  size: 5\n  name: file\nrate: 0.1\n")
    config = Outer.from_yaml(path, parse_overrides(["inner.size=7"]))
    assert (config.inner.size, config.inner.name, config.rate) == (7, "file", 0.1)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert Outer.from_yaml(empty) == Outer()


def test_a_bad_field_is_a_config_error_naming_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  size: 0\n  nmae: x\n")
    with pytest.raises(ConfigError) as caught:
        Outer.from_yaml(path)
    message = str(caught.value)
    assert str(path) in message and "invalid Outer" in message
    assert "inner.size: Input should be greater than or equal to 1" in message
    assert "inner.nmae: Extra inputs are not permitted" in message
    good = tmp_path / "good.yaml"
    good.write_text("rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"good.yaml \(with overrides\).*\n  rate: Input should be a valid number"):
        Outer.from_yaml(good, {"rate": "fast"})


def test_files_that_are_not_a_config_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        Outer.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: a config must be a mapping, got list"):
        Outer.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        Outer.from_yaml(tmp_path / "broken.yaml")


def test_the_folders_configs_load_through_it(tmp_path):
    config = TrainConfig.from_yaml("configs/train/hog_logreg.yaml", parse_overrides(["epochs=2"]))
    assert (config.model, config.epochs) == ("hog_logreg", 2)
    with pytest.raises(ConfigError, match=r"hog_logreg.yaml \(with overrides\).*\n  epochs:"):
        TrainConfig.from_yaml("configs/train/hog_logreg.yaml", {"epochs": "many"})
    assert ServingConfig.load(tmp_path / "absent.yaml") == ServingConfig()  # no file: the defaults
    assert RobustnessConfig.from_yaml(None) == RobustnessConfig()
    drift = tmp_path / "drift.yaml"
    drift.write_text("thresholds:\n  psy: 0.3\n")
    with pytest.raises(ConfigError, match=r"drift.yaml: invalid DriftConfig.*\n  thresholds.psy: Extra inputs"):
        load_config(drift)
