"""The review app's configuration (``configs/review.yaml``): YAML -> pydantic, validated once at start.

Command-line flags of :mod:`review.app` override the file; ``CXR_AUDIT_LOG`` / ``CXR_FEEDBACK_DB``
are honoured like in serving and the drift job so the three read and write the same files, and
``CXR_IMAGE_CACHE_DIR`` / ``CXR_IMAGE_CACHE_TTL_S`` like in serving's handler, which fills that cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cxr_core.image_cache import CACHE_DIR_ENV, CACHE_TTL_ENV, DEFAULT_TTL_S

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "review.yaml"
REVIEWERS_ENV = "CXR_REVIEWERS"
SECRET_ENV = "CXR_REVIEW_SECRET"


class ReviewConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="bind address: loopback next to the local stack")
    port: int = Field(8090, ge=1, le=65535)
    audit_log: str = Field("logs", description="audit log file or folder serving writes (env CXR_AUDIT_LOG wins)")
    feedback_db: str = Field("monitoring/feedback.db", description="SQLite feedback store (env CXR_FEEDBACK_DB wins)")
    reviewers_file: str = Field(".cache/review/reviewers.json",
                                description='JSON {"reviewer id": "key"}, the format of the front\'s api_keys.json; '
                                            "created with one generated key when missing (local use)")
    review_audit_log: str = Field("logs/review-audit.log",
                                  description="one JSON line per view and correction (who, what, when; never images)")
    page_size: int = Field(50, ge=1, le=1000)
    session_max_age_s: int = Field(8 * 3600, ge=60, description="a reviewer logs in again after this")
    secure_cookies: bool = Field(False, description="mark the session cookie Secure (set behind TLS)")
    image_cache: str | None = Field(None, description="serving's short-lived image cache folder; off (None) by "
                                                      "default: no image is stored (env CXR_IMAGE_CACHE_DIR wins)")
    image_cache_ttl_s: int = Field(DEFAULT_TTL_S, ge=1, description="how long the cache keeps an image "
                                                                   "(env CXR_IMAGE_CACHE_TTL_S wins)")
    bundle: str = Field("models/champion",
                        description="the bundle whose Grad-CAM the case view shows on a cached image")

    @classmethod
    def load(cls, path: Path | str | None = None) -> "ReviewConfig":
        path = Path(path) if path else DEFAULT_CONFIG
        payload = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
        if os.environ.get("CXR_AUDIT_LOG"):
            payload["audit_log"] = os.environ["CXR_AUDIT_LOG"]
        if os.environ.get("CXR_FEEDBACK_DB"):
            payload["feedback_db"] = os.environ["CXR_FEEDBACK_DB"]
        if os.environ.get(CACHE_DIR_ENV):
            payload["image_cache"] = os.environ[CACHE_DIR_ENV]
        if os.environ.get(CACHE_TTL_ENV):
            payload["image_cache_ttl_s"] = int(os.environ[CACHE_TTL_ENV])
        return cls.model_validate(payload)
