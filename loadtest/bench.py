"""``make bench``: the model alone every way this machine runs it, against the served answer.

    python -m loadtest.bench [--bundle DIR] [--config configs/bench.yaml] [--out reports/bench]

In one run on this machine (settings in ``configs/bench.yaml``), while :class:`loadtest.measure.LoadMonitor`
records the load average before, during and after and what other processes used:

1. the model alone (:mod:`loadtest.raw`, fresh processes per point): the forward pass per runtime
   (PyTorch eager, channels_last, TorchScript frozen, ONNX Runtime as served and spinning), per
   layout (1 x 1, 1 x N threads, N processes x 1) and batch size; then the in-process pipeline,
   bytes -> Prediction (decode, lung segmenter, crop, forward, gate, policy) per layout;
2. tuning: coordinate descent over TorchServe's workers, threads per worker, batchSize,
   maxBatchDelay and netty threads from ``configs/serving.yaml``'s defaults; incumbent and
   candidate stacks are up together and measured in alternating windows (A B B A ...);
3. before / after: a stack with the defaults and one with the tuned knobs, loaded in alternation
   by closed-loop callers at increasing concurrency on TorchServe's native route and the KServe
   front's v2 route, binary tensor extension and JSON (images/s, p50/p95/p99; every answer checked);
   then the best raw point again, to see whether the machine drifted.

Ratios are end-to-end images/s over the BEST raw point of the whole matrix (nobody chooses the
denominator), and over the in-process pipeline's best (what is left to serving). ``bench.json``
holds everything with ``quiet``, ``raw_best_images_per_s``, ``served_best_images_per_s``,
``best_ratio``, ``p95_ms_single`` and ``targets`` on top; ``bench.md`` is generated from it
(:mod:`loadtest.bench_report`). Every stack is private: free ports, its own API key and audit log.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from cxr_core.bundle import Predictor, load_bundle
from cxr_core.preprocess import prepare_image
from loadtest.bench_report import bench_markdown
from loadtest.measure import LoadMonitor, closed_loop, preprocess_rate
from loadtest.raw import pipeline_matrix, raw_forward_matrix
from loadtest.served import served_model
from loadtest.workload import DEFAULT_DATA_DIR, PreparedImage, Route, Targets, prepare_images, radiographs
from serving.config import ServingConfig
from serving.mar import build_package, config_properties

log = logging.getLogger("loadtest.bench")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BENCH_CONFIG = REPO_ROOT / "configs" / "bench.yaml"
BenchRoute = Literal["torchserve", "front_v1", "front_v2", "front_v2_binary"]
ROUTE_OF: dict[str, Route] = {"torchserve": "native", "front_v1": "v1", "front_v2": "v2", "front_v2_binary": "v2_binary"}
Knob = Literal["workers", "torch_threads", "batch_size", "max_batch_delay_ms", "netty_threads"]
STACK_ERRORS = (RuntimeError, TimeoutError, OSError)  # a setting TorchServe or the front cannot start with


# ------------------------------------------------------------------------------ configuration

class RawConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_sizes: list[int] = [1, 8]
    runtimes: list[str] | None = None  # None: every runtime of loadtest.raw.TORCH_RUNTIMES
    seconds: float = Field(3.0, gt=0)
    pipeline_seconds: float = Field(5.0, gt=0)


class EndToEndConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[BenchRoute] = ["torchserve", "front_v2_binary", "front_v2"]
    concurrency: list[int] = [1, 2, 4, 8, 16]
    seconds: float = Field(10.0, gt=0)
    min_requests: int = Field(50, ge=0)


class TuningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    route: BenchRoute = "front_v2"
    concurrency: list[int] = [8]
    seconds: float = Field(5.0, gt=0)
    repeats: int = Field(3, ge=1)
    min_gain: float = Field(0.05, ge=0)
    max_minutes: float = Field(15.0, gt=0)
    max_compute_threads: int | None = None
    knobs: dict[Knob, list[int]] = {}


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle_candidates: list[str] = ["runs/train-all/efficientnet_lite0-probe-*/bundle", "runs/train-all/cnn3-*/bundle"]
    images: int = Field(32, ge=1)
    raw: RawConfig = RawConfig()
    preprocess_seconds: float = Field(5.0, gt=0)
    end_to_end: EndToEndConfig = EndToEndConfig()
    tuning: TuningConfig = TuningConfig()

    @classmethod
    def load(cls, path: Path | str) -> "BenchConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


@dataclass(frozen=True)
class ServingKnobs:
    """The TorchServe settings the benchmark varies."""

    workers: int
    batch_size: int
    max_batch_delay_ms: int
    torch_threads: int
    netty_threads: int

    @classmethod
    def defaults(cls, config: ServingConfig) -> "ServingKnobs":
        """configs/serving.yaml's package + local defaults, and the netty threads `serving.mar` writes."""
        properties = config_properties(config.package, "1")
        netty = re.search(r"^number_of_netty_threads=(\d+)$", properties, flags=re.MULTILINE)
        return cls(workers=config.package.workers, batch_size=config.package.batch_size,
                   max_batch_delay_ms=config.package.max_batch_delay_ms,
                   torch_threads=config.local.torch_threads or 1,
                   netty_threads=int(netty.group(1)) if netty else 4)

    @property
    def compute_threads(self) -> int:
        return self.workers * self.torch_threads

    def label(self) -> str:
        return (f"workers={self.workers} batch={self.batch_size} delay={self.max_batch_delay_ms}ms "
                f"torch_threads={self.torch_threads} netty={self.netty_threads}")


# ------------------------------------------------------------------------------ small pieces

def find_bundle(candidates: list[str], root: Path = REPO_ROOT) -> Path:
    """The newest bundle matching the first pattern that matches any."""
    for pattern in candidates:
        found = [Path(path) for path in glob.glob(str(root / pattern)) if (Path(path) / "bundle.json").exists()]
        if found:
            return max(found, key=lambda path: (path / "bundle.json").stat().st_mtime)
    raise FileNotFoundError(f"no bundle matches {candidates}; train one (make train-all) or pass --bundle DIR")


def describe_bundle(bundle: Path, predictor: Predictor) -> dict[str, Any]:
    manifest = predictor.manifest
    parameters = sum(p.numel() for p in predictor.torch_model.parameters()) if predictor.torch_model is not None else None
    shown = str(bundle.relative_to(REPO_ROOT)) if bundle.is_relative_to(REPO_ROOT) else str(bundle)
    return {"path": shown, "family": manifest.model.name, "training_mode": manifest.model.training_mode,
            "image_size": manifest.preprocess.image_size, "parameters": parameters, "classes": manifest.classes}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "accelerator": f"none, CPU only (torch.cuda.is_available() = {torch.cuda.is_available()})"}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def raw_best(raw_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best raw point of the whole matrix (every runtime, layout and batch): the ratios' denominator."""
    return max(raw_rows, key=lambda row: row["images_per_s"])


def raw_single_forward(raw_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest one-image forward of one process (any runtime and thread count): the latency floor."""
    singles = [row for row in raw_rows if row["processes"] == 1 and row["batch_size"] == 1] or raw_rows
    return max(singles, key=lambda row: row["images_per_s"])


def best_level(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The concurrency level with the most good images/s (levels with failures do not count)."""
    clean = [level for level in levels if level["failures"] == 0 and level["images_per_s"] > 0]
    return max(clean, key=lambda level: level["images_per_s"]) if clean else None


class PackageCache:
    """One model package per (workers, batchSize, maxBatchDelay), built on first use."""

    def __init__(self, bundle: Path, root: Path, serving: ServingConfig):
        self.bundle, self.root, self.serving = bundle, root, serving
        self.built: dict[tuple[int, int, int], Path] = {}

    def package(self, knobs: ServingKnobs) -> Path:
        key = (knobs.workers, knobs.batch_size, knobs.max_batch_delay_ms)
        if key not in self.built:
            config = self.serving.package.model_copy(update={"workers": knobs.workers, "batch_size": knobs.batch_size,
                                                             "max_batch_delay_ms": knobs.max_batch_delay_ms})
            out = self.root / f"package-w{key[0]}-b{key[1]}-d{key[2]}"
            self.built[key] = build_package(self.bundle, out, version="bench", config=config).root
        return self.built[key]


# ------------------------------------------------------------------------------ the benchmark

@dataclass
class Bench:
    config: BenchConfig
    predictor: Predictor
    pixels: np.ndarray
    images: list[PreparedImage]
    packages: PackageCache
    scratch: Path
    runs: int = 0

    def start(self, knobs: ServingKnobs, stacks: ExitStack) -> Targets:
        """A private TorchServe + front with ``knobs``, stopped when ``stacks`` closes."""
        self.runs += 1
        log.info("starting a stack: %s", knobs.label())
        served = stacks.enter_context(served_model(self.packages.package(knobs), self.scratch / f"stack-{self.runs}",
                                                   torch_threads=knobs.torch_threads,
                                                   netty_threads=knobs.netty_threads))
        return Targets(front_url=served.front_url, torchserve_url=served.torchserve_url, api_key=served.api_key,
                       torchserve_token=served.torchserve_token, model_name=served.model_name,
                       data_dir=DEFAULT_DATA_DIR, n_images=len(self.images), explain_method="gradcam")

    def level(self, targets: Targets, route: str, concurrency: int, seconds: float, min_requests: int = 0,
              warmup: int = 2) -> dict[str, Any]:
        measured = closed_loop(targets, ROUTE_OF[route], self.images, concurrency, seconds,
                               warmup_per_caller=warmup, min_requests=min_requests)
        measured["load_average_1m"] = load_average()
        return measured

    # -- tuning: A/B windows against the incumbent -----------------------------------------------

    def duel(self, incumbent: Targets, candidate: Targets) -> dict[str, Any]:
        """Alternating windows (A B, B A, ...) at each tuning concurrency; medians of images/s."""
        tuning = self.config.tuning
        rates: dict[str, list[float]] = {"incumbent": [], "candidate": []}
        failures = {"incumbent": 0, "candidate": 0}
        p95: list[float] = []
        sides = {"incumbent": incumbent, "candidate": candidate}
        for repeat in range(tuning.repeats):
            order = ("incumbent", "candidate") if repeat % 2 == 0 else ("candidate", "incumbent")
            for side in order:
                window = [self.level(sides[side], tuning.route, level, tuning.seconds, warmup=1)
                          for level in tuning.concurrency]
                rates[side].append(statistics.fmean(level["images_per_s"] for level in window))
                failures[side] += sum(level["failures"] for level in window)
                if side == "candidate":
                    p95 += [level["p95_ms"] for level in window if level["p95_ms"] is not None]
        return {"incumbent_images_per_s": round(statistics.median(rates["incumbent"]), 2),
                "candidate_images_per_s": round(statistics.median(rates["candidate"]), 2),
                "windows": rates, "failures": failures, "candidate_p95_ms": max(p95) if p95 else None}

    def tune(self, start: ServingKnobs) -> dict[str, Any]:
        """Coordinate descent; each knob in turn keeps the value that wins its duel by ``min_gain``."""
        tuning = self.config.tuning
        cap = tuning.max_compute_threads or os.cpu_count() or 1
        deadline = time.monotonic() + 60.0 * tuning.max_minutes
        trials: list[dict[str, Any]] = []
        tried = {start}
        incumbent, stopped_early = start, False
        incumbent_stack = ExitStack()
        try:
            incumbent_targets = self.start(incumbent, incumbent_stack)
            for knob, values in tuning.knobs.items():
                for value in values:
                    candidate = replace(incumbent, **{knob: value})
                    if candidate in tried:
                        continue
                    tried.add(candidate)
                    if candidate.compute_threads > cap:
                        trials.append({"trial": len(trials) + 1, "varied": knob, "knobs": asdict(candidate),
                                       "skipped": f"workers x torch threads = {candidate.compute_threads} > {cap} cores"})
                        continue
                    if time.monotonic() > deadline:
                        stopped_early = True
                        break
                    row: dict[str, Any] = {"trial": len(trials) + 1, "varied": knob, "knobs": asdict(candidate),
                                           "against": asdict(incumbent)}
                    trials.append(row)
                    candidate_stack, kept = ExitStack(), False
                    try:
                        candidate_targets = self.start(candidate, candidate_stack)
                        row.update(self.duel(incumbent_targets, candidate_targets))
                        row["gain"] = round(row["candidate_images_per_s"] / max(row["incumbent_images_per_s"], 1e-9) - 1, 3)
                        row["accepted"] = kept = row["gain"] > tuning.min_gain and row["failures"]["candidate"] == 0
                        log.info("trial %d %s: %.2f vs %.2f images/s (%+.0f%%)%s", row["trial"], candidate.label(),
                                 row["candidate_images_per_s"], row["incumbent_images_per_s"], 100 * row["gain"],
                                 "  <- kept" if kept else "")
                        if kept:
                            incumbent_stack.close()
                            incumbent, incumbent_stack, incumbent_targets = candidate, candidate_stack, candidate_targets
                    except STACK_ERRORS as error:
                        row["error"] = str(error).splitlines()[0][:300]
                        log.warning("trial %d (%s) failed: %s", row["trial"], candidate.label(), row["error"])
                    finally:
                        if not kept:
                            candidate_stack.close()
                if stopped_early:
                    break
        finally:
            incumbent_stack.close()
        return {"route": tuning.route, "concurrency": tuning.concurrency, "seconds_per_window": tuning.seconds,
                "repeats": tuning.repeats, "min_gain": tuning.min_gain, "max_compute_threads": cap,
                "defaults": asdict(start), "trials": trials, "best_knobs": asdict(incumbent),
                "stopped_early": stopped_early}

    # -- before / after ----------------------------------------------------------------------------

    def compare(self, before: ServingKnobs, after: ServingKnobs) -> dict[str, Any]:
        """Both stacks up at once and loaded in alternation, level by level, on every route."""
        e2e = self.config.end_to_end
        results: dict[str, dict[str, list[dict[str, Any]]]] = {"before": {}, "after": {}}
        with ExitStack() as stacks:
            targets = {"before": self.start(before, stacks), "after": self.start(after, stacks)}
            for route in e2e.routes:
                for phase in results:
                    results[phase][route] = []
                for index, concurrency in enumerate(e2e.concurrency):
                    order = ("before", "after") if index % 2 == 0 else ("after", "before")
                    for phase in order:
                        measured = self.level(targets[phase], route, concurrency, e2e.seconds,
                                              min_requests=e2e.min_requests if concurrency == 1 else 0)
                        results[phase][route].append(measured)
                        log.info("%-6s %-15s c=%-3d %7.2f images/s  p50 %7.1f  p95 %7.1f  p99 %7.1f ms  failures %d",
                                 phase, route, concurrency, measured["images_per_s"], measured["p50_ms"] or -1,
                                 measured["p95_ms"] or -1, measured["p99_ms"] or -1, measured["failures"])
        phases = {}
        for phase, knobs in (("before", before), ("after", after)):
            best = {route: best_level(levels) for route, levels in results[phase].items()}
            single = {route: next((level for level in levels if level["concurrency"] == 1), None)
                      for route, levels in results[phase].items()}
            phases[phase] = {"knobs": asdict(knobs), "end_to_end": results[phase], "best": best,
                             "single": single}
        return phases


def hop_costs(pipeline_single_ms: float, single: dict[str, dict[str, Any] | None]) -> dict[str, float | None]:
    """What each hop adds to one request's median latency (concurrency 1), in ms."""
    def p50(route: str) -> float | None:
        level = single.get(route)
        return level["p50_ms"] if level else None

    native, binary, json_v2 = p50("torchserve"), p50("front_v2_binary"), p50("front_v2")
    return {
        "model_in_process_ms": round(pipeline_single_ms, 1),
        "torchserve_http_jvm_worker_ms": round(native - pipeline_single_ms, 1) if native is not None else None,
        "front_v2_binary_parse_and_forward_ms": round(binary - native, 1) if None not in (binary, native) else None,
        "v2_json_base64_over_binary_ms": round(json_v2 - binary, 1) if None not in (json_v2, binary) else None,
    }


def served_figures(phase: dict[str, Any], raw_top: dict[str, Any], pipeline_top: dict[str, Any]) -> dict[str, Any]:
    """Per route: the best images/s and its ratios to the best raw forward and the in-process pipeline."""
    return {route: {"images_per_s": level["images_per_s"], "concurrency": level["concurrency"],
                    "ratio_vs_raw_best": round(level["images_per_s"] / raw_top["images_per_s"], 3),
                    "ratio_vs_pipeline_best": round(level["images_per_s"] / pipeline_top["images_per_s"], 3)}
            for route, level in phase["best"].items() if level}


def prepared_pixels(images: list[PreparedImage], predictor: Predictor) -> np.ndarray:
    return np.stack([prepare_image(image.raw, predictor.manifest.preprocess).pixels for image in images])


def run_bench(bundle: Path, config: BenchConfig, data_dir: Path, serving: ServingConfig, scratch: Path,
              tune: bool = True) -> dict[str, Any]:
    started = time.monotonic()
    predictor = load_bundle(bundle)
    images = prepare_images(radiographs(data_dir, config.images))
    pixels = prepared_pixels(images, predictor)
    cpus = os.cpu_count() or 1
    bench = Bench(config, predictor, pixels, images, PackageCache(bundle, scratch / "packages", serving), scratch)
    report: dict[str, Any] = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "what": "the model alone every way it runs (raw forward matrix, in-process pipeline) vs served end to end "
                "(TorchServe native, KServe front v2 binary and JSON), one machine, one run",
        "bundle": {**describe_bundle(bundle, predictor), "runtime": predictor.manifest.runtime},
        "machine": machine(),
        "images": {"count": len(images), "from": str(data_dir / "test"), "names": [image.name for image in images]},
        "config": config.model_dump(),
    }
    log.info("bundle %s (%s, runtime %s); %d images", report["bundle"]["path"], report["bundle"]["family"],
             predictor.manifest.runtime, len(images))
    with LoadMonitor() as monitor:
        report["preprocess"] = preprocess_rate(images, predictor, config.preprocess_seconds)
        log.info("preprocess  %.2f images/s on one thread", report["preprocess"]["images_per_s"])
        report["raw"] = raw_forward_matrix(bundle, pixels, config.raw.batch_sizes, cpus, config.raw.seconds,
                                           config.raw.runtimes)
        report["pipeline"] = pipeline_matrix(bundle, [image.raw for image in images], cpus,
                                             config.raw.pipeline_seconds)
        defaults = tuned = ServingKnobs.defaults(serving)
        if tune and config.tuning.enabled:
            report["tuning"] = bench.tune(defaults)
            tuned = ServingKnobs(**report["tuning"]["best_knobs"])
        report.update(bench.compare(defaults, tuned))
        top = raw_best(report["raw"])  # re-measured after the sweeps: did the machine drift?
        report["raw_best_after_sweeps"] = raw_forward_matrix(bundle, pixels, [top["batch_size"]], cpus,
                                                             config.raw.seconds, [top["runtime"]],
                                                             only=(top["processes"], top["threads"]))[0]
    report["load"] = monitor.summary()
    report.update(headline(report))
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue names, each against its target, from this run only."""
    top, single_raw = raw_best(report["raw"]), raw_single_forward(report["raw"])
    pipeline_top = max(report["pipeline"], key=lambda row: row["images_per_s"])
    pipeline_single = next(row for row in report["pipeline"] if row["processes"] == 1 and row["threads"] == 1)
    after = report["after"]
    served = served_figures(after, top, pipeline_top)
    v2 = served.get("front_v2")
    single = after["single"].get("front_v2")
    p95 = single["p95_ms"] if single else None
    raw_single_ms = round(1000.0 / single_raw["images_per_s"] * single_raw["batch_size"], 2)
    targets = {
        "served_v2_vs_raw_best": {"target": ">= 0.85", "measured": v2["ratio_vs_raw_best"] if v2 else None},
        "served_v2_images_per_s": {"target": ">= 45", "measured": v2["images_per_s"] if v2 else None},
        "p95_ms_single_v2": {"target": f"<= raw single forward {raw_single_ms} ms + 10", "measured": p95},
    }
    targets["served_v2_vs_raw_best"]["met"] = bool(v2) and v2["ratio_vs_raw_best"] >= 0.85
    targets["served_v2_images_per_s"]["met"] = bool(v2) and v2["images_per_s"] >= 45
    targets["p95_ms_single_v2"]["met"] = p95 is not None and p95 <= raw_single_ms + 10
    return {
        "quiet": report["load"]["quiet"],
        "raw_best": top, "raw_best_images_per_s": top["images_per_s"],
        "raw_single_forward": single_raw, "raw_single_forward_ms": raw_single_ms,
        "pipeline_best": pipeline_top,
        "served": served, "served_before_tuning": served_figures(report["before"], top, pipeline_top),
        "served_best_images_per_s": v2["images_per_s"] if v2 else None,
        "best_ratio": v2["ratio_vs_raw_best"] if v2 else None,
        "p95_ms_single": p95,
        "hop_costs_ms": hop_costs(pipeline_single["ms_per_image_per_process"], after["single"]),
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: configs/bench.yaml bundle_candidates)")
    parser.add_argument("--config", type=Path, default=DEFAULT_BENCH_CONFIG)
    parser.add_argument("--serving-config", type=Path, default=None, help="defaults to tune from (configs/serving.yaml)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR") or DEFAULT_DATA_DIR))
    parser.add_argument("--no-tune", action="store_true", help="skip tuning: before and after both use the defaults")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench")
    parser.add_argument("--render", type=Path, metavar="BENCH_JSON",
                        help="measure nothing: regenerate bench.md in --out from an existing bench.json")
    args = parser.parse_args(argv)
    if args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.md").write_text(bench_markdown(json.loads(args.render.read_text())))
        print(f"-> {args.out / 'bench.md'}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = BenchConfig.load(args.config)
    bundle = (args.bundle or find_bundle(config.bundle_candidates)).resolve()
    serving = ServingConfig.load(args.serving_config)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as scratch:
        report = run_bench(bundle, config, args.data_dir.resolve(), serving, Path(scratch), tune=not args.no_tune)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "bench.md").write_text(bench_markdown(report))
    print(bench_markdown(report))
    print(f"-> {args.out / 'bench.json'}, {args.out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
