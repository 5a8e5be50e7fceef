"""``make bench-data``: images per second of the data pipeline, with and without the cache.

Measures, in one run on the same files: decode + preprocess + tensor (what an epoch costs with no
cache), filling the cache, and reading cached pixels + tensor (what an epoch costs afterwards).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cxr_core.preprocess import PreprocessConfig, pixels_to_tensor, prepare_image
from training.cache import PreprocessedCache
from training.data import default_data_dir, discover_dataset


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def bench(paths: list[Path], config: PreprocessConfig) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()
    for path in paths:
        pixels_to_tensor(prepare_image(path.read_bytes(), config).pixels, config)
    uncached = time.perf_counter() - start

    root = Path(tempfile.mkdtemp(prefix="cxr-bench-cache-"))
    try:
        cache = PreprocessedCache(config, root)
        start = time.perf_counter()
        for path in paths:
            cache.pixels(path)
        fill = time.perf_counter() - start
        start = time.perf_counter()
        for path in paths:
            pixels_to_tensor(cache.pixels(path), config)
        cached = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "images": len(paths),
        "image_size": config.image_size,
        "uncached_images_per_s": _rate(len(paths), uncached),
        "cache_fill_images_per_s": _rate(len(paths), fill),
        "cached_images_per_s": _rate(len(paths), cached),
        "speedup": round(uncached / cached, 2) if cached > 0 else None,
        "threads": 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--limit", type=int, default=1000, help="number of training images to time")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/data.json"))
    args = parser.parse_args(argv)
    records = discover_dataset(args.data_dir).split("train")
    step = max(1, len(records) // args.limit)
    paths = [r.path for r in records[::step][: args.limit]]
    result = bench(paths, PreprocessConfig())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
