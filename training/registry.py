"""MLflow Model Registry: the registered model ``cxr-screen`` and its aliases.

``champion`` is what production serves; ``previous`` is the rollback target. The sweep registers
a new version and promotes it; ``make promote VERSION=n`` and ``make rollback`` move the aliases;
``make mar`` reads ``models:/cxr-screen@champion``.

    python -m training.registry show | promote --version N | rollback | fetch --uri URI --out DIR
        | register-shipped [--bundle models/champion] [--report reports/model/champion.json]

``register-shipped`` registers the champion that ships with the repository (``models/champion``),
so a fresh machine's ``make demo`` serves the real model instead of a toy trained in a minute;
``make sweep`` still replaces it by registering and promoting a newer version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from training.tracking import tracking_uri

log = logging.getLogger(__name__)

REGISTERED_MODEL = "cxr-screen"
CHAMPION = "champion"
PREVIOUS = "previous"
BUNDLE_ARTIFACT = "champion-bundle"
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "pyfunc.py"  # logged as code: no serving import here


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri())


def alias_version(alias: str, name: str = REGISTERED_MODEL) -> str | None:
    try:
        return client().get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def model_signature(classes: list[str]):
    """The pyfunc signature: an ``image`` column of bytes in; the decision and one probability per class out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "label"), ColSpec("string", "triage"),
               ColSpec("string", "fired_class", required=False), ColSpec("double", "threshold", required=False),
               ColSpec("string", "gray_zone", required=False), ColSpec("string", "error_code", required=False),
               ColSpec("string", "error", required=False)]
    outputs += [ColSpec("double", f"p_{name}", required=False) for name in classes]
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs))


def _pip_requirements() -> list[str]:
    """The project's pinned top-level requirements (what ``make install`` installs)."""
    path = PYFUNC_CODE.parents[1] / "requirements.txt"
    if not path.exists():
        return []
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")]


def log_pyfunc(bundle_dir: Path, run_id: str) -> str:
    """Log ``bundle_dir`` as the pyfunc model of ``run_id`` (``serving/pyfunc.py``); returns its model URI."""
    from cxr_core.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError(f"run {active.info.run_id} is active; register after it ends (run {run_id})")
    with contextlib.nullcontext() if active is not None else mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name=BUNDLE_ARTIFACT, python_model=str(PYFUNC_CODE),
                                       artifacts={"bundle": str(bundle_dir)},
                                       signature=model_signature(manifest.classes),
                                       pip_requirements=_pip_requirements())
    return info.model_uri


def register_bundle(bundle_dir: Path, run_id: str, tags: dict[str, str], promote: bool = True,
                    name: str = REGISTERED_MODEL) -> str:
    """Log ``bundle_dir`` to ``run_id`` as a pyfunc model and register it as a new version (optionally champion).

    The version's pyfunc predicts what the endpoint answers
    (``mlflow.pyfunc.load_model("models:/cxr-screen@champion").predict(...)``); the bundle inside it
    is what :func:`fetch_bundle`, ``make mar`` and the drift job read.
    """
    try:
        client().create_registered_model(
            name, description="Chest X-ray screening (tuberculosis, pneumonia): bundle with calibration and policy")
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    model_uri = log_pyfunc(Path(bundle_dir), run_id)
    version = mlflow.register_model(model_uri, name, tags={k: str(v)[:5000] for k, v in tags.items()}).version
    log.info("registered %s version %s from run %s", name, version, run_id)
    if promote:
        promote_version(version, name)
    return version


def promote_version(version: str | int, name: str = REGISTERED_MODEL) -> dict[str, str | None]:
    """Make ``version`` the champion; the old champion becomes ``previous``."""
    mlflow_client = client()
    version = str(version)
    mlflow_client.get_model_version(name, version)  # fails clearly if it does not exist
    current = alias_version(CHAMPION, name)
    if current == version:
        return {"champion": version, "previous": alias_version(PREVIOUS, name)}
    if current is not None:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, current)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    return {"champion": version, "previous": current}


def rollback(name: str = REGISTERED_MODEL) -> dict[str, str | None]:
    """Swap ``champion`` and ``previous`` (a second rollback undoes the first)."""
    mlflow_client = client()
    previous, current = alias_version(PREVIOUS, name), alias_version(CHAMPION, name)
    if previous is None:
        raise RuntimeError(f"{name} has no '{PREVIOUS}' alias to roll back to")
    mlflow_client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, current)
    return {"champion": previous, "previous": current}


def fetch_bundle(model_uri: str, dest: Path | str) -> tuple[Path, str]:
    """The one door from MLflow to a local bundle directory -> (dir, version).

    ``models:/cxr-screen@champion`` or ``models:/cxr-screen/3`` (version = the registry's), or any
    other MLflow artifact URI of a logged bundle (``runs:/...``, ``mlflow-artifacts:/...``,
    ``file://...``, object stores; version = the URI). Registry, ``make mar``, the rollout, the
    evaluation CLI and the drift job's reference all fetch through here.
    """
    dest = Path(dest)
    if model_uri.startswith("models:/"):
        name, _, selector = model_uri.removeprefix("models:/").partition("@")
        if selector:
            version = client().get_model_version_by_alias(name, selector).version
        else:
            name, _, version = model_uri.removeprefix("models:/").partition("/")
        artifact_uri = f"models:/{name}/{version}"
    else:
        artifact_uri, version = model_uri, model_uri
    if dest.exists():
        shutil.rmtree(dest)
    staging = Path(tempfile.mkdtemp(prefix="cxr-bundle-"))
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(staging),
                                                              tracking_uri=tracking_uri()))
        if not (downloaded / "bundle.json").exists():
            nested = sorted(p.parent for p in downloaded.rglob("bundle.json"))
            if not nested:
                raise FileNotFoundError(f"{model_uri} holds no bundle.json")
            downloaded = nested[0]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(downloaded), dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest, str(version)


SHIPPED_BUNDLE = Path("models/champion")


def register_shipped(bundle_dir: Path = SHIPPED_BUNDLE, report: Path | None = None,
                     experiment: str = "cxr-screen", name: str = REGISTERED_MODEL) -> str:
    """Register the committed champion bundle as a new version and make it ``champion``.

    Its provenance travels as tags (family, the bundle's own provenance block, the sha256 of
    every file) and the measured report, when given, as metrics of the registering run.
    """
    import hashlib

    from training.tracking import log_metrics, mlflow_run, numeric_metrics

    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle_dir.iterdir()) if p.is_file()}
    tags = {"origin": "shipped", "bundle_path": str(bundle_dir),
            "family": str(manifest.get("family") or manifest.get("model", {}).get("name")),
            "provenance": json.dumps(manifest.get("provenance", {}), sort_keys=True),
            "files_sha256": json.dumps(files, sort_keys=True)}
    with mlflow_run(experiment, "shipped-champion", tags=tags) as run:
        if report is not None and Path(report).exists():
            document = json.loads(Path(report).read_text())
            log_metrics(numeric_metrics({"test": document.get("test", {}), "loso": document.get("loso", {}),
                                         "shortcuts": document.get("shortcuts", {})}))
            mlflow.log_artifact(str(report), "model-report")
        return register_bundle(bundle_dir, run.info.run_id, tags, promote=True, name=name)


def describe(name: str = REGISTERED_MODEL) -> dict:
    mlflow_client = client()
    versions = sorted(mlflow_client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return {
        "name": name,
        "champion": alias_version(CHAMPION, name),
        "previous": alias_version(PREVIOUS, name),
        "versions": [{"version": v.version, "run_id": v.run_id, "family": v.tags.get("family"),
                      "objective": v.tags.get("objective")} for v in versions],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.registry", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("show")
    promote = sub.add_parser("promote")
    promote.add_argument("--version", required=True)
    sub.add_parser("rollback")
    fetch = sub.add_parser("fetch")
    fetch.add_argument("--uri", default=f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    fetch.add_argument("--out", type=Path, required=True)
    shipped = sub.add_parser("register-shipped", help="register models/champion as the champion")
    shipped.add_argument("--bundle", type=Path, default=SHIPPED_BUNDLE)
    shipped.add_argument("--report", type=Path, default=Path("reports/model/champion.json"))
    args = parser.parse_args(argv)
    if args.action == "show":
        print(json.dumps(describe(), indent=1))
    elif args.action == "promote":
        print(json.dumps(promote_version(args.version)))
    elif args.action == "rollback":
        print(json.dumps(rollback()))
    elif args.action == "register-shipped":
        version = register_shipped(args.bundle, args.report)
        print(f"registry: {args.bundle} registered as {REGISTERED_MODEL} version {version} (alias {CHAMPION})")
    else:
        path, version = fetch_bundle(args.uri, args.out)
        print(f"registry: {args.uri} -> {path} (version {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
