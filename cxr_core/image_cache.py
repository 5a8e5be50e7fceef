"""A short-lived cache of the images serving answered, off by default (privacy).

By default no image a hospital sends is stored anywhere: the audit log holds numbers, never
pixels. A deployment that wants its reviewers to see the radiograph with its Grad-CAM overlay sets
``CXR_IMAGE_CACHE_DIR`` (and optionally ``CXR_IMAGE_CACHE_TTL_S``, default one hour): serving then
writes each answered image's bytes there and the review app reads them back until they expire.

A file's name is a SHA-256 of the (already cleaned) request id and the item number, never the
caller's text itself, so no id reaches a directory listing and no id can walk the file system.
Files are mode 0600 in a 0700 folder, written atomically (temp file + rename). An expired file
is deleted when it is read and by :meth:`ImageCache.purge`, which :meth:`ImageCache.put` also runs
at most once a minute, so an image nobody opened does not outlive its TTL by more than that;
expiry is the file's age (mtime).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "CXR_IMAGE_CACHE_DIR"
CACHE_TTL_ENV = "CXR_IMAGE_CACHE_TTL_S"
DEFAULT_TTL_S = 3600
SUFFIX = ".img"
PURGE_INTERVAL_S = 60.0
CacheState = Literal["stored", "expired", "absent"]


class ImageCache:
    """Image bytes by (request id, item), each kept ``ttl_s`` seconds after it was written."""

    def __init__(self, root: Path | str, ttl_s: int = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise ValueError(f"the image cache TTL must be positive, not {ttl_s}")
        self.root = Path(root)
        self.ttl_s = int(ttl_s)
        self._last_purge = float("-inf")

    @classmethod
    def from_env(cls, directory: str | None = None, ttl_s: int | None = None) -> "ImageCache | None":
        """The cache a deployment enabled (arguments win over ``CXR_IMAGE_CACHE_*``), or None: off by default."""
        directory = directory or os.environ.get(CACHE_DIR_ENV) or None
        if not directory:
            return None
        ttl = ttl_s if ttl_s is not None else int(os.environ.get(CACHE_TTL_ENV) or DEFAULT_TTL_S)
        return cls(directory, ttl)

    def path_of(self, request_id: str, item: int) -> Path:
        digest = hashlib.sha256(f"{request_id}\0{int(item)}".encode()).hexdigest()
        return self.root / f"{digest}{SUFFIX}"

    def _expired(self, path: Path, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - path.stat().st_mtime > self.ttl_s

    def put(self, request_id: str, item: int, data: bytes) -> Path:
        """Store ``data`` (replacing an earlier image of the same id and item)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if time.monotonic() - self._last_purge >= PURGE_INTERVAL_S:
            self._last_purge = time.monotonic()
            self.purge()
        target = self.path_of(request_id, item)
        temporary = target.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return target

    def state(self, request_id: str, item: int) -> CacheState:
        """Whether the image is there, there but expired (then deleted), or not there."""
        path = self.path_of(request_id, item)
        try:
            if not self._expired(path):
                return "stored"
        except FileNotFoundError:
            return "absent"
        path.unlink(missing_ok=True)
        return "expired"

    def get(self, request_id: str, item: int) -> bytes | None:
        """The image's bytes, or None when it was never stored or has expired (an expired file is deleted)."""
        if self.state(request_id, item) != "stored":
            return None
        try:
            return self.path_of(request_id, item).read_bytes()
        except FileNotFoundError:  # purged in between
            return None

    def purge(self) -> int:
        """Delete every expired image (and stale temp files); returns how many files went."""
        if not self.root.is_dir():
            return 0
        now, removed = time.time(), 0
        for path in self.root.iterdir():
            try:
                if path.is_file() and path.name.endswith((SUFFIX, ".tmp")) and self._expired(path, now):
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
