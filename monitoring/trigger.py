"""What a ``retrain`` decision starts: the sweep, locally or as a RayJob on Kubernetes.

- ``local``: runs ``python -m training.sweep --budget small --data-dir DIR`` as a subprocess, for
  real, and waits for it (its output goes to ``sweep.log`` next to the drift summary). The sweep
  trains, evaluates, writes the new reference profile and registers the winner in MLflow.
- ``kubernetes``: refuses (``ok``, nothing created, ``refused`` says why) while a RayJob of the same
  release and component is still active (not Complete / Failed / Suspended), else reads the RayJob template the chart mounts into the drift CronJob
  (``CXR_RAYJOB_TEMPLATE``, from the ConfigMap ``<release>-drift-rayjob-template``, key
  ``rayjob.yaml``) or, outside a cluster, renders it from ``charts/cxr-screen``; annotates it with
  the drift reasons, validates it against the KubeRay CRD schema when ``charts.validate`` and the
  schemas are at hand (the API server validates it anyway) and creates it with
  ``kubernetes.client.CustomObjectsApi().create_namespaced_custom_object``.

    python -m monitoring.trigger --summary reports/drift/today/summary.json --target local
    python -m monitoring.trigger --summary ... --target kubernetes --print      # show the object only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from charts.kube import kube_api
from monitoring.config import REPO_ROOT, TriggerConfig

log = logging.getLogger(__name__)

SWEEP_MODULE = "training.sweep"
TEMPLATE_ENV = "CXR_RAYJOB_TEMPLATE"
NAMESPACE_ENV = "POD_NAMESPACE"
RAYJOB_GROUP, RAYJOB_VERSION, RAYJOB_PLURAL = "ray.io", "v1", "rayjobs"
TEMPLATE_CONFIGMAP_SUFFIX = "-drift-rayjob-template"
TEMPLATE_KEY = "rayjob.yaml"
ANNOTATION_PREFIX = "cxr-screen/"
# The labels that make a RayJob "one of ours" (the chart's sweep and every retrain it started).
ACTIVE_SELECTOR_LABELS = ("app.kubernetes.io/instance", "app.kubernetes.io/component")
# KubeRay's jobDeploymentStatus values after which a RayJob uses nothing any more; a suspended one
# (the chart's sweep before someone starts it) holds no pods either.
INACTIVE_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed", "ValidationFailed", "Suspended"})


class TriggerError(RuntimeError):
    """The retrain could not be started (no sweep module, an invalid RayJob, an API error)."""


# --- local --------------------------------------------------------------------------------------


def default_data_dir() -> str:
    from training.data import default_data_dir as training_default

    return str(training_default())


def sweep_command(budget: str = "small", data_dir: str | Path | None = None,
                  extra_args: Sequence[str] = ()) -> list[str]:
    """``python -m training.sweep --budget B --data-dir D [extra...]`` with this interpreter."""
    return [sys.executable, "-m", SWEEP_MODULE, "--budget", budget, "--data-dir",
            str(data_dir or default_data_dir()), *extra_args]


def run_local(command: Sequence[str], *, cwd: Path | str = REPO_ROOT, log_path: Path | str | None = None,
              timeout: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` to completion (output to ``log_path``); returns what happened."""
    started = time.monotonic()
    log_file = Path(log_path) if log_path else None
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("retrain: running %s", " ".join(map(str, command)))
    with (open(log_file, "w") if log_file else open(os.devnull, "w")) as out:
        try:
            completed = subprocess.run(list(map(str, command)), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                       timeout=timeout, env=env, check=False)
            returncode = completed.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    seconds = round(time.monotonic() - started, 1)
    return {"target": "local", "command": list(map(str, command)), "returncode": returncode,
            "ok": returncode == 0, "seconds": seconds, "log": str(log_file) if log_file else None,
            **({"error": f"timed out after {timeout} s"} if returncode is None else {})}


def run_local_sweep(config: TriggerConfig = TriggerConfig(), *, command: Sequence[str] | None = None,
                    log_path: Path | str | None = None, timeout: float | None = None,
                    extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """The local trigger: the small sweep as a subprocess, or ``command`` / ``config.command`` instead."""
    command = command or config.command
    if command is None:
        import importlib.util

        if importlib.util.find_spec(SWEEP_MODULE) is None:
            return {"target": "local", "ok": False, "error": f"{SWEEP_MODULE} is not installed here"}
        command = sweep_command(config.budget, config.data_dir, [*config.sweep_args, *extra_args])
    return run_local(command, log_path=log_path, timeout=timeout)


# --- Kubernetes -----------------------------------------------------------------------------------


def rayjob_from_chart(values: dict[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """Render ``charts/cxr-screen`` and return the RayJob embedded in the drift template ConfigMap."""
    from charts.validate import EMBEDDED_MANIFEST_LABEL, parse_manifests, render_chart

    rendered = render_chart(values)
    for obj in rendered.of_kind("ConfigMap"):
        metadata = obj.get("metadata") or {}
        if (metadata.get("name", "").endswith(TEMPLATE_CONFIGMAP_SUFFIX)
                and (metadata.get("labels") or {}).get(EMBEDDED_MANIFEST_LABEL) == "true"):
            (rayjob,) = parse_manifests(obj["data"][TEMPLATE_KEY], f"ConfigMap/{metadata['name']}")
            return rayjob
    raise TriggerError("the chart rendered no drift RayJob template (drift.enabled and drift.retrain.enabled?)")


def load_rayjob_template(path: Path | str | None = None,
                         values: dict[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """The RayJob template: ``path``, else ``$CXR_RAYJOB_TEMPLATE`` (the mounted ConfigMap), else the chart."""
    path = path or os.environ.get(TEMPLATE_ENV)
    if path:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        if len(documents) != 1 or documents[0].get("kind") != "RayJob":
            raise TriggerError(f"{path} must hold exactly one RayJob manifest")
        return documents[0]
    return rayjob_from_chart(values)


def build_rayjob(template: dict[str, Any], summary: dict[str, Any] | None = None,
                 namespace: str | None = None) -> dict[str, Any]:
    """The object to create: the template, in ``namespace``, annotated with why it was started."""
    obj = copy.deepcopy(template)
    if obj.get("apiVersion") != f"{RAYJOB_GROUP}/{RAYJOB_VERSION}" or obj.get("kind") != "RayJob":
        raise TriggerError(f"the template is a {obj.get('apiVersion')} {obj.get('kind')}, not a ray.io/v1 RayJob")
    metadata = obj.setdefault("metadata", {})
    if namespace:
        metadata["namespace"] = namespace
    if summary:
        annotations = metadata.setdefault("annotations", {})
        annotations[ANNOTATION_PREFIX + "drift-decision"] = str(summary.get("decision", ""))
        annotations[ANNOTATION_PREFIX + "drift-created-at"] = str(summary.get("created_at", ""))
        annotations[ANNOTATION_PREFIX + "drift-reasons"] = "; ".join(summary.get("reasons") or [])[:2000]
    return obj


def validate_rayjob(obj: dict[str, Any]) -> list[str] | None:
    """Problems of the RayJob against the KubeRay CRD schema (charts.validate); None: not checked here."""
    try:
        from charts.validate import ChartValidationError, validate_object
    except ImportError:  # the jobs image ships no charts/: the API server validates on create
        log.info("charts.validate not available: RayJob validated by the API server only")
        return None
    try:
        return validate_object(obj)
    except ChartValidationError as error:
        log.info("RayJob not validated locally: %s", error)
        return None


def create_rayjob(obj: dict[str, Any], namespace: str, api: Any = None, dry_run: bool = False) -> dict[str, Any]:
    """``create_namespaced_custom_object`` for the RayJob (server-side dry run when asked)."""
    api = api or kube_api("CustomObjectsApi")
    kwargs: dict[str, Any] = {"field_validation": "Strict"}
    if dry_run:
        kwargs["dry_run"] = "All"
    return api.create_namespaced_custom_object(RAYJOB_GROUP, RAYJOB_VERSION, namespace, RAYJOB_PLURAL, obj, **kwargs)


def _is_active(rayjob: dict[str, Any]) -> bool:
    """Running or about to run: not finished, not suspended (no status yet: KubeRay is about to start it)."""
    status = (rayjob.get("status") or {}).get("jobDeploymentStatus")
    if status:
        return status not in INACTIVE_DEPLOYMENT_STATUSES
    return not (rayjob.get("spec") or {}).get("suspend", False)


def active_rayjobs(obj: dict[str, Any], namespace: str, api: Any = None) -> list[str]:
    """Names of the RayJobs in ``namespace`` with ``obj``'s release and component labels still active.

    The drift job runs every night; a full sweep takes longer than that. Starting a second sweep
    while one runs doubles the cluster's load and races the two winners into the registry.
    """
    labels = (obj.get("metadata") or {}).get("labels") or {}
    selector = ",".join(f"{key}={labels[key]}" for key in ACTIVE_SELECTOR_LABELS if key in labels)
    api = api or kube_api("CustomObjectsApi")
    listed = api.list_namespaced_custom_object(RAYJOB_GROUP, RAYJOB_VERSION, namespace, RAYJOB_PLURAL,
                                               label_selector=selector)
    return sorted(item["metadata"]["name"] for item in listed.get("items", []) if _is_active(item))


def kubernetes_retrain(summary: dict[str, Any] | None, config: TriggerConfig = TriggerConfig(), *,
                       template: Path | str | None = None, values: dict[str, Any] | str | Path | None = None,
                       api: Any = None, dry_run: bool = False, create: bool = True) -> dict[str, Any]:
    """Build, validate and (unless ``create=False``) create the retrain RayJob."""
    base = load_rayjob_template(template, values)
    namespace = config.namespace or os.environ.get(NAMESPACE_ENV) or (base.get("metadata") or {}).get("namespace")
    if not namespace:
        raise TriggerError("no namespace: set trigger.namespace, POD_NAMESPACE or the template's metadata.namespace")
    obj = build_rayjob(base, summary, namespace)
    problems = validate_rayjob(obj)
    if problems:
        raise TriggerError("the RayJob does not validate against the CRD schema:\n  " + "\n  ".join(problems))
    result: dict[str, Any] = {"target": "kubernetes", "namespace": namespace, "object": obj,
                              "validated_locally": problems is not None, "ok": True}
    if create:
        api = api or kube_api("CustomObjectsApi")
        active = active_rayjobs(obj, namespace, api=api)
        if active:
            log.warning("retrain not started: RayJob %s still active in %s", ", ".join(active), namespace)
            result.update(created=None, dry_run=dry_run, active=active,
                          refused=f"RayJob {', '.join(active)} is still active; one sweep at a time")
            return result
        created = create_rayjob(obj, namespace, api=api, dry_run=dry_run)
        result["created"] = (created or {}).get("metadata", {}).get("name") if isinstance(created, dict) else None
        result["dry_run"] = dry_run
    return result


# --- one entry point ------------------------------------------------------------------------------


def trigger_retrain(summary: dict[str, Any], *, target: str, config: TriggerConfig = TriggerConfig(),
                    dry_run: bool = False, log_dir: Path | str | None = None, command: Sequence[str] | None = None,
                    api: Any = None, template: Path | str | None = None) -> dict[str, Any]:
    """Start the retrain for a ``retrain`` summary; never raises (the result says ``ok`` or ``error``)."""
    try:
        if target == "local":
            log_path = Path(log_dir) / "sweep.log" if log_dir else None
            return run_local_sweep(config, command=command, log_path=log_path)
        if target == "kubernetes":
            result = kubernetes_retrain(summary, config, template=template, api=api, dry_run=dry_run)
            result.pop("object", None)
            return result
        return {"target": target, "ok": False, "error": f"unknown trigger target {target!r}"}
    except Exception as error:  # noqa: BLE001 - reported in the summary and the exit status
        log.error("retrain trigger (%s) failed: %s", target, error)
        return {"target": target, "ok": False, "error": f"{type(error).__name__}: {error}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.trigger",
        description="Start retraining for a drift summary that says `retrain`: the small sweep locally, or the "
                    "chart's RayJob on Kubernetes. Exit 0 when started (or nothing to do), 1 when it failed.",
    )
    parser.add_argument("--summary", type=Path, required=True, help="summary.json of python -m monitoring.drift")
    parser.add_argument("--target", choices=("local", "kubernetes"), default="local")
    parser.add_argument("--force", action="store_true", help="start even if the decision is ok")
    parser.add_argument("--budget", default=None, help="local: sweep budget (default: configs/drift.yaml)")
    parser.add_argument("--data-dir", default=None, help="local: sweep data (default: config, $DATA_DIR)")
    parser.add_argument("--sweep-arg", action="append", default=[], metavar="ARG",
                        help="local: one more argument for training.sweep (repeat; e.g. --sweep-arg=--no-register)")
    parser.add_argument("--command", nargs=argparse.REMAINDER, default=None,
                        help="local: run this command instead of the sweep (everything after --command)")
    parser.add_argument("--template", type=Path, default=None, help=f"kubernetes: RayJob YAML (default ${TEMPLATE_ENV}, "
                                                                     "else rendered from charts/cxr-screen)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--dry-run", action="store_true", help="kubernetes: server-side dry run")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="kubernetes: print the validated object and create nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from monitoring.config import load_config

    summary = json.loads(args.summary.read_text())
    if summary.get("decision") != "retrain" and not args.force:
        print(f"decision is {summary.get('decision')!r}: nothing to start (--force to start anyway)")
        return 0
    config = load_config().trigger
    config = config.model_copy(update={k: v for k, v in {"budget": args.budget, "data_dir": args.data_dir,
                                                          "namespace": args.namespace}.items() if v is not None})
    if args.sweep_arg:
        config = config.model_copy(update={"sweep_args": [*config.sweep_args, *args.sweep_arg]})
    if args.target == "kubernetes" and args.print_only:
        result = kubernetes_retrain(summary, config, template=args.template, create=False)
        print(yaml.safe_dump(result["object"], sort_keys=False))
        return 0
    result = trigger_retrain(summary, target=args.target, config=config, dry_run=args.dry_run,
                             log_dir=args.summary.parent, command=args.command or None, template=args.template)
    print(json.dumps(result, indent=1))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
