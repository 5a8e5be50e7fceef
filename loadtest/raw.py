"""What the model alone can do on this machine, every way it can run: the benchmark's ceiling.

Two measurements, each in fresh processes (``spawn``) so one variant's threads, allocator and
OpenMP pool never colour the next one's:

- :func:`raw_forward_matrix`: the network's forward pass on a prebuilt batch tensor (no decoding,
  no lung step, no HTTP) per runtime (PyTorch eager, eager + channels_last, TorchScript traced and
  frozen, ONNX Runtime as served and with its default spinning threads), per layout ``processes x threads`` (1 x 1, 1 x N, N x 1) and batch size.
  N processes run at once behind a barrier and their images/s add up. The best row of the whole
  matrix is the benchmark's denominator: nobody picks it.
- :func:`pipeline_matrix`: what a worker does per request minus the serving, bytes in,
  :class:`cxr_core.bundle.Prediction` out (decode, lung segmenter, crop, forward, gate, policy),
  with the bundle's own runtime, per ``processes x threads``: the ceiling of any served figure.

A HOG bundle has no network: its "forward" is HOG features + the scikit-learn classifier.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TORCH_RUNTIMES = ("torch", "torch_channels_last", "torch_jit_freeze", "onnxruntime", "onnxruntime_spinning")


def layouts(cpus: int) -> list[tuple[int, int]]:
    """(processes, threads) pairs worth measuring on ``cpus`` cores: 1x1, 1xN, Nx1."""
    return sorted({(1, 1), (1, cpus), (cpus, 1)})


def _timed(step: Callable[[], Any], seconds: float, min_iterations: int = 3) -> tuple[int, float]:
    step()  # warm-up: first-call allocations, kernel selection, graph optimisation
    iterations, started = 0, time.perf_counter()
    while True:
        step()
        iterations += 1
        elapsed = time.perf_counter() - started
        if (elapsed >= seconds and iterations >= min_iterations) or elapsed >= 4 * seconds:
            return iterations, elapsed


def forward_step(predictor, runtime: str, batch: np.ndarray, threads: int) -> Callable[[], Any]:
    """One forward pass of ``batch`` (prepared uint8 pixels) in ``runtime``, as a callable."""
    import torch

    from cxr_core.preprocess import pixels_to_tensor
    from cxr_core.runtime import ForwardWithFeatures, classifier_forward

    if predictor.torch_model is None:
        return lambda: predictor.logits_from_pixels(batch)
    tensor = pixels_to_tensor(batch, predictor.manifest.preprocess)
    model = copy.deepcopy(predictor.torch_model).eval()
    if runtime in ("onnxruntime", "onnxruntime_spinning"):  # served: idle threads sleep; spinning: ORT's default
        engine = classifier_forward(model, predictor.manifest.preprocess.image_size, threads,
                                    spin=runtime == "onnxruntime_spinning")
        array = tensor.numpy()
        return lambda: engine(array)
    module = ForwardWithFeatures(model).eval()
    if runtime == "torch_channels_last":
        module = module.to(memory_format=torch.channels_last)
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    elif runtime == "torch_jit_freeze":
        with torch.no_grad():
            module = torch.jit.freeze(torch.jit.trace(module, tensor[:1]))
    elif runtime != "torch":
        raise ValueError(f"unknown runtime {runtime!r}; one of {TORCH_RUNTIMES}")

    def step():
        with torch.no_grad():
            module(tensor)
    return step


def _forward_child(bundle: str, runtime: str, pixels: np.ndarray, batch_size: int, threads: int, seconds: float,
                   barrier, results) -> None:
    _set_threads(threads)
    from cxr_core.bundle import load_bundle

    predictor = load_bundle(bundle, gate=False, runtime="torch")
    step = forward_step(predictor, runtime, pixels[np.arange(batch_size) % len(pixels)], threads)
    step()
    barrier.wait()
    iterations, elapsed = _timed(step, seconds)
    results.put((iterations * batch_size, elapsed))


def _pipeline_child(bundle: str, images: list[bytes], threads: int, seconds: float, barrier, results) -> None:
    _set_threads(threads)
    from cxr_core.bundle import load_bundle

    predictor = load_bundle(bundle)
    cycle = iter(range(10**9))

    def step():
        predictor.predict_many([images[next(cycle) % len(images)]])
    for image in images[:4]:
        predictor.predict_many([image])
    barrier.wait()
    iterations, elapsed = _timed(step, seconds, min_iterations=len(images))
    results.put((iterations, elapsed))


def _set_threads(threads: int) -> None:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CXR_TORCH_THREADS"):
        os.environ[variable] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_processes(target, args: tuple, processes: int, timeout_s: float) -> tuple[float, list[float]]:
    """``processes`` copies of ``target(*args, barrier, results)`` at once; summed images/s and each one's."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    children = [context.Process(target=target, args=(*args, barrier, results), daemon=True) for _ in range(processes)]
    for child in children:
        child.start()
    rates = []
    try:
        for _ in children:
            images, elapsed = results.get(timeout=timeout_s)
            rates.append(images / elapsed)
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    return round(sum(rates), 2), [round(rate, 2) for rate in rates]


def raw_forward_matrix(bundle: Path, pixels: np.ndarray, batch_sizes: list[int], cpus: int, seconds: float,
                       runtimes: list[str] | None = None,
                       only: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Images/s of the forward pass per (runtime, processes x threads, batch size); ``only`` one layout."""
    from cxr_core.bundle import read_manifest

    torch_family = read_manifest(bundle).model.kind == "torch"
    runtimes = (runtimes or list(TORCH_RUNTIMES)) if torch_family else ["sklearn"]
    rows = []
    for runtime in runtimes:
        for processes, threads in [only] if only else layouts(cpus):
            for batch_size in batch_sizes:
                total, each = _run_processes(_forward_child, (str(bundle), runtime, pixels, batch_size, threads,
                                                              seconds), processes, 60 + 8 * seconds)
                rows.append({"runtime": runtime, "processes": processes, "threads": threads, "batch_size": batch_size,
                             "images_per_s": total, "per_process": each,
                             "ms_per_image_per_process": round(1000.0 * processes / total, 2) if total else None})
                log.info("raw forward  %-19s %dx%d batch=%-3d %8.2f images/s", runtime, processes, threads,
                         batch_size, total)
    return rows


def pipeline_matrix(bundle: Path, images: list[bytes], cpus: int, seconds: float) -> list[dict[str, Any]]:
    """Images/s of bytes -> Prediction in process (the bundle's runtime), per processes x threads."""
    rows = []
    for processes, threads in layouts(cpus):
        total, each = _run_processes(_pipeline_child, (str(bundle), images, threads, seconds), processes,
                                     120 + 8 * seconds)
        rows.append({"processes": processes, "threads": threads, "images_per_s": total, "per_process": each,
                     "ms_per_image_per_process": round(1000.0 * processes / total, 2) if total else None})
        log.info("pipeline     %dx%d            %8.2f images/s", processes, threads, total)
    return rows
