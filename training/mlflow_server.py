"""``make mlflow``: the embedded MLflow tracking server (SQLite backend, local artifacts).

    python -m training.mlflow_server start [--port 5000] [--root .mlflow]
    python -m training.mlflow_server stop | status

The same server process production runs (``mlflow server``), bound to 127.0.0.1. Setting
``MLFLOW_TRACKING_URI`` points everything at another server (e.g. PostgreSQL-backed) instead.
Job execution is disabled (2 processes instead of 10 on a 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

DEFAULT_ROOT = Path(".mlflow")
DEFAULT_PORT = 5000


@dataclass
class MlflowServer:
    """A running local tracking server."""

    process: subprocess.Popen | None
    url: str
    root: Path

    def stop(self) -> None:
        stop_pid_file(self.root / "server.pid")


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def start_server(root: Path | str = DEFAULT_ROOT, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                 wait_seconds: float = 120.0) -> MlflowServer:
    """Start ``mlflow server`` detached (or reuse a healthy one on that port) and wait for /health."""
    root = Path(root).resolve()
    url = f"http://{host}:{port}"
    if is_healthy(url):
        return MlflowServer(process=None, url=url, root=root)
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    log_file = open(root / "server.log", "ab")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True, cwd=root)
    (root / "server.pid").write_text(str(process.pid))
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}; see {root / 'server.log'}")
        if is_healthy(url):
            return MlflowServer(process=process, url=url, root=root)
        time.sleep(0.5)
    stop_pid_file(root / "server.pid")
    raise TimeoutError(f"mlflow server did not become healthy within {wait_seconds:.0f}s; see {root / 'server.log'}")


def stop_pid_file(pid_file: Path) -> bool:
    """Stop the process group recorded in ``pid_file``; True if something was stopped."""
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip())
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            os.killpg(pid, 0)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.mlflow_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    if args.action == "start":
        server = start_server(args.root, args.port)
        print(f"mlflow: tracking server at {server.url} (backend sqlite:///{server.root / 'mlflow.db'})")
        print(f"mlflow: export MLFLOW_TRACKING_URI={server.url}; stop with `make stop`")
    elif args.action == "stop":
        print("mlflow: stopped" if stop_pid_file(args.root / "server.pid") else "mlflow: not running")
    else:
        healthy = is_healthy(url)
        print(f"mlflow: {url} {'healthy' if healthy else 'not reachable'}")
        return 0 if healthy else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
