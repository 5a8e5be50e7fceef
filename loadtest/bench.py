"""``make bench``: where the time goes between the raw model and a served answer, and TorchServe tuning.

    python -m loadtest.bench [--bundle DIR] [--config configs/bench.yaml] [--out reports/bench]

In one run on this machine (settings in ``configs/bench.yaml``):

1. preprocessing: bytes -> tensor images/s on one thread;
2. tuning: coordinate descent over TorchServe's workers, torch threads per worker, batchSize,
   maxBatchDelay and netty threads, one knob at a time from ``configs/serving.yaml``'s defaults.
   The incumbent's stack stays up while each candidate's starts, and the two are measured in
   alternating windows (A B B A ...), so a change in the machine's background load hits both;
   a candidate wins when its median images/s beats the incumbent's by ``min_gain``;
3. before / after: the model alone (forward images/s in this process at batch 1, 8, 32 with 1 and
   all-core torch threads, :func:`loadtest.measure.raw_forward`), then a stack with the defaults
   ("before") and one with the tuned knobs ("after"), both up, loaded in alternation by
   closed-loop callers at increasing concurrency through TorchServe's native route and the KServe
   front's v2 route (images/s, p50/p95/p99; every answer checked), then the model alone again.

The ratio is end-to-end images/s at the best concurrency / the raw *batched* images/s of the same
model (best over batch sizes > 1 and thread counts; per point the median of the raw passes taken
before, between and after the routes' sweeps, so a drift in the background load reaches both sides).
``reports/bench/bench.json`` holds everything, with top-level ``best_ratio`` and ``p95_ms_single``
(the front's v2 route at concurrency 1) of the tuned settings; ``bench.md`` is generated from it
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
from loadtest.measure import closed_loop, preprocess_rate, raw_forward
from loadtest.served import served_model
from loadtest.workload import DEFAULT_DATA_DIR, PreparedImage, Route, Targets, prepare_images, radiographs
from serving.config import ServingConfig
from serving.mar import build_package, config_properties

log = logging.getLogger("loadtest.bench")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BENCH_CONFIG = REPO_ROOT / "configs" / "bench.yaml"
BenchRoute = Literal["torchserve", "front_v1", "front_v2"]
ROUTE_OF: dict[str, Route] = {"torchserve": "native", "front_v1": "v1", "front_v2": "v2"}
Knob = Literal["workers", "torch_threads", "batch_size", "max_batch_delay_ms", "netty_threads"]
STACK_ERRORS = (RuntimeError, TimeoutError, OSError)  # a setting TorchServe or the front cannot start with


# ------------------------------------------------------------------------------ configuration

class RawConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_sizes: list[int] = [1, 8, 32]
    thread_counts: list[int] | None = None
    seconds: float = Field(4.0, gt=0)


class EndToEndConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[BenchRoute] = ["torchserve", "front_v2"]
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


def combine_raw(passes: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (threads, batch): the median images/s of the raw passes taken around and between the sweeps."""
    return [{"threads": rows[0]["threads"], "batch_size": rows[0]["batch_size"],
             "images_per_s": round(statistics.median(row["images_per_s"] for row in rows), 2),
             "passes": [row["images_per_s"] for row in rows]} for rows in zip(*passes)]


def raw_best(raw_rows: list[dict[str, Any]], batched: bool) -> dict[str, Any]:
    """The best raw point: over batch sizes > 1 (``batched``, the ratio's denominator) or over all."""
    rows = [row for row in raw_rows if row["batch_size"] > 1] if batched else raw_rows
    return max(rows or raw_rows, key=lambda row: row["images_per_s"])


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

    def thread_counts(self) -> list[int]:
        return self.config.raw.thread_counts or sorted({1, os.cpu_count() or 1})

    def raw(self) -> list[dict[str, Any]]:
        rows = raw_forward(self.predictor, self.pixels, self.config.raw.batch_sizes, self.thread_counts(),
                           self.config.raw.seconds)
        for row in rows:
            log.info("raw forward  threads=%d batch=%-3d %8.2f images/s", row["threads"], row["batch_size"],
                     row["images_per_s"])
        return rows

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
        """Both stacks loaded in alternation level by level; the raw model before, between and after routes."""
        e2e = self.config.end_to_end
        load_start = load_average()
        raw_passes = [self.raw()]
        results: dict[str, dict[str, list[dict[str, Any]]]] = {"before": {}, "after": {}}
        with ExitStack() as stacks:
            targets = {"before": self.start(before, stacks), "after": self.start(after, stacks)}
            for number, route in enumerate(e2e.routes):
                if number:
                    raw_passes.append(self.raw())
                for phase in results:
                    results[phase][route] = []
                for index, concurrency in enumerate(e2e.concurrency):
                    order = ("before", "after") if index % 2 == 0 else ("after", "before")
                    for phase in order:
                        measured = self.level(targets[phase], route, concurrency, e2e.seconds,
                                              min_requests=e2e.min_requests if concurrency == 1 else 0)
                        results[phase][route].append(measured)
                        log.info("%-6s %-10s c=%-3d %7.2f images/s  p50 %7.1f  p95 %7.1f  p99 %7.1f ms  failures %d",
                                 phase, route, concurrency, measured["images_per_s"], measured["p50_ms"] or -1,
                                 measured["p95_ms"] or -1, measured["p99_ms"] or -1, measured["failures"])
        raw_passes.append(self.raw())
        raw_rows = combine_raw(raw_passes)
        batched, best_any = raw_best(raw_rows, batched=True), raw_best(raw_rows, batched=False)
        phases = {}
        for phase, knobs in (("before", before), ("after", after)):
            best = {route: best_level(levels) for route, levels in results[phase].items()}
            single = next((level for level in results[phase].get("front_v2", []) if level["concurrency"] == 1), None)
            phases[phase] = {
                "knobs": asdict(knobs), "end_to_end": results[phase], "best": best,
                "ratio": {route: round(level["images_per_s"] / batched["images_per_s"], 3) if level else None
                          for route, level in best.items()},
                "ratio_vs_raw_best_any_batch": {
                    route: round(level["images_per_s"] / best_any["images_per_s"], 3) if level else None
                    for route, level in best.items()},
                "p95_ms_single": single["p95_ms"] if single else None,
            }
        return {"raw": raw_rows, "raw_batched_best": batched, "raw_best_any_batch": best_any,
                "load_average_1m": [load_start, load_average()], **phases}


def prepared_pixels(images: list[PreparedImage], predictor: Predictor) -> np.ndarray:
    return np.stack([prepare_image(image.raw, predictor.manifest.preprocess).pixels for image in images])


def run_bench(bundle: Path, config: BenchConfig, data_dir: Path, serving: ServingConfig, scratch: Path,
              tune: bool = True) -> dict[str, Any]:
    started = time.monotonic()
    predictor = load_bundle(bundle)
    images = prepare_images(radiographs(data_dir, config.images))
    bench = Bench(config, predictor, prepared_pixels(images, predictor), images,
                  PackageCache(bundle, scratch / "packages", serving), scratch)
    report: dict[str, Any] = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "what": "raw forward (in process) vs end to end (TorchServe native, KServe front v2), one machine, one run",
        "bundle": describe_bundle(bundle, predictor), "machine": machine(),
        "images": {"count": len(images), "from": str(data_dir / "test"), "names": [image.name for image in images]},
        "config": config.model_dump(),
    }
    log.info("bundle %s (%s); %d images", report["bundle"]["path"], report["bundle"]["family"], len(images))
    report["preprocess"] = preprocess_rate(images, predictor, config.preprocess_seconds)
    log.info("preprocess  %.2f images/s on one thread", report["preprocess"]["images_per_s"])
    defaults = tuned = ServingKnobs.defaults(serving)
    if tune and config.tuning.enabled:
        report["tuning"] = bench.tune(defaults)
        tuned = ServingKnobs(**report["tuning"]["best_knobs"])
    report.update(bench.compare(defaults, tuned))
    report["best_ratio"] = report["after"]["ratio"].get("front_v2")
    report["p95_ms_single"] = report["after"]["p95_ms_single"]
    report["best_ratio_before"] = report["before"]["ratio"].get("front_v2")
    report["p95_ms_single_before"] = report["before"]["p95_ms_single"]
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


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
