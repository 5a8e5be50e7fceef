"""``make loadtest``: Locust headless, as its own process, against the served model on 127.0.0.1.

    python -m loadtest.run --users 8 --duration 60                    # against `make serve`
    python -m loadtest.run --users 4 --duration 30 --weights v2=1,explain=0 \\
        --front-url http://127.0.0.1:8080 --torchserve-url http://127.0.0.1:8085

Starts ``locust -f loadtest/locustfile.py --headless`` in its own session (Locust monkey-patches
the standard library with gevent, so it never runs inside this or any test process), waits for it
(run time + a bounded grace period, then the process group is killed), and writes under ``--out``:
``<name>_stats.csv`` / ``_stats_history.csv`` / ``_failures.csv`` / ``_exceptions.csv`` (Locust),
``<name>.html`` (Locust's report) and ``<name>_summary.json`` + ``<name>_summary.md`` (users,
requests/s, p50/p95/p99, failures, per route). Credentials: the front's API key from ``--api-key-file``,
``$CXR_API_KEY`` or the local stack's generated key file; TorchServe's inference token from
``$CXR_TORCHSERVE_TOKEN`` or the local stack's ``key_file.json``. They reach Locust through its
environment, never its command line. Before Locust starts, one checked request per route (a stopped
stack or a wrong key fails in a second; a model without explanations, such as a HOG champion,
drops the explain route with a note). Exit status: Locust's (1 when any request failed), 2 when no
request was made at all, 3 when the pre-flight requests failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from loadtest.workload import (
    ENV_API_KEY,
    ENV_DATA_DIR,
    ENV_EXPLAIN_METHOD,
    ENV_FRONT_URL,
    ENV_IMAGES,
    ENV_MODEL_NAME,
    ENV_TORCHSERVE_TOKEN,
    ENV_TORCHSERVE_URL,
    ENV_WAIT_S,
    ROUTES,
    WEIGHT_ENV_PREFIX,
    Targets,
    check_answer,
    prepare_images,
    radiographs,
    require_loopback,
    route_weights,
)
from cxr_core.reporting import markdown_table
from serving.client import api_key_from_file
from serving.config import DEFAULT_CONFIG, ServingConfig
from serving.torchserve_process import TorchServeKeys, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
USER_CLASSES = {"native": "TorchServeNativeUser", "v1": "KServeV1User", "v2": "KServeV2User",
                "explain": "KServeExplainUser"}
MAX_USERS = 64
MAX_DURATION_S = 1800
GRACE_S = 90.0  # Locust start-up (imports, images) and shutdown beyond the run time


def parse_weights(text: str | None) -> dict[str, int]:
    """``"v2=3,explain=1"`` -> every route's weight (routes not named keep their default)."""
    weights = route_weights({})
    for part in filter(None, (text or "").split(",")):
        route, _, value = part.partition("=")
        route = route.strip().lower()
        if route not in ROUTES or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"weights: {part!r} is not <route>=<int> with route in {ROUTES}")
        weights[route] = int(value)
    if not any(weights.values()):
        raise argparse.ArgumentTypeError("weights: at least one route needs a weight above 0")
    return weights


def locust_command(users: int, spawn_rate: float, duration_s: int, prefix: Path, weights: dict[str, int]) -> list[str]:
    classes = [USER_CLASSES[route] for route in ROUTES if weights[route] > 0]
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--users", str(users),
            "--spawn-rate", str(spawn_rate), "--run-time", f"{duration_s}s", "--stop-timeout", "30",
            "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
            "--loglevel", "WARNING", *classes]


def locust_environment(front_url: str, torchserve_url: str, api_key: str, token: str, weights: dict[str, int],
                       data_dir: Path, images: int, wait_s: str, explain_method: str, model_name: str) -> dict[str, str]:
    environment = {**os.environ, ENV_FRONT_URL: require_loopback(front_url),
                   ENV_TORCHSERVE_URL: require_loopback(torchserve_url), ENV_API_KEY: api_key,
                   ENV_TORCHSERVE_TOKEN: token, ENV_DATA_DIR: str(data_dir), ENV_IMAGES: str(images),
                   ENV_WAIT_S: wait_s, ENV_EXPLAIN_METHOD: explain_method, ENV_MODEL_NAME: model_name,
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    environment.update({WEIGHT_ENV_PREFIX + route.upper(): str(weight) for route, weight in weights.items()})
    return environment


def run_locust(command: list[str], environment: dict[str, str], timeout_s: float, log_path: Path) -> int:
    """Run Locust in its own session; kill its process group if it outlives ``timeout_s``."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_group(process.pid, timeout_s=10)
            process.wait(timeout=10)
            raise TimeoutError(f"Locust ran past {timeout_s:.0f}s and was stopped; see {log_path}") from None
        finally:
            if process.poll() is None:
                stop_process_group(process.pid, timeout_s=10)


class PreflightError(RuntimeError):
    """The served model cannot take the load test as asked (not running, wrong key, ...)."""


def preflight(targets: Targets, weights: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """One checked request per route before Locust starts: a wrong key or a stopped stack fails
    here in a second, not as a minute of failures. A model without explanations (a HOG bundle)
    takes the explain route out of the mix, with a note."""
    image = prepare_images(radiographs(targets.data_dir, 1), targets.explain_method)[0]
    weights, notes = dict(weights), []
    with httpx.Client(timeout=120.0) as client:
        for route in [route for route in ROUTES if weights[route] > 0]:
            url = targets.base_url(route) + targets.path(route)
            try:
                response = client.post(url, content=image.body(route),
                                       headers={**targets.headers(route), "X-Request-Id": "loadtest-preflight"})
            except httpx.HTTPError as error:
                raise PreflightError(f"{route}: {url} is not answering ({type(error).__name__}); "
                                     "is the stack running (make serve)?") from None
            unexplainable = b'"explanations_unavailable"' in response.content
            if route == "explain" and 400 <= response.status_code < 500 and unexplainable:
                weights["explain"] = 0
                notes.append("the served model has no explanations (a HOG bundle): explain route left out")
                continue
            problem = check_answer(route, response.status_code, response.content, targets.model_name)
            if problem:
                raise PreflightError(f"{route}: {url} -> {problem}")
    if not any(weights.values()):
        raise PreflightError("no route left to load")
    return weights, notes


def _number(value: str) -> float | None:
    """Locust writes "N/A" for the percentiles of a route with no requests."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def read_locust_stats(stats_csv: Path) -> dict:
    """Locust's ``<prefix>_stats.csv`` -> {"total": {...}, "routes": {name: {...}}}."""
    rows = {}
    with open(stats_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["Name"]] = {
                "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "requests_per_s": round(_number(row["Requests/s"]) or 0.0, 3),
                "failures_per_s": round(_number(row["Failures/s"]) or 0.0, 3),
                "p50_ms": _number(row["50%"]), "p95_ms": _number(row["95%"]), "p99_ms": _number(row["99%"]),
                "mean_ms": _number(row["Average Response Time"]), "max_ms": _number(row["Max Response Time"]),
            }
    if "Aggregated" not in rows:
        raise ValueError(f"{stats_csv} has no Aggregated row")
    total = rows.pop("Aggregated")
    return {"total": total, "routes": rows}


def summary_markdown(summary: dict) -> str:
    total = summary["stats"]["total"]
    lines = [
        f"# Locust load test ({summary['measured_at']})",
        "",
        f"{summary['users']} users (spawn rate {summary['spawn_rate']}/s) for {summary['duration_s']} s against "
        f"{summary['front_url']} (KServe front) and {summary['torchserve_url']} (TorchServe); "
        f"route weights {summary['weights']}; think time {summary['wait_s']} s; "
        f"{summary['machine']['cpus']} CPUs, load average {summary['machine']['load_average_1m']}.",
        *([f"", f"Private stack serving `{summary['bundle']}`: {summary['serving']['workers']} TorchServe worker(s) x "
           f"{summary['serving']['torch_threads_per_worker']} thread(s), batchSize {summary['serving']['batch_size']}."]
          if summary.get("bundle") else []),
        "",
        *markdown_table(
            ["route", "requests", "failures", "requests/s", "p50 ms", "p95 ms", "p99 ms"],
            [[name, row["requests"], row["failures"], f"{row['requests_per_s']:.2f}", _ms(row["p50_ms"]),
              _ms(row["p95_ms"]), _ms(row["p99_ms"])]
             for name, row in [*summary["stats"]["routes"].items(), ("all", total)]],
            align="lrrrrrr"),
    ]
    lines += ["", *[f"Note: {note}." for note in summary.get("preflight_notes", [])],
              f"Locust exit status {summary['locust_exit_status']}; HTML report `{summary['html']}`.", ""]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def default_credentials(config: ServingConfig) -> tuple[str, str]:
    """(API key, TorchServe token) of `make serve`: environment first, then the stack's key files."""
    state_dir = (REPO_ROOT / config.local.state_dir).resolve()
    api_key = os.environ.get(ENV_API_KEY, "")
    if not api_key:
        keys_file = Path(config.front.api_keys_file) if config.front.api_keys_file else state_dir / "api_keys.json"
        if keys_file.exists():
            api_key = api_key_from_file(keys_file)
    token = os.environ.get(ENV_TORCHSERVE_TOKEN, "")
    if not token and (state_dir / "key_file.json").exists():
        token = TorchServeKeys.read(state_dir / "key_file.json").inference
    return api_key, token


def run(*, users: int, spawn_rate: float, duration_s: int, front_url: str, torchserve_url: str, api_key: str,
        token: str, weights: dict[str, int], out: Path, name: str = "locust", data_dir: Path | None = None,
        images: int = 24, wait_s: str = "0", explain_method: str = "gradcam", model_name: str = "cxr-screen") -> dict:
    """Run Locust once and return (and write) its summary."""
    if not 1 <= users <= MAX_USERS:
        raise ValueError(f"users must be 1..{MAX_USERS}, got {users}")
    if not 1 <= duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration must be 1..{MAX_DURATION_S} s, got {duration_s}")
    data_dir = Path(data_dir or os.environ.get("DATA_DIR") or REPO_ROOT.parent / "shared" / "data" / "cxr3").resolve()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / name
    for stale in out.glob(f"{name}_*.csv"):
        stale.unlink()
    targets = Targets(front_url=require_loopback(front_url), torchserve_url=require_loopback(torchserve_url),
                      api_key=api_key, torchserve_token=token, model_name=model_name, data_dir=data_dir,
                      n_images=images, explain_method=explain_method)
    weights, notes = preflight(targets, weights)
    environment = locust_environment(front_url, torchserve_url, api_key, token, weights, data_dir, images, wait_s,
                                     explain_method, model_name)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    status = run_locust(locust_command(users, spawn_rate, duration_s, prefix, weights), environment,
                        duration_s + GRACE_S, out / f"{name}.log")
    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.exists():
        tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"Locust wrote no statistics (exit {status}):\n" + "\n".join(tail))
    summary = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "users": users, "spawn_rate": spawn_rate, "duration_s": duration_s, "wall_s": round(time.monotonic() - started, 1),
        "weights": weights, "wait_s": wait_s, "images": images, "front_url": front_url, "torchserve_url": torchserve_url,
        "preflight_notes": notes, "locust_exit_status": status, "html": _shown(Path(f"{prefix}.html")),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "stats": read_locust_stats(stats_csv),
    }
    Path(f"{prefix}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    Path(f"{prefix}_summary.md").write_text(summary_markdown(summary))
    return summary


def run_on_private_stack(bundle: Path, config: ServingConfig, options: dict) -> dict:
    """Package ``bundle`` with the serving config's settings, serve it privately, run Locust, stop it."""
    import tempfile

    from loadtest.served import served_model
    from serving.mar import build_package

    with tempfile.TemporaryDirectory(prefix="cxr-locust-") as scratch:
        package = build_package(Path(bundle), Path(scratch) / "package", version="loadtest", config=config.package)
        with served_model(package.root, Path(scratch) / "stack", torch_threads=config.local.torch_threads) as served:
            summary = run(front_url=served.front_url, torchserve_url=served.torchserve_url, api_key=served.api_key,
                          token=served.torchserve_token, **options)
    summary["bundle"] = str(bundle)
    summary["serving"] = {"workers": config.package.workers, "batch_size": config.package.batch_size,
                          "torch_threads_per_worker": config.local.torch_threads}
    Path(options["out"], f"{options['name']}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    Path(options["out"], f"{options['name']}_summary.md").write_text(summary_markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=4, help=f"concurrent Locust users (1..{MAX_USERS})")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all in 2 s)")
    parser.add_argument("--duration", type=int, default=60, help=f"seconds of load (1..{MAX_DURATION_S})")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serving config (default URLs and key files)")
    parser.add_argument("--front-url", help="KServe front (default: configs/serving.yaml local.front_port)")
    parser.add_argument("--torchserve-url", help="TorchServe inference API (default: local.inference_port)")
    parser.add_argument("--api-key-file", type=Path, help='front API keys {"caller": "key"} (default $CXR_API_KEY, '
                                                          "else the local stack's generated file)")
    parser.add_argument("--weights", type=parse_weights, default=parse_weights(None),
                        help="route shares, e.g. native=3,v1=3,v2=3,explain=1 (0 leaves a route out)")
    parser.add_argument("--wait-s", default="0", help='think time per user: "0" (closed loop) or "min,max"')
    parser.add_argument("--images", type=int, default=24, help="real test images to cycle through")
    parser.add_argument("--explain-method", default="gradcam", choices=("gradcam", "gradcam++"))
    parser.add_argument("--data-dir", type=Path, default=None, help="labelled folder (default $DATA_DIR, the default data)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "loadtest")
    parser.add_argument("--name", default="locust", help="file prefix of the reports")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="serve this bundle on a private stack (configs/serving.yaml's package settings, free "
                             "ports, its own key) for the run, instead of targeting `make serve`")
    args = parser.parse_args(argv)
    config = ServingConfig.load(args.config)
    local = config.local
    options = dict(users=args.users, spawn_rate=args.spawn_rate or max(1.0, args.users / 2), duration_s=args.duration,
                   weights=args.weights, out=args.out, name=args.name, data_dir=args.data_dir, images=args.images,
                   wait_s=args.wait_s, explain_method=args.explain_method, model_name=config.package.model_name)
    try:
        if args.bundle:
            summary = run_on_private_stack(args.bundle, config, options)
        else:
            api_key, token = default_credentials(config)
            if args.api_key_file:
                api_key = api_key_from_file(args.api_key_file)
            summary = run(front_url=args.front_url or f"http://{local.host}:{local.front_port}",
                          torchserve_url=args.torchserve_url or f"http://{local.host}:{local.inference_port}",
                          api_key=api_key, token=token, **options)
    except PreflightError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 3
    print(summary_markdown(summary))
    total = summary["stats"]["total"]
    if total["requests"] == 0:
        return 2
    return summary["locust_exit_status"]


if __name__ == "__main__":
    raise SystemExit(main())
