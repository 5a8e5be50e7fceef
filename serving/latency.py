"""Single-request latency per protocol against a running stack -> ``reports/serving/latency.json``.

    python -m serving.latency [--n 50] [--out reports/serving/latency.json]

Sends real test images one at a time (no concurrency: the latency a single caller sees) over the
TorchServe native route (with its token) and the KServe front's v1 and v2 routes (with an API key),
and writes p50/p95/mean per protocol, the handler's own time (``latency_ms`` in the answers), the
batching settings and the machine. Defaults read the local stack's ports and key files from
``configs/serving.yaml`` (what ``make serve`` started).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from serving.client import CxrScreenClient, api_key_from_file
from serving.config import DEFAULT_CONFIG, ServingConfig
from serving.torchserve_process import TorchServeKeys

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("native", "v1", "v2")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(client_ms: list[float], server_ms: list[float]) -> dict[str, float]:
    return {"n": len(client_ms), "p50_ms": round(percentile(client_ms, 50), 2), "p95_ms": round(percentile(client_ms, 95), 2),
            "mean_ms": round(statistics.fmean(client_ms), 2), "min_ms": round(min(client_ms), 2),
            "max_ms": round(max(client_ms), 2), "handler_p50_ms": round(percentile(server_ms, 50), 2)}


def measure(client: CxrScreenClient, protocol: str, images: list[bytes], n: int, warmup: int) -> dict[str, float]:
    for index in range(warmup):
        client.predict(images[index % len(images)], protocol=protocol)  # type: ignore[arg-type]
    client_ms, server_ms = [], []
    for index in range(n):
        started = time.perf_counter()
        answer = client.predict(images[index % len(images)], protocol=protocol)  # type: ignore[arg-type]
        client_ms.append((time.perf_counter() - started) * 1000.0)
        server_ms.append(answer.latency_ms)
    return summarize(client_ms, server_ms)


def latency_images(data_dir: Path, count: int = 12) -> list[Path]:
    paths = []
    for label in sorted(p.name for p in (data_dir / "test").iterdir() if p.is_dir()):
        paths += sorted((data_dir / "test" / label).glob("*.jpg"))[: max(1, count // 3)]
    return paths[:count]


def run(front_url: str, api_key: str, torchserve_url: str, token: str, management_url: str | None,
        management_token: str | None, images: list[Path], n: int, warmup: int, protocols=PROTOCOLS,
        torch_threads: int | None = None) -> dict:
    contents = [path.read_bytes() for path in images]
    load_before = os.getloadavg()[0]
    results, model = {}, {}
    if management_url and management_token:
        description = httpx.get(f"{management_url}/models/cxr-screen",
                                headers={"Authorization": f"Bearer {management_token}"}, timeout=10).json()[0]
        model = {key: description.get(key) for key in ("modelName", "modelVersion", "batchSize", "maxBatchDelay",
                                                        "minWorkers", "maxWorkers")}
    for protocol in protocols:
        client = (CxrScreenClient(torchserve_url, bearer=token, request_id_prefix="latency-") if protocol == "native"
                  else CxrScreenClient(front_url, api_key=api_key, request_id_prefix="latency-"))
        with client:
            results[protocol] = measure(client, protocol, contents, n, warmup)
    return {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "what": "single sequential requests, one image each; client wall time per request",
        "routes": {"native": "TorchServe POST /predictions/cxr-screen (raw bytes)",
                   "v1": "KServe front POST /v1/models/cxr-screen:predict (base64 JSON)",
                   "v2": "KServe front POST /v2/models/cxr-screen/infer (BYTES base64)"},
        "model": model,
        "images": [path.name for path in images],
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch_threads_per_worker": torch_threads,
                    "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "note": "single requests wait up to maxBatchDelay for a batch to fill; the handler time is the model's share",
        "protocols": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "cxr3")))
    parser.add_argument("--n", type=int, default=50, help="timed requests per protocol")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("reports/serving/latency.json"))
    args = parser.parse_args(argv)
    config = ServingConfig.load(args.config)
    local = config.local
    state_dir = (REPO_ROOT / local.state_dir).resolve()
    keys = TorchServeKeys.read(state_dir / "key_file.json")
    keys_file = Path(config.front.api_keys_file) if config.front.api_keys_file else state_dir / "api_keys.json"
    api_key = (os.environ.get("CXR_API_KEY") or api_key_from_file(keys_file))
    report = run(f"http://{local.host}:{local.front_port}", api_key, f"http://{local.host}:{local.inference_port}",
                 keys.inference, f"http://{local.host}:{local.management_port}", keys.management,
                 latency_images(args.data_dir), args.n, args.warmup, torch_threads=local.torch_threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for protocol, stats in report["protocols"].items():
        print(f"{protocol:7s} p50 {stats['p50_ms']:7.1f} ms   p95 {stats['p95_ms']:7.1f} ms   (handler p50 {stats['handler_p50_ms']:.1f} ms)")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
