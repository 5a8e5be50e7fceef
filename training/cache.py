"""Preprocessed-pixel cache, so epochs do not re-decode JPEGs.

Entries are uint8 arrays at model resolution — the output of
:func:`cxr_core.preprocess.prepare_image` — stored as ``.npy`` under
``<root>/<preprocess fingerprint>/<sha256 of the file bytes>.npy``. Keying by content hash and
config hash means a renamed file still hits and a changed preprocessing config never reads stale
pixels. Tensors are made from these arrays by the same :func:`pixels_to_tensor` serving uses.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr_core.preprocess import PreprocessConfig, prepare_image

CACHE_ROOT = Path(os.environ.get("CXR_CACHE_DIR", ".cache"))
DEFAULT_CACHE_ROOT = CACHE_ROOT / "preprocessed"


class PreprocessedCache:
    """Content-addressed store of prepared pixels for one preprocessing config."""

    def __init__(self, config: PreprocessConfig, root: Path | str = DEFAULT_CACHE_ROOT):
        self.config = config
        self.directory = Path(root) / config.fingerprint()
        self.directory.mkdir(parents=True, exist_ok=True)

    def entry_path(self, data: bytes) -> Path:
        return self.directory / f"{hashlib.sha256(data).hexdigest()[:32]}.npy"

    def pixels(self, path: Path | str) -> np.ndarray:
        """Prepared uint8 pixels of one file, from the cache or computed and stored."""
        data = Path(path).read_bytes()
        entry = self.entry_path(data)
        if entry.exists():
            return np.load(entry)
        pixels = prepare_image(data, self.config).pixels
        temporary = entry.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(temporary, pixels)
        os.replace(temporary, entry)  # atomic: parallel workers never read half a file
        return pixels


def _pixels_worker(task: tuple[str, str, str, str | None]) -> np.ndarray:
    path, config_json, root, lung_weights = task
    config = PreprocessConfig.model_validate_json(config_json)
    if lung_weights:
        import torch

        from cxr_core.lungs import load_segmenter_file

        torch.set_num_threads(1)  # one process per core already
        load_segmenter_file(lung_weights, config.lung_segmenter_sha256)
    cache = PreprocessedCache(config, Path(root).parent)
    return cache.pixels(path)


def _lung_weights(config: PreprocessConfig) -> str | None:
    """The segmenter file a worker must load (lung fields on), else None."""
    if config.lung_fields == "none":
        return None
    from cxr_core.lungs import segmenter_for

    source = segmenter_for(config.lung_segmenter_sha256 or "").source
    return str(source) if source else None


def load_pixel_array(
    paths: list[Path], config: PreprocessConfig, root: Path | str = DEFAULT_CACHE_ROOT, workers: int = 2,
    desc: str = "preprocessing",
) -> np.ndarray:
    """N x H x W uint8 array for ``paths`` (filled in parallel on a cold cache)."""
    cache = PreprocessedCache(config, root)
    if not paths:
        return np.zeros((0, config.image_size, config.image_size), dtype=np.uint8)
    lung_weights = _lung_weights(config)
    tasks = [(str(p), config.model_dump_json(), str(cache.directory), lung_weights) for p in paths]
    progress = dict(total=len(tasks), desc=desc, unit="img", file=sys.stderr, leave=False)
    # The lung segmenter runs torch in the workers: a forked child of a process that already ran
    # torch can deadlock in the OpenMP runtime, so those workers are spawned (and small sets stay here).
    if lung_weights and len(paths) < 200:
        workers = 1
    context = multiprocessing.get_context("spawn") if lung_weights else None
    if workers <= 1:
        arrays = [cache.pixels(p) for p in tqdm(paths, **progress)]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            arrays = list(tqdm(pool.map(_pixels_worker, tasks, chunksize=32), **progress))
    return np.stack(arrays)
