"""Run a container the chart renders as a local process, the way its pod would run it.

KServe builds the predictor container from the ServingRuntime's ``kserve-container`` merged with
``spec.predictor.model`` of the InferenceService (env merged by name, the model's fields win),
fills the ``{{.Name}}`` / ``{{.Namespace}}`` / ``{{.Labels.x}}`` / ``{{.Annotations.x}}``
placeholders with Go's text/template over the InferenceService's metadata (a missing key becomes
``<no value>``) and mounts the storageUri folder at ``/mnt/models``. :class:`PodFiles` stands in for
the pod's filesystem: each volumeMount maps to a local folder (one folder per PVC claim, shared
between pods like the real claim; an emptyDir per pod), every other absolute path to that pod's
own root, so a path the chart forgot to mount ends up where no other pod can see it.

Only what has no local meaning is changed, and said so: the image's ENTRYPOINT runs from
``docker/`` in this checkout, the image's interpreter is this venv, and the fixed ports (a pod has
its own network namespace) become free local ports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_MOUNT = "/mnt/models"
_PLACEHOLDER = re.compile(r"\{\{\s*\.(\w+)(?:\.([\w.\-/]+))?\s*\}\}")


def fill_placeholders(text: str, metadata: dict[str, Any]) -> str:
    """KServe's ``replacePlaceholders``: Go text/template over the InferenceService's ObjectMeta."""

    def value(match: re.Match) -> str:
        field_name, key = match.group(1), match.group(2)
        if field_name in ("Name", "Namespace") and key is None:
            return str(metadata.get(field_name.lower(), ""))
        if field_name in ("Labels", "Annotations") and key is not None:
            found = (metadata.get(field_name.lower()) or {}).get(key)
            return "<no value>" if found is None else str(found)
        raise ValueError(f"placeholder {match.group(0)} is not one KServe fills")

    return _PLACEHOLDER.sub(value, text)


def _merge_by(base: list[dict], override: list[dict], key: str) -> list[dict]:
    merged = {item[key]: item for item in base}
    for item in override:
        merged[item[key]] = {**merged.get(item[key], {}), **item}
    return list(merged.values())


def predictor_container(runtime: dict[str, Any], isvc: dict[str, Any]) -> dict[str, Any]:
    """The container KServe runs: runtime container + ``predictor.model``, placeholders filled."""
    (base,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    model = dict(isvc["spec"]["predictor"]["model"])
    for key in ("modelFormat", "protocolVersion", "runtime", "storageUri"):
        model.pop(key, None)
    container = {**base, **{k: v for k, v in model.items() if k not in ("env", "volumeMounts")}}
    container["env"] = _merge_by(base.get("env", []), model.get("env", []), "name")
    container["volumeMounts"] = _merge_by(base.get("volumeMounts", []), model.get("volumeMounts", []), "mountPath")
    metadata = isvc["metadata"]
    for item in container["env"]:
        if "value" in item:
            item["value"] = fill_placeholders(str(item["value"]), metadata)
    for key in ("command", "args"):
        if key in container:
            container[key] = [fill_placeholders(str(arg), metadata) for arg in container[key]]
    return container


@dataclass
class PodFiles:
    """Mount path -> local folder for one pod; PVC claims share ``claims_root/<claim>``."""

    root: Path
    claims_root: Path
    mounts: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, root: Path, claims_root: Path, container: dict[str, Any], volumes: list[dict[str, Any]],
           extra: dict[str, Path] | None = None) -> "PodFiles":
        by_name = {volume["name"]: volume for volume in volumes}
        files = cls(root, claims_root)
        for mount in container.get("volumeMounts", []):
            volume = by_name[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = claims_root / volume["persistentVolumeClaim"]["claimName"]
            else:  # emptyDir, configMap, secret: this pod's own folder
                local = root / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            files.mounts[mount["mountPath"].rstrip("/")] = local
        files.mounts.update(extra or {})
        return files

    def local(self, path: str) -> Path:
        """Where ``path`` in the pod lives here: under its mount, else in the pod's own root."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if path == mount or path.startswith(mount + "/"):
                return self.mounts[mount] / path[len(mount):].lstrip("/")
        return self.root / "rootfs" / path.lstrip("/")

    def rewrite(self, value: str) -> str:
        return str(self.local(value)) if value.startswith("/") else value
