"""Reviewers and their keys: a JSON ``{"reviewer id": "key"}`` file, the format of the front's api_keys.json.

A separate list from the endpoint's callers on purpose: a caller key belongs to a hospital system
that sends images, a reviewer key to a person who labels them. Keys are compared in constant
time; a local first start writes one generated key (mode 0600) so `make review` works at once.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

from serving.front import load_api_keys, parse_api_keys


def load_reviewers(path: Path | str | None) -> dict[str, str]:
    """``{reviewer: key}`` from the file, else from ``CXR_REVIEWERS`` (``id:key,id2:key2``)."""
    if path and Path(path).exists():
        return load_api_keys(path)
    return parse_api_keys(os.environ.get("CXR_REVIEWERS", ""))


def ensure_reviewers_file(path: Path | str, reviewer: str = "reviewer") -> dict[str, str]:
    """Create a reviewers file with one generated key if none exists (local stack only)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump({reviewer: secrets.token_urlsafe(24)}, handle)
    return load_api_keys(path)


def check_key(reviewers: dict[str, str], reviewer: str, key: str) -> bool:
    """True when ``key`` is ``reviewer``'s key (constant-time; an unknown reviewer still costs a compare)."""
    expected = reviewers.get(reviewer, "")
    ok = hmac.compare_digest(key.encode(), (expected or secrets.token_urlsafe(24)).encode())
    return bool(expected) and ok
