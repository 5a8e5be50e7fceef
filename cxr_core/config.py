"""One YAML -> pydantic config loader for every folder (training, serving, monitoring).

Each folder's config is a pydantic model validated once at the edge; they used to read their YAML
each in its own way (some said which file was wrong, some did not; one let ``a.b=3`` overrides in,
the others not). ``YamlConfig.from_yaml`` is the one way now: the file is parsed, must hold a
mapping, the overrides are merged in, and a problem is raised as ``ConfigError`` naming the file and
the dotted field, so a person running a command sees what to fix without reading a traceback.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound="YamlConfig")


class ConfigError(ValueError):
    """A config file (or override) that cannot be used; the message names the file and the field.

    A ``ValueError`` so that callers which caught pydantic's ``ValidationError`` (itself a
    ``ValueError``) or ``ValueError`` keep working.
    """


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _validation_message(source: str, model: type[BaseModel], error: ValidationError) -> str:
    lines = [f"{source}: invalid {model.__name__} ({error.error_count()} problem(s))"]
    for problem in error.errors():
        lines.append(f"  {_field_path(problem['loc'])}: {problem['msg']}")
    return "\n".join(lines)


def load_yaml_mapping(path: Path | str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is ``{}``); ``ConfigError`` for anything else."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as error:
        raise ConfigError(f"config file {path} not found") from error
    try:
        payload = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(payload).__name__}")
    return payload


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it; nested mappings merge, anything else is replaced.

    The result shares nothing with either input, so changing it never changes a caller's defaults.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``a.b=value`` command-line overrides (values parsed as YAML: ``3`` is an int) -> nested dict."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not key or not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} was already set to a value")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {error}") from error
    return result


class YamlConfig(BaseModel):
    """Base of the pydantic configs read from YAML: ``from_yaml`` and ``validate_or_explain``."""

    @classmethod
    def validate_or_explain(cls: type[C], payload: Mapping[str, Any], source: str = "config") -> C:
        """``model_validate`` whose failure is a ``ConfigError`` naming ``source`` and each field."""
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            raise ConfigError(_validation_message(source, cls, error)) from error

    @classmethod
    def from_yaml(cls: type[C], path: Path | str, overrides: Mapping[str, Any] | None = None) -> C:
        """The config in ``path`` with ``overrides`` (a nested dict, see ``parse_overrides``) merged in."""
        payload = deep_merge(load_yaml_mapping(path), overrides or {})
        source = f"{path} (with overrides)" if overrides else str(path)
        return cls.validate_or_explain(payload, source)
