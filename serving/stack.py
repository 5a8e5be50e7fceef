"""The local serving stack: TorchServe + the KServe front on 127.0.0.1, started and stopped by pid file.

    python -m serving.stack start [--package model-package]   # prints the URLs and the API key file
    python -m serving.stack status
    python -m serving.stack stop

Ports, state folder and audit log come from ``configs/serving.yaml`` (``local:``). The API keys the
front accepts come from ``CXR_API_KEYS`` or ``front.api_keys_file``; without either, ``start``
generates one key (caller ``local``) into ``<state_dir>/api_keys.json`` (mode 600).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving.config import DEFAULT_CONFIG, ServingConfig
from serving.front import API_KEYS_ENV, load_api_keys
from serving.torchserve_process import TorchServe, TorchServePorts, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]
PID_FILES = {"front": "front.pid", "torchserve": "torchserve.pid"}
MARKERS = {"front": "serving.front", "torchserve": "torchserve"}


@dataclass(frozen=True)
class StackUrls:
    front: str
    inference: str
    management: str

    def lines(self, model_name: str) -> list[str]:
        return [
            f"KServe front        {self.front}",
            f"  v1 predict        POST {self.front}/v1/models/{model_name}:predict",
            f"  v1 explain        POST {self.front}/v1/models/{model_name}:explain",
            f"  v2 infer          POST {self.front}/v2/models/{model_name}/infer",
            f"  v2 health         GET  {self.front}/v2/health/ready",
            f"TorchServe          {self.inference}/predictions/{model_name}  (token: key_file.json)",
            f"TorchServe mgmt     {self.management}/models/{model_name}",
        ]


def _alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def running(state_dir: Path) -> dict[str, int]:
    """{component: pid} of the stack's live processes (pid files checked against the command line)."""
    live = {}
    for component, name in PID_FILES.items():
        path = state_dir / name
        if path.exists():
            try:
                pid = int(path.read_text().strip())
            except ValueError:
                continue
            if _alive(pid, MARKERS[component]):
                live[component] = pid
    return live


def api_keys_file(config: ServingConfig, state_dir: Path) -> Path | None:
    """The key file the front reads: configured, generated, or None when CXR_API_KEYS is set."""
    if config.front.api_keys_file:
        return Path(config.front.api_keys_file).resolve()
    if os.environ.get(API_KEYS_ENV):
        return None
    path = state_dir / "api_keys.json"
    if not path.exists():
        path.write_text(json.dumps({"local": secrets.token_urlsafe(24)}) + "\n")
        path.chmod(0o600)
    return path


def start_front(torchserve: TorchServe, port: int, state_dir: Path, keys_file: Path | None, config: ServingConfig,
                audit_log: Path, timeout_s: float = 120.0) -> subprocess.Popen:
    """Start ``python -m serving.front`` in its own session and wait until its model is ready."""
    command = [sys.executable, "-m", "serving.front", "--port", str(port), "--torchserve-url", torchserve.inference_url,
               "--management-url", torchserve.management_url, "--key-file", str(torchserve.key_file),
               "--model-name", torchserve.model_name, "--max-body-mb", str(config.front.max_body_mb),
               "--timeout-s", str(config.front.request_timeout_s), "--audit-log", str(audit_log),
               "--body-timeout-s", str(config.front.body_timeout_s), "--header-timeout-s",
               str(config.front.header_timeout_s), "--max-connections-per-client",
               str(config.front.max_connections_per_client)]
    if keys_file:
        command += ["--api-keys-file", str(keys_file)]
    with open(state_dir / "front.out", "ab") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    (state_dir / PID_FILES["front"]).write_text(str(process.pid))
    url = f"http://127.0.0.1:{port}/v2/models/{torchserve.model_name}/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (state_dir / "front.out").read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError("the KServe front exited:\n" + "\n".join(tail))
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process_group(process.pid)
    raise TimeoutError(f"the KServe front was not ready on port {port} in {timeout_s:.0f}s")


def start(package: Path, config: ServingConfig) -> StackUrls:
    local = config.local
    state_dir = (REPO_ROOT / local.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    live = running(state_dir)
    urls = StackUrls(front=f"http://{local.host}:{local.front_port}",
                     inference=f"http://{local.host}:{local.inference_port}",
                     management=f"http://{local.host}:{local.management_port}")
    if live:
        print(f"serving stack already running ({', '.join(f'{k} pid {v}' for k, v in live.items())}); "
              "`python -m serving.stack stop` first to restart it")
        return urls
    audit_log = (REPO_ROOT / local.audit_log).resolve()
    ports = TorchServePorts(local.inference_port, local.management_port, local.metrics_port,
                            local.grpc_inference_port, local.grpc_management_port)
    torchserve = TorchServe(package, state_dir, ports, host=local.host, audit_log=audit_log,
                            torch_threads=local.torch_threads)
    print(f"starting TorchServe with {package} ...", flush=True)
    torchserve.start()
    try:
        print("starting the KServe front ...", flush=True)
        start_front(torchserve, local.front_port, state_dir, api_keys_file(config, state_dir), config, audit_log)
    except BaseException:
        torchserve.stop()
        raise
    return urls


def stop(config: ServingConfig) -> list[str]:
    state_dir = (REPO_ROOT / config.local.state_dir).resolve()
    stopped = []
    for component, pid in running(state_dir).items():
        stop_process_group(pid)
        stopped.append(f"{component} (pid {pid})")
    for name in PID_FILES.values():
        (state_dir / name).unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--package", type=Path, default=Path("model-package"), help="model package (python -m serving.mar)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    config = ServingConfig.load(args.config)
    state_dir = (REPO_ROOT / config.local.state_dir).resolve()
    if args.action == "stop":
        stopped = stop(config)
        print("stopped " + ", ".join(stopped) if stopped else "serving stack: nothing running")
        return
    if args.action == "status":
        live = running(state_dir)
        print(", ".join(f"{k} pid {v}" for k, v in live.items()) if live else "serving stack: not running")
        return
    urls = start(args.package.resolve(), config)
    keys_file = api_keys_file(config, state_dir)
    name = TorchServe(args.package, state_dir).model_name
    print("\n".join(urls.lines(name)))
    if keys_file:
        callers = ", ".join(load_api_keys(keys_file))
        print(f"API keys            {keys_file}  (callers: {callers}; send a key as X-API-Key)")
    else:
        print(f"API keys            from ${API_KEYS_ENV}")
    print(f"audit log           {(REPO_ROOT / config.local.audit_log).resolve()}")
    print(f"logs                {state_dir}")
    print("stop with           make stop   (python -m serving.stack stop)")


if __name__ == "__main__":
    main()
