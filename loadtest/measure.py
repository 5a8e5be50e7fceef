"""The three measurements of the benchmark, each bounded in time.

- :func:`raw_forward`: the model's forward pass in this process on a prebuilt batch tensor, per
  batch size and torch thread count: what the model alone can do on this machine.
- :func:`preprocess_rate`: image bytes -> model tensor (decode, crop, resize, normalise), the
  shared core's :func:`cxr_core.preprocess.prepare_image` + :func:`pixels_to_tensor`.
- :class:`LoadMonitor`: the machine's 1-minute load average before, during (sampled) and after a
  run, and whether it stayed quiet (at most 0.5 per core at every sample).
- :func:`closed_loop`: ``concurrency`` callers, each sending its next request as soon as the last
  one is answered, for a fixed time; every answer is checked (:func:`loadtest.workload.check_answer`);
  throughput counts good answers only, latency is the caller's wall time per request.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from cxr_core.bundle import Predictor
from cxr_core.preprocess import pixels_to_tensor, prepare_image
from loadtest.workload import PreparedImage, Route, Targets, check_answer
from serving.latency import percentile


class LoadMonitor:
    """The machine's load while a benchmark runs: is anyone else using the cores?

    The 1-minute load average is recorded before, during (sampled every ``interval_s``) and after,
    but during the run it counts the benchmark's own busy threads (a saturated 2-core run reads
    about 2), so what decides ``quiet`` is what the others used: the CPU time of every process
    outside this process tree, read from ``/proc`` per interval, in cores. Quiet means the load
    average before the run was at most ``quiet_per_core`` per core and the others never used more
    than ``background_per_core`` per core in any interval.
    """

    def __init__(self, interval_s: float = 5.0, quiet_per_core: float = 0.5, background_per_core: float = 0.25):
        import os

        self.cpus = os.cpu_count() or 1
        self.interval_s = interval_s
        self.load_limit, self.background_limit = quiet_per_core * self.cpus, background_per_core * self.cpus
        self.samples: list[dict[str, float]] = []
        self._ours: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    @staticmethod
    def now() -> float:
        import os

        return round(os.getloadavg()[0], 2)

    @staticmethod
    def _cpu_ticks() -> tuple[dict[int, int], dict[int, int]]:
        """Per pid: utime + stime (clock ticks), and its parent."""
        import os

        ticks, parents = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
        return ticks, parents

    def _background_ticks(self) -> dict[int, int]:
        import os

        ticks, parents = self._cpu_ticks()
        ours = {os.getpid()}
        changed = True
        while changed:  # every descendant of this process (TorchServe, its workers, the front, children)
            grown = ours | {pid for pid, parent in parents.items() if parent in ours}
            changed, ours = grown != ours, grown
        # once ours, always ours: a stack's worker orphaned while it stops is reparented to init, and
        # its whole lifetime's CPU would otherwise count as someone else's in one interval
        self._ours.update(ours)
        return {pid: value for pid, value in ticks.items() if pid not in self._ours}

    def _run(self) -> None:
        import os

        hertz = os.sysconf("SC_CLK_TCK")
        previous, then = self._background_ticks(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            current, now = self._background_ticks(), time.monotonic()
            used = sum(value - previous.get(pid, 0) for pid, value in current.items() if value >= previous.get(pid, 0))
            self.samples.append({"t_s": round(now - self._started, 1), "load_1m": self.now(),
                                 "background_cores": round(used / hertz / max(now - then, 1e-6), 3)})
            previous, then = current, now

    def __enter__(self) -> "LoadMonitor":
        self.before = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self.now()

    def summary(self) -> dict[str, Any]:
        loads = [sample["load_1m"] for sample in self.samples]
        background = [sample["background_cores"] for sample in self.samples]
        peak_background = max(background) if background else 0.0
        return {"load_1m_before": self.before, "load_1m_during_max": max(loads) if loads else None,
                "load_1m_during_mean": round(statistics.fmean(loads), 2) if loads else None,
                "load_1m_after": self.after, "background_cores_max": peak_background,
                "background_cores_mean": round(statistics.fmean(background), 3) if background else None,
                "load_limit_before": self.load_limit, "background_limit_cores": self.background_limit,
                "quiet": self.before <= self.load_limit and peak_background <= self.background_limit,
                "samples_every_s": self.interval_s, "samples": self.samples}


def _timed_loop(step, seconds: float, min_iterations: int = 3, max_seconds: float | None = None) -> tuple[int, float]:
    """Call ``step()`` until ``seconds`` passed and ``min_iterations`` ran (never past ``max_seconds``)."""
    max_seconds = max_seconds or 4 * seconds
    iterations, started = 0, time.perf_counter()
    while True:
        step()
        iterations += 1
        elapsed = time.perf_counter() - started
        if (elapsed >= seconds and iterations >= min_iterations) or elapsed >= max_seconds:
            return iterations, elapsed


def batch_of(pixels: np.ndarray, size: int) -> np.ndarray:
    """``size`` prepared images, cycling through ``pixels`` when there are fewer."""
    return pixels[np.arange(size) % len(pixels)]


def raw_forward(predictor: Predictor, pixels: np.ndarray, batch_sizes: list[int], thread_counts: list[int],
                seconds: float) -> list[dict[str, Any]]:
    """Images/s of the model alone (no preprocessing, no HTTP) per (threads, batch size)."""
    rows = []
    previous = torch.get_num_threads()
    model = predictor.torch_model
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for size in batch_sizes:
                batch = batch_of(pixels, size)
                if model is not None:
                    model.eval()
                    tensor = pixels_to_tensor(batch, predictor.manifest.preprocess)

                    def step():
                        with torch.inference_mode():
                            model(tensor)
                else:  # a HOG bundle: features + classifier are its "forward"
                    def step():
                        predictor.logits_from_pixels(batch)
                step()  # warm-up: first-call allocations and kernel selection
                iterations, elapsed = _timed_loop(step, seconds)
                rows.append({"threads": threads, "batch_size": size, "iterations": iterations,
                             "images_per_s": round(iterations * size / elapsed, 2),
                             "ms_per_batch": round(1000.0 * elapsed / iterations, 2)})
    finally:
        torch.set_num_threads(previous)
    return rows


def preprocess_rate(images: list[PreparedImage], predictor: Predictor, seconds: float) -> dict[str, Any]:
    """Images/s of bytes -> tensor on one thread (decode, border crop, resize, quality flags, normalise)."""
    config = predictor.manifest.preprocess
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    cycle = itertools.cycle(images)
    try:
        iterations, elapsed = _timed_loop(lambda: pixels_to_tensor(prepare_image(next(cycle).raw, config).pixels[None],
                                                                   config), seconds, min_iterations=len(images))
    finally:
        torch.set_num_threads(previous)
    sizes = [len(image.raw) for image in images]
    return {"threads": 1, "images": iterations, "images_per_s": round(iterations / elapsed, 2),
            "ms_per_image": round(1000.0 * elapsed / iterations, 2), "image_size": config.image_size,
            "mean_jpeg_kb": round(statistics.fmean(sizes) / 1024, 1)}


@dataclass
class _Caller:
    latencies_ms: list[float]
    ok: int = 0
    failed: int = 0
    first_failure: str | None = None
    last_end: float = 0.0


def closed_loop(targets: Targets, route: Route, images: list[PreparedImage], concurrency: int, seconds: float,
                warmup_per_caller: int = 1, min_requests: int = 0) -> dict[str, Any]:
    """``concurrency`` callers in a closed loop for ``seconds`` (and at least ``min_requests`` in all)."""
    url = targets.base_url(route) + targets.path(route)
    headers = targets.headers(route)
    start_gate = threading.Barrier(concurrency + 1)
    deadline: list[float] = [0.0]
    lock = threading.Lock()
    sent = itertools.count()
    callers = [_Caller([]) for _ in range(concurrency)]

    def post(client: httpx.Client, index: int) -> tuple[int, bytes]:
        image = images[index % len(images)]
        response = client.post(url, content=image.body(route),
                               headers={**headers, **image.headers(route), "X-Request-Id": f"bench-{uuid.uuid4().hex}"})
        return response.status_code, response.content

    def caller(number: int) -> None:
        state = callers[number]
        with httpx.Client(timeout=120.0, limits=httpx.Limits(max_connections=1)) as client:
            for index in range(warmup_per_caller):
                try:
                    post(client, number + index)
                except httpx.HTTPError:
                    pass  # counted in the timed part, if it keeps failing
            start_gate.wait()
            while True:
                with lock:
                    index = next(sent)
                began = time.perf_counter()
                try:
                    status, content = post(client, index)
                    problem = check_answer(route, status, content, targets.model_name)
                except httpx.HTTPError as error:
                    problem = f"{type(error).__name__}: {error}"
                ended = time.perf_counter()
                state.last_end = ended
                if problem is None:
                    state.ok += 1
                    state.latencies_ms.append((ended - began) * 1000.0)
                else:
                    state.failed += 1
                    state.first_failure = state.first_failure or problem
                with lock:
                    done = sum(c.ok + c.failed for c in callers)
                if ended >= deadline[0] and (done >= min_requests or ended >= deadline[0] + 3 * seconds):
                    return

    threads = [threading.Thread(target=caller, args=(number,), daemon=True) for number in range(concurrency)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    started = time.perf_counter()
    deadline[0] = started + seconds
    for thread in threads:
        thread.join()
    elapsed = max(c.last_end for c in callers) - started
    latencies = [ms for c in callers for ms in c.latencies_ms]
    ok, failed = sum(c.ok for c in callers), sum(c.failed for c in callers)
    return {
        "route": route, "concurrency": concurrency, "seconds": round(elapsed, 2), "requests": ok + failed,
        "failures": failed, "first_failure": next((c.first_failure for c in callers if c.first_failure), None),
        "images_per_s": round(ok / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 95), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
    }
