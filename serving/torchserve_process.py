"""Run a real TorchServe on chosen local ports from a model package, token authorization on.

The package's ``config/config.properties`` is what KServe reads; locally it is copied into a
private state folder with the addresses, ports and model store replaced, and TorchServe runs there:
its working directory (``key_file.json`` with the inference/management/API tokens), its temp folder
(pid file and the extracted MAR, so several instances never collide) and its logs all live in that
folder. Stopping kills the whole process group (launcher, JVM and Python workers).

    with TorchServe(package, state_dir, ports) as server:   # waits until the model is ready
        requests.post(server.inference_url + "/predictions/cxr-screen", data=image,
                      headers=server.inference_headers())
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving.schemas import MODEL_NAME

log = logging.getLogger(__name__)

KEY_FILE = "key_file.json"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class TorchServePorts:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int

    @classmethod
    def free(cls) -> "TorchServePorts":
        return cls(*(free_port() for _ in range(5)))


@dataclass(frozen=True)
class TorchServeKeys:
    """Tokens from TorchServe's ``key_file.json`` (inference, management and the API key)."""

    inference: str
    management: str
    api: str

    @classmethod
    def read(cls, path: Path | str) -> "TorchServeKeys":
        payload = json.loads(Path(path).read_text())
        return cls(inference=payload["inference"]["key"], management=payload["management"]["key"],
                   api=payload.get("API", {}).get("key", ""))


def runtime_properties(package_config: str, *, host: str, ports: TorchServePorts, model_store: Path) -> str:
    """The package's config.properties with local addresses, ports and model store."""
    overrides = {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{host}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "model_store": str(model_store),
        "disable_system_metrics": "true",
        # the model API (register / set-default / unregister, token-protected) is how serving.rollout
        # swaps a promoted version into the running server; TorchServe >= 0.11 turns it off by default
        "enable_model_api": "true",
    }
    lines = []
    for line in package_config.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in overrides:
            continue
        lines.append(line)
    lines.append("# local overrides (serving.torchserve_process)")
    lines += [f"{key}={value}" for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def package_model_name(package: Path) -> str:
    """The model name of the package's model_snapshot (cxr-screen unless built otherwise)."""
    text = (package / "config" / "config.properties").read_text()
    match = re.search(r"^model_snapshot=(.*)$", text, flags=re.MULTILINE)
    if match:
        models = json.loads(match.group(1)).get("models", {})
        if models:
            return next(iter(models))
    return MODEL_NAME


class TorchServe:
    """One TorchServe process group serving a model package on local ports."""

    def __init__(self, package: Path | str, state_dir: Path | str, ports: TorchServePorts | None = None,
                 host: str = "127.0.0.1", audit_log: Path | str | None = None, torch_threads: int | None = 1,
                 extra_env: dict[str, str] | None = None):
        self.package = Path(package).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.ports = ports or TorchServePorts.free()
        self.host = host
        self.audit_log = Path(audit_log).resolve() if audit_log else None
        self.torch_threads = torch_threads
        self.extra_env = extra_env or {}
        self.model_name = package_model_name(self.package)
        self.process: subprocess.Popen | None = None

    # -- addresses and tokens
    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.ports.management}"

    @property
    def key_file(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def log_file(self) -> Path:
        return self.state_dir / "torchserve.out"

    def keys(self) -> TorchServeKeys:
        return TorchServeKeys.read(self.key_file)

    def inference_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys().inference}"}

    def management_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys().management}"}

    # -- lifecycle
    def start(self, timeout_s: float = 300.0) -> "TorchServe":
        config = self.package / "config" / "config.properties"
        store = self.package / "model-store"
        if not config.exists() or not any(store.glob("*.mar")):
            raise FileNotFoundError(f"{self.package} is not a model package (config/config.properties + "
                                    "model-store/*.mar); build one with `python -m serving.mar`")
        for sub in ("tmp", "logs"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        runtime = self.state_dir / "config.properties"
        runtime.write_text(runtime_properties(config.read_text(), host=self.host, ports=self.ports, model_store=store))
        env = {**os.environ, "TMPDIR": str(self.state_dir / "tmp"), "TEMP": str(self.state_dir / "tmp"),
               "LOG_LOCATION": str(self.state_dir / "logs"), "METRICS_LOCATION": str(self.state_dir / "logs"),
               **self.extra_env}
        if self.audit_log:
            env["CXR_AUDIT_LOG"] = str(self.audit_log)
        if self.torch_threads:
            env.update(CXR_TORCH_THREADS=str(self.torch_threads), OMP_NUM_THREADS=str(self.torch_threads))
        launcher = Path(sys.executable).with_name("torchserve")
        command = [str(launcher) if launcher.exists() else "torchserve", "--start", "--foreground", "--ncs",
                   "--ts-config", str(runtime), "--model-store", str(store)]
        with open(self.log_file, "ab") as output:
            self.process = subprocess.Popen(command, cwd=self.state_dir, env=env, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        (self.state_dir / "torchserve.pid").write_text(str(self.process.pid))
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.key_file.exists() and self.workers_ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe did not get {self.model_name} ready in {timeout_s:.0f}s:\n{self.log_tail()}")

    def describe(self) -> dict:
        """Management API describe-model (first version entry)."""
        response = httpx.get(f"{self.management_url}/models/{self.model_name}", headers=self.management_headers(),
                             timeout=10)
        response.raise_for_status()
        return response.json()[0]

    def workers_ready(self) -> bool:
        try:
            workers = self.describe().get("workers", [])
        except (httpx.HTTPError, OSError, ValueError, KeyError, IndexError):
            return False
        return bool(workers) and all(worker.get("status") == "READY" for worker in workers)

    def worker_pids(self) -> list[int]:
        return [int(worker["pid"]) for worker in self.describe().get("workers", []) if worker.get("pid")]

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for path in (self.log_file, self.state_dir / "logs" / "model_log.log"):
            if path.exists():
                text += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def stop(self, timeout_s: float = 30.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        stop_process_group(process.pid, timeout_s)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        (self.state_dir / "torchserve.pid").unlink(missing_ok=True)

    def __enter__(self) -> "TorchServe":
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(pgid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the process group we started (session leader ``pgid``), SIGKILL what outlives it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pgid, os.WNOHANG)  # reap our own child, if it is ours
        except ChildProcessError:
            pass
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
