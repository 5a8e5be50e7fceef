"""A private serving stack for measurements: TorchServe + the KServe front on free local ports.

The same two processes ``make serve`` runs (:class:`serving.torchserve_process.TorchServe` and
:func:`serving.stack.start_front`), but in a scratch folder, with a fresh API key and their own
audit log, so a benchmark or a test never touches the local stack or ``logs/audit.jsonl``. Both
are always stopped, also when the measurement fails.

    with served_model(package, scratch / "stack", torch_threads=1, netty_threads=2) as served:
        httpx.post(served.front_url + "/v2/models/cxr-screen/infer", headers={"X-API-Key": served.api_key}, ...)
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.config import ServingConfig
from serving.stack import start_front
from serving.torchserve_process import TorchServe, free_port, stop_process_group

NETTY_THREADS_ENV = "TS_NUMBER_OF_NETTY_THREADS"  # read by TorchServe (enable_envvars_config=true)


@dataclass(frozen=True)
class ServedModel:
    torchserve: TorchServe
    front_url: str
    api_key: str

    @property
    def torchserve_url(self) -> str:
        return self.torchserve.inference_url

    @property
    def torchserve_token(self) -> str:
        return self.torchserve.keys().inference

    @property
    def model_name(self) -> str:
        return self.torchserve.model_name


@contextmanager
def served_model(package: Path, state_dir: Path, *, torch_threads: int | None = 1, netty_threads: int | None = None,
                 timeout_s: float = 300.0) -> Iterator[ServedModel]:
    """TorchServe (token auth on) + the front with one generated API key; stopped on exit."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    api_key = secrets.token_urlsafe(24)
    keys_file = state_dir / "api_keys.json"
    keys_file.write_text(json.dumps({"loadtest": api_key}))
    keys_file.chmod(0o600)
    audit_log = state_dir / "audit.jsonl"
    extra_env = {NETTY_THREADS_ENV: str(netty_threads)} if netty_threads else {}
    torchserve = TorchServe(package, state_dir / "torchserve", audit_log=audit_log, torch_threads=torch_threads,
                            extra_env=extra_env)
    front = None
    try:
        torchserve.start(timeout_s)
        port = free_port()
        front = start_front(torchserve, port, state_dir, keys_file, ServingConfig.load(), audit_log, timeout_s)
        yield ServedModel(torchserve, f"http://127.0.0.1:{port}", api_key)
    finally:
        if front is not None:
            stop_process_group(front.pid)
        torchserve.stop()
