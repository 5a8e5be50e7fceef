"""Swap the version a RUNNING TorchServe serves, without a restart, through its management API.

    python -m serving.rollout --model-uri models:/cxr-screen@champion      # after promote or rollback
    python -m serving.rollout --model-uri models:/cxr-screen/3 --keep-old  # leave the old version loaded

Why: promotion and rollback move an MLflow alias; the running server must follow, and restarting
TorchServe drops in-flight requests and takes its model load time. TorchServe serves several
versions of one model name side by side, so a rollout is the management API's three calls:

1. ``POST /models?url=<name>-v<version>.mar&initial_workers=N&synchronous=true`` (the MAR built by
   :func:`serving.mar.build_package` from the registered bundle, copied into the server's model store);
2. ``PUT /models/<name>/<version>/set-default``: from the next request on, ``/predictions/<name>``,
   ``/v1/models/<name>:predict`` and ``/v2/models/<name>/infer`` go to the new version, whose handler
   names it in every answer (``model_version``) and audit record;
3. ``DELETE /models/<name>/<old>`` for every other version (unless ``--keep-old``).

A version already loaded is only made the default (a rollback to a version kept loaded is instant).
Defaults (management URL, key file, model store) are those of the local stack (``configs/serving.yaml``,
``python -m serving.stack``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from serving.config import DEFAULT_CONFIG, PackageConfig, ServingConfig
from serving.torchserve_process import KEY_FILE, TorchServeKeys

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Rollout:
    """What a rollout did: the version served now, what it replaced, what it unloaded."""

    model_name: str
    version: str
    model_uri: str | None
    previous_default: str | None
    registered: bool
    unregistered: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Management:
    """The few TorchServe management calls a rollout needs (token auth as the server wrote it)."""

    def __init__(self, url: str, key_file: Path | str, timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self.key_file = Path(key_file)
        self.http = httpx.Client(timeout=timeout_s)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TorchServeKeys.read(self.key_file).management}"}

    def _call(self, method: str, path: str, **params) -> httpx.Response:
        response = self.http.request(method, f"{self.url}{path}", params=params or None, headers=self._headers())
        if response.status_code >= 400:
            raise RuntimeError(f"TorchServe management {method} {path} -> {response.status_code}: {response.text[:500]}")
        return response

    def versions(self, name: str) -> tuple[list[str], str | None]:
        """(loaded versions, the default one)."""
        entries = self._call("GET", f"/models/{name}/all").json()
        default = None
        listed = self._call("GET", f"/models/{name}").json()  # the default version's description
        if listed:
            default = str(listed[0].get("modelVersion"))
        return [str(entry["modelVersion"]) for entry in entries], default

    def register(self, mar_name: str, config: PackageConfig) -> None:
        self._call("POST", "/models", url=mar_name, model_name=config.model_name,
                   initial_workers=config.workers, batch_size=config.batch_size,
                   max_batch_delay=config.max_batch_delay_ms, response_timeout=config.response_timeout_s,
                   synchronous="true")

    def set_default(self, name: str, version: str) -> None:
        self._call("PUT", f"/models/{name}/{version}/set-default")

    def unregister(self, name: str, version: str) -> None:
        self._call("DELETE", f"/models/{name}/{version}")

    def close(self) -> None:
        self.http.close()


def mar_file_name(model_name: str, version: str) -> str:
    """One MAR file per version in the model store (the startup MAR keeps its plain name)."""
    return f"{model_name}-v{version}.mar"


def rollout(model_uri: str, management_url: str, key_file: Path | str, model_store: Path | str,
            config: PackageConfig | None = None, keep_old: bool = False) -> Rollout:
    """Make the running TorchServe serve the registry version behind ``model_uri`` (see the module docstring)."""
    import time

    from serving.mar import build_package, fetch_registered_bundle

    started = time.perf_counter()
    config = config or ServingConfig.load().package
    name = config.model_name
    api = Management(management_url, key_file)
    try:
        loaded, default = api.versions(name)
        with tempfile.TemporaryDirectory(prefix="cxr-rollout-") as scratch:
            bundle_dir, version = fetch_registered_bundle(model_uri, Path(scratch) / "bundle")
            registered = version not in loaded
            if registered:
                package = build_package(bundle_dir, Path(scratch) / "package", version, config)
                target = Path(model_store) / mar_file_name(name, version)
                shutil.copy2(package.mar, target)
                log.info("registering %s version %s (%s)", name, version, target.name)
                api.register(target.name, config)
        api.set_default(name, version)
        unloaded = []
        if not keep_old:
            for old in loaded:
                if old != version:
                    api.unregister(name, old)
                    unloaded.append(old)
        return Rollout(model_name=name, version=version, model_uri=model_uri, previous_default=default,
                       registered=registered, unregistered=unloaded, seconds=round(time.perf_counter() - started, 1))
    finally:
        api.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default="models:/cxr-screen@champion", help="registered version to serve")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serving config (package: and local:)")
    parser.add_argument("--management-url", default=None, help="default: local.host:local.management_port")
    parser.add_argument("--key-file", type=Path, default=None, help=f"default: <local.state_dir>/{KEY_FILE}")
    parser.add_argument("--model-store", type=Path, default=None,
                        help="the running server's model store (default: model-package/model-store)")
    parser.add_argument("--keep-old", action="store_true", help="leave the other versions loaded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = ServingConfig.load(args.config)
    local = config.local
    result = rollout(args.model_uri,
                     args.management_url or f"http://{local.host}:{local.management_port}",
                     args.key_file or (REPO_ROOT / local.state_dir / KEY_FILE),
                     args.model_store or (REPO_ROOT / "model-package" / "model-store"),
                     config.package, keep_old=args.keep_old)
    print(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
