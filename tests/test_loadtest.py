"""Locust against a real served model: TorchServe + the KServe front on free ports, every route.

Locust runs as its own process (``python -m loadtest.run`` starts it; its gevent monkey-patching
must never reach the test process), about 10 seconds, headless, and must end with requests on
every route and not one failure. The stack is always stopped. The cheap checks of the workload
(loopback only, weights, what counts as a failed answer) need no server.
"""

from __future__ import annotations

import json
import time
import sys
from pathlib import Path

import pytest

from loadtest import run as loadtest_run
from loadtest.served import served_model
from loadtest.workload import (
    NotLoopbackError,
    Targets,
    check_answer,
    require_loopback,
    route_weights,
    wait_range,
)
from serving.config import PackageConfig
from serving.mar import build_package
from serving.torchserve_process import free_port

pytestmark = pytest.mark.slow

LOCUST_SECONDS = 10


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtest")
    package = build_package(tiny_bundle, root / "model-package", version="lt",
                            config=PackageConfig(workers=1, batch_size=4, max_batch_delay_ms=20))
    with served_model(package.root, root / "stack", torch_threads=1) as stack:
        yield stack


def test_locust_headless_against_the_served_model_has_no_failures(served, data_dir, tmp_path):
    assert "locust" not in sys.modules and "gevent" not in sys.modules
    summary = loadtest_run.run(
        users=4, spawn_rate=4, duration_s=LOCUST_SECONDS, front_url=served.front_url,
        torchserve_url=served.torchserve_url, api_key=served.api_key, token=served.torchserve_token,
        weights={"native": 1, "v1": 1, "v2": 1, "explain": 1}, out=tmp_path, name="smoke", data_dir=data_dir,
        images=6)
    assert "locust" not in sys.modules and "gevent" not in sys.modules

    total, routes = summary["stats"]["total"], summary["stats"]["routes"]
    failures_csv = (tmp_path / "smoke_failures.csv").read_text()
    assert total["failures"] == 0, failures_csv
    assert summary["locust_exit_status"] == 0, (tmp_path / "smoke.log").read_text()[-2000:]
    assert summary["preflight_notes"] == []  # a cnn3 explains: the explain route stayed in
    assert total["requests"] > 0 and total["requests_per_s"] > 0
    assert len(routes) == 4  # native, v1, v2, explain
    assert all(row["requests"] > 0 and row["failures"] == 0 for row in routes.values()), routes
    assert total["p50_ms"] and total["p95_ms"] >= total["p50_ms"]
    for name in ("smoke_stats.csv", "smoke_stats_history.csv", "smoke.html", "smoke_summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "smoke_summary.json").read_text())["stats"]["total"]["requests"] == total["requests"]


def test_a_wrong_answer_counts_as_a_failure():
    assert check_answer("v2", 503, b'{"error": "busy", "code": "model_server_unavailable"}').startswith("status 503")
    assert check_answer("v1", 200, b'{"predictions": []}') == "schema: 0 answers for one image"
    assert check_answer("native", 200, b'{"request_id": "x"}').startswith("schema:")
    assert check_answer("v2", 200, b"not json").startswith("schema:")


def test_only_this_machine_is_a_target(tmp_path):
    assert require_loopback("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    for url in ("http://10.0.0.5:8080", "https://cxr.example.org", "ftp://127.0.0.1"):
        with pytest.raises(NotLoopbackError):
            require_loopback(url)
    with pytest.raises(NotLoopbackError):
        loadtest_run.run(users=1, spawn_rate=1, duration_s=1, front_url="http://192.168.1.9:8080",
                         torchserve_url="http://127.0.0.1:8085", api_key="k", token="t",
                         weights=route_weights({}), out=tmp_path)
    with pytest.raises(ValueError):
        loadtest_run.run(users=10_000, spawn_rate=1, duration_s=1, front_url="http://127.0.0.1:8080",
                         torchserve_url="http://127.0.0.1:8085", api_key="k", token="t",
                         weights=route_weights({}), out=tmp_path)


def test_weights_and_think_time_come_from_the_environment():
    assert route_weights({"CXR_LOADTEST_WEIGHT_EXPLAIN": "0", "CXR_LOADTEST_WEIGHT_V2": "5"})["explain"] == 0
    assert loadtest_run.parse_weights("v2=5,explain=0") == {"native": 3, "v1": 3, "v2": 5, "explain": 0}
    command = loadtest_run.locust_command(2, 1, 5, Path("/tmp/x"), {"native": 0, "v1": 1, "v2": 1, "explain": 0})
    assert command[-2:] == ["KServeV1User", "KServeV2User"] and "--headless" in command and "/tmp/x" in command
    assert wait_range({"CXR_LOADTEST_WAIT_S": "0.5,2"}) == (0.5, 2.0)
    assert wait_range({}) == (0.0, 0.0)


def test_a_stopped_stack_fails_before_locust_starts(data_dir, tmp_path):
    port = free_port()
    targets = Targets(front_url=f"http://127.0.0.1:{port}", torchserve_url=f"http://127.0.0.1:{port}", api_key="k",
                      torchserve_token="t", model_name="cxr-screen", data_dir=data_dir, n_images=1,
                      explain_method="gradcam")
    with pytest.raises(loadtest_run.PreflightError, match="not answering"):
        loadtest_run.preflight(targets, route_weights({}))
    assert not list(tmp_path.iterdir())


def test_committed_bench_report_is_generated_from_its_json():
    """reports/bench: bench.json has the numbers the issue asks for, computed against the best raw point
    of the whole matrix, and bench.md is its rendering, untouched."""
    from loadtest.bench import REPO_ROOT, ServingKnobs, best_level, headline, raw_best, raw_single_forward
    from loadtest.bench_report import bench_markdown
    from serving.config import ServingConfig

    report = json.loads((REPO_ROOT / "reports" / "bench" / "bench.json").read_text())
    for key in ("best_ratio", "raw_best_images_per_s", "served_best_images_per_s", "p95_ms_single", "quiet"):
        assert key in report, key
    assert report["raw_best_images_per_s"] == max(row["images_per_s"] for row in report["raw"])
    assert report["best_ratio"] == round(report["served_best_images_per_s"] / report["raw_best_images_per_s"], 3)
    assert {row["runtime"] for row in report["raw"]} >= {"torch", "onnxruntime"}
    assert {(row["processes"], row["threads"]) for row in report["raw"]} >= {(1, 1), (1, 2), (2, 1)}
    assert report["load"]["quiet"] is report["quiet"]
    assert headline(report) == {key: report[key] for key in headline(report)}  # nothing edited by hand
    assert (REPO_ROOT / "reports" / "bench" / "bench.md").read_text() == bench_markdown(report)
    assert bench_markdown(report).startswith("Measured on a quiet machine" if report["quiet"] else "**NOT A QUIET RUN")

    raw = [{"runtime": "torch", "processes": 1, "threads": 1, "batch_size": 1, "images_per_s": 20.0},
           {"runtime": "onnxruntime", "processes": 2, "threads": 1, "batch_size": 8, "images_per_s": 50.0},
           {"runtime": "onnxruntime", "processes": 1, "threads": 2, "batch_size": 1, "images_per_s": 40.0}]
    assert raw_best(raw)["images_per_s"] == 50.0  # nobody picks the denominator
    assert raw_single_forward(raw)["images_per_s"] == 40.0  # one process, one image
    levels = [{"concurrency": 1, "images_per_s": 9.0, "failures": 0},
              {"concurrency": 4, "images_per_s": 12.0, "failures": 1},
              {"concurrency": 8, "images_per_s": 11.0, "failures": 0}]
    assert best_level(levels)["concurrency"] == 8  # a level with failures never wins
    knobs = ServingKnobs.defaults(ServingConfig.load())
    assert knobs.netty_threads >= 1 and knobs.compute_threads == knobs.workers * knobs.torch_threads


def test_load_monitor_counts_other_processes_not_its_own(tmp_path):
    """A busy child of the benchmark is its own load; a busy stranger makes the run not quiet."""
    import subprocess
    import sys

    from loadtest.measure import LoadMonitor

    spinner = tmp_path / "spin.py"
    spinner.write_text("import time\nt = time.time()\nwhile time.time() - t < 3.5:\n    pass\n")
    with LoadMonitor(interval_s=1.0) as own:
        subprocess.run([sys.executable, str(spinner)], check=True)  # a child: part of the benchmark
        # a grandchild seen as ours, then orphaned (its parent exits, as a stopping stack's worker does)
        subprocess.run(["bash", "-c", f"'{sys.executable}' '{spinner}' >/dev/null 2>&1 & sleep 1.5"], check=True)
        time.sleep(2.5)
    # bash starts the spinner in the background and exits: it is reparented, no longer ours
    subprocess.run(["bash", "-c", f"'{sys.executable}' '{spinner}' >/dev/null 2>&1 &"], check=True)
    with LoadMonitor(interval_s=1.0) as other:
        time.sleep(2.5)
    assert own.summary()["background_cores_max"] < 0.5
    assert other.summary()["background_cores_max"] > 0.6 and other.summary()["quiet"] is False
