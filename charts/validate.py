"""Render the cxr-screen Helm chart offline and check every object it would create.

No cluster is needed. The chart is rendered and linted with helm-python-sdk (Helm v4 as a shared
library); built-in kinds are validated with kubernetes-validate in strict mode for every Kubernetes
version in ``KUBERNETES_VERSIONS``; custom resources (KServe, KubeRay) are validated against the
CRD schemas in ``../shared/k8s-schemas`` (or ``$CXR_K8S_SCHEMAS``), tightened so that an unknown
field fails wherever a schema lists its properties and does not preserve unknown fields.

    python -m charts.validate                      # every values file under charts/cxr-screen/ci/
    python -m charts.validate --values my.yaml     # only these

``load_crd_validator`` and ``validate_object`` are the pieces monitoring/ reuses to check the
RayJob it builds before it creates it.

This module imports only yaml, json, jsonschema, helm-python-sdk and kubernetes-validate.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

from cxr_core.reporting import markdown_table

CHARTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = CHARTS_DIR.parent
CHART_DIR = CHARTS_DIR / "cxr-screen"
CI_VALUES_DIR = CHART_DIR / "ci"

KUBERNETES_VERSIONS: tuple[str, ...] = ("1.30", "1.31", "1.32", "1.33")
RELEASE_NAME = "cxr-screen"
NAMESPACE = "cxr-screen"

SCHEMAS_ENV = "CXR_K8S_SCHEMAS"
# (apiVersion, kind) -> CRD schema file in the schema folder (see its README.md).
CRD_SCHEMA_FILES: dict[tuple[str, str], str] = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json.gz",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-serving-v1alpha1.json.gz",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): (
        "clusterservingruntime-serving-v1alpha1.json.gz"
    ),
    ("ray.io/v1", "RayJob"): "rayjob-ray-v1.json.gz",
    ("ray.io/v1", "RayCluster"): "raycluster-ray-v1.json.gz",
}
# A ConfigMap with this label carries whole manifests in its data (the drift job's RayJob
# template); each of them is validated like a rendered object.
EMBEDDED_MANIFEST_LABEL = "cxr-screen/embedded-manifest"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Kinds whose names become DNS labels (Service host names, pod host names, Knative routes).
_DNS_LABEL_KINDS = {"Service", "StatefulSet", "InferenceService", "CronJob"}


class ChartValidationError(Exception):
    """Raised where the caller asked for an exception instead of a list of problems."""


# --- values and rendering --------------------------------------------------------------------


def load_values(source: Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    """Values as a dict: from a mapping (copied), a YAML file, or None (the chart's defaults)."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    with open(source, encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ChartValidationError(f"{source}: a values file must hold a mapping")
    return loaded


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def parse_manifests(text: str, source: str = "<manifest>") -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``text``; duplicate keys are an error."""
    try:
        documents = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except yaml.YAMLError as error:
        raise ChartValidationError(f"{source}: {error}") from error
    objects = []
    for document in documents:
        if document is None:
            continue
        if not isinstance(document, dict):
            raise ChartValidationError(f"{source}: a manifest must be a mapping, got {document!r}")
        objects.append(document)
    return objects


@dataclass
class RenderedChart:
    """What one render produced: the objects in template order, and NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str
    sources: list[str] = field(default_factory=list)  # template path of each object

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj.get("kind") == kind]

    def kinds(self) -> Counter[str]:
        return Counter(obj["kind"] for obj in self.objects)


def render_chart(
    values: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    chart_dir: str | os.PathLike[str] = CHART_DIR,
    release: str = RELEASE_NAME,
    namespace: str = NAMESPACE,
) -> RenderedChart:
    """Render the chart as ``helm install`` would (values.schema.json is enforced).

    Raises helm_python.HelmValuesError for values the schema rejects, HelmRenderError for a
    template that fails, ChartValidationError for output that is not valid YAML.
    """
    with helm_python.Chart.load(os.fspath(chart_dir)) as chart:
        manifests = chart.render(load_values(values), name=release, namespace=namespace)
    objects: list[dict[str, Any]] = []
    sources: list[str] = []
    notes = ""
    for path in sorted(manifests):
        text = manifests[path]
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        if not path.endswith((".yaml", ".yml")):
            continue
        for obj in parse_manifests(text, path):
            objects.append(obj)
            sources.append(path)
    return RenderedChart(objects=objects, notes=notes, sources=sources)


def lint_chart(
    values: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    chart_dir: str | os.PathLike[str] = CHART_DIR,
    kube_versions: Sequence[str] = KUBERNETES_VERSIONS,
    namespace: str = NAMESPACE,
) -> list[str]:
    """``helm lint --strict`` for each Kubernetes version: every warning or error, as text."""
    problems: list[str] = []
    loaded = load_values(values)
    for version in kube_versions:
        report = helm_python.lint(
            os.fspath(chart_dir),
            loaded,
            strict=True,
            namespace=namespace,
            kube_version=f"v{version}.0",
        )
        for message in report.get("messages", []):
            if message.get("severity", 0) >= 2:
                problems.append(
                    f"lint (k8s {version}) {message.get('path')}: {message.get('error', '').strip()}"
                )
        for error in report.get("errors", []):
            text = f"lint (k8s {version}): {str(error).strip()}"
            if not any(str(error).strip() in known for known in problems):
                problems.append(text)
    return problems


# --- built-in kinds: kubernetes-validate ---------------------------------------------------------


def supported_kubernetes_versions() -> list[str]:
    """Minor versions kubernetes-validate ships schemas for, e.g. ['1.25', ..., '1.37']."""
    minors = {
        kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()
    }
    return sorted(minors, key=lambda v: tuple(int(part) for part in v.split(".")))


def _check_versions(versions: Iterable[str]) -> None:
    supported = supported_kubernetes_versions()
    missing = [v for v in versions if v not in supported]
    if missing:
        raise ChartValidationError(
            f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for "
            f"Kubernetes {', '.join(missing)} (it has {supported[0]}..{supported[-1]})"
        )


def validate_builtin(
    obj: Mapping[str, Any], versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Strict kubernetes-validate for each version; a kind it does not know is a problem."""
    _check_versions(versions)
    problems: list[str] = []
    for version in versions:
        try:
            used = kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(
                f"{_describe(obj)}: k8s {error.version} strict: {_path(error.path)}: {error.message}"
            )
            continue
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{_describe(obj)}: {error.message}")
            break
        if used != version:
            problems.append(
                f"{_describe(obj)}: asked for Kubernetes {version}, validated against {used}"
            )
    return problems


# --- custom resources: CRD schemas -------------------------------------------------------------


def schemas_dir() -> Path:
    """The CRD schema folder: $CXR_K8S_SCHEMAS, else ../shared/k8s-schemas beside the repo."""
    configured = os.environ.get(SCHEMAS_ENV)
    folder = Path(configured) if configured else REPO_ROOT.parent / "shared" / "k8s-schemas"
    if not folder.is_dir():
        raise ChartValidationError(
            f"CRD schema folder {folder} not found (set {SCHEMAS_ENV} to the folder that holds "
            "inferenceservice-serving-v1beta1.json.gz and the others)"
        )
    return folder


def forbid_unknown_fields(schema: Any) -> Any:
    """A copy of a CRD openAPIV3Schema in which unknown fields fail.

    Wherever a node lists ``properties``, sets no ``additionalProperties`` and does not carry
    ``x-kubernetes-preserve-unknown-fields: true``, it gets ``additionalProperties: false``. A node
    marked ``nullable: true`` also accepts null, as the API server does.
    """
    if isinstance(schema, list):
        return [forbid_unknown_fields(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: forbid_unknown_fields(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        strict["additionalProperties"] = False
    if strict.get("nullable") is True and isinstance(strict.get("type"), str):
        strict["type"] = [strict["type"], "null"]
    return strict


def crd_kinds() -> dict[str, str]:
    """kind -> apiVersion of every custom resource this module validates."""
    return {kind: api_version for api_version, kind in CRD_SCHEMA_FILES}


@functools.lru_cache(maxsize=None)
def _crd_validator(api_version: str, kind: str, folder: str) -> jsonschema.protocols.Validator:
    path = Path(folder) / CRD_SCHEMA_FILES[(api_version, kind)]
    if not path.is_file():
        raise ChartValidationError(f"CRD schema {path} not found for {api_version} {kind}")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        schema = forbid_unknown_fields(json.load(handle))
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    return validator_class(schema)


def load_crd_validator(kind: str, api_version: str | None = None) -> jsonschema.protocols.Validator:
    """A jsonschema validator for a custom resource kind (InferenceService, RayJob, ...).

    The schema comes from the CRD schema folder with unknown fields forbidden (see
    ``forbid_unknown_fields``). Raises ChartValidationError for a kind with no schema.
    """
    matches = [
        key
        for key in CRD_SCHEMA_FILES
        if key[1] == kind and (api_version is None or key[0] == api_version)
    ]
    if not matches:
        known = ", ".join(f"{k} ({a})" for a, k in CRD_SCHEMA_FILES)
        raise ChartValidationError(f"no CRD schema for {api_version or ''} {kind}; known: {known}")
    (api, found_kind), = matches
    return _crd_validator(api, found_kind, os.fspath(schemas_dir()))


def validate_custom_resource(obj: Mapping[str, Any]) -> list[str]:
    """Problems of one custom resource against its (tightened) CRD schema, plus its metadata."""
    validator = load_crd_validator(obj["kind"], obj["apiVersion"])
    problems = [
        f"{_describe(obj)}: CRD schema: {_path(error.absolute_path)}: {error.message}"
        for error in sorted(validator.iter_errors(dict(obj)), key=lambda e: list(e.absolute_path))
    ]
    # The CRD schemas leave metadata open; check it as the API server's ObjectMeta.
    metadata_carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata")}
    problems += [
        problem.replace("ConfigMap", obj["kind"], 1)
        for problem in validate_builtin(metadata_carrier, KUBERNETES_VERSIONS[-1:])
    ]
    return problems


# --- any object ---------------------------------------------------------------------------------


def _path(path: Iterable[Any]) -> str:
    return ".".join(str(part) for part in path) or "<root>"


def _describe(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    name = metadata.get("name") or metadata.get("generateName") or "<unnamed>"
    return f"{obj.get('kind', '<no kind>')}/{name}"


def _check_names_and_labels(obj: Mapping[str, Any]) -> list[str]:
    problems = []
    metadata = obj.get("metadata") or {}
    name = metadata.get("name") or metadata.get("generateName", "").rstrip("-")
    if not name:
        problems.append(f"{_describe(obj)}: metadata.name (or generateName) is missing")
    elif not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
        problems.append(f"{_describe(obj)}: name {name!r} is not a DNS-1123 subdomain")
    elif obj.get("kind") in _DNS_LABEL_KINDS and (not _DNS_LABEL.match(name) or len(name) > 63):
        problems.append(f"{_describe(obj)}: name {name!r} is not a DNS-1123 label (<= 63)")
    for key, value in (metadata.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"{_describe(obj)}: label {key}={value!r} is not a valid label value")
    return problems


def _embedded_manifests(obj: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if obj.get("kind") != "ConfigMap" or labels.get(EMBEDDED_MANIFEST_LABEL) != "true":
        return []
    found = []
    for key, text in (obj.get("data") or {}).items():
        for embedded in parse_manifests(text, f"{_describe(obj)} data[{key}]"):
            found.append((key, embedded))
    return found


def validate_object(
    obj: Mapping[str, Any], versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Every problem of one object: names and labels, then its schema (CRD or built-in).

    An object of a kind with no schema at all is a problem, never skipped. Manifests embedded
    in a ConfigMap labelled ``cxr-screen/embedded-manifest=true`` are validated too.
    Returns an empty list for a valid object.
    """
    if not isinstance(obj, Mapping) or "kind" not in obj or "apiVersion" not in obj:
        return [f"{_describe(obj) if isinstance(obj, Mapping) else obj!r}: no apiVersion/kind"]
    problems = _check_names_and_labels(obj)
    if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMA_FILES:
        problems += validate_custom_resource(obj)
    elif "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].split("/")[0].endswith(
        ".k8s.io"
    ):
        problems.append(
            f"{_describe(obj)}: no schema for custom resource {obj['apiVersion']} {obj['kind']}"
        )
    else:
        problems += validate_builtin(obj, versions)
    for key, embedded in _embedded_manifests(obj):
        problems += [
            f"{_describe(obj)} data[{key}]: {problem}"
            for problem in validate_object(embedded, versions)
        ]
    return problems


def validate_objects(
    objects: Iterable[Mapping[str, Any]], versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Problems of every object, plus two objects of one kind sharing a name."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        problems += validate_object(obj, versions)
        name = (obj.get("metadata") or {}).get("name")
        if name:
            key = (obj.get("kind", ""), name)
            if key in seen:
                problems.append(f"{_describe(obj)}: rendered twice")
            seen.add(key)
    return problems


# --- a values file, end to end ----------------------------------------------------------------


@dataclass
class ValuesReport:
    """What one values file rendered, and every problem found with it."""

    name: str
    kinds: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def check_values(
    values: Mapping[str, Any] | str | os.PathLike[str] | None,
    *,
    name: str | None = None,
    versions: Sequence[str] = KUBERNETES_VERSIONS,
) -> ValuesReport:
    """Render, lint strictly and validate every object for one set of values."""
    report = ValuesReport(name=name or (os.fspath(values) if values is not None else "defaults"))
    try:
        rendered = render_chart(values)
    except (helm_python.HelmError, ChartValidationError) as error:
        report.problems.append(f"render: {error}")
        return report
    report.kinds = rendered.kinds()
    report.problems += lint_chart(values, kube_versions=versions)
    report.problems += validate_objects(rendered.objects, versions)
    if not rendered.notes.strip():
        report.problems.append("NOTES.txt rendered empty")
    return report


def ci_values_files() -> list[Path]:
    """The values files CI renders: charts/cxr-screen/ci/*-values.yaml."""
    return sorted(CI_VALUES_DIR.glob("*-values.yaml"))


def format_table(reports: Sequence[ValuesReport]) -> str:
    """A Markdown table: one row per kind, one column per values file, counts in the cells."""
    kinds = sorted({kind for report in reports for kind in report.kinds})
    columns = [Path(report.name).name.removesuffix("-values.yaml") for report in reports]
    rows = [[kind, *(report.kinds.get(kind, 0) for report in reports)] for kind in kinds]
    rows.append(["**total**", *(sum(report.kinds.values()) for report in reports)])
    return "\n".join(markdown_table(["kind", *columns], rows, align="l" + "r" * len(columns)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m charts.validate",
        description=(
            "Render the cxr-screen chart with each values file, lint it strictly and validate "
            "every object: built-in kinds with kubernetes-validate (strict) for Kubernetes "
            f"{', '.join(KUBERNETES_VERSIONS)}, KServe and KubeRay kinds against the CRD schemas "
            f"in ../shared/k8s-schemas (or ${SCHEMAS_ENV}). Prints the kinds rendered per values "
            "file; exits 1 on any problem."
        ),
    )
    parser.add_argument(
        "--values",
        action="extend",
        nargs="+",
        metavar="FILE",
        help="values file to check (repeatable); default: every charts/cxr-screen/ci/*-values.yaml",
    )
    args = parser.parse_args(argv)
    files = [Path(f) for f in args.values] if args.values else ci_values_files()
    if not files:
        print(f"no values files found under {CI_VALUES_DIR}", file=sys.stderr)
        return 1
    try:
        _check_versions(KUBERNETES_VERSIONS)
        schemas_dir()
    except ChartValidationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    reports = [check_values(path, name=os.fspath(path)) for path in files]
    print(format_table(reports))
    failed = False
    for report in reports:
        if report.problems:
            failed = True
            print(f"\n{report.name}: {len(report.problems)} problem(s)", file=sys.stderr)
            for problem in report.problems:
                print(f"  - {problem}", file=sys.stderr)
    if not failed:
        print(
            f"\nall {len(reports)} values files render, lint strictly and validate "
            f"(Kubernetes {', '.join(KUBERNETES_VERSIONS)}; CRDs from {schemas_dir()})"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
