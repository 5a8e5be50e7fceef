"""Container HEALTHCHECK of the cxr-screen images (standard library only).

    cxr-healthcheck serving   TorchServe answers /ping on $CXR_TORCHSERVE_PORT (with the
                              inference token from key_file.json) and the KServe front
                              answers /v2/health/live on $CXR_FRONT_HTTP_PORT
    cxr-healthcheck jobs      the project imports; $CXR_HEALTH_URL answers if it is set
Exit status 0 when healthy, 1 otherwise (Docker's convention).
"""

import json
import os
import sys
import urllib.request


def answers(url: str, headers: dict[str, str] | None = None, timeout: float = 4.0) -> bool:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return False


def torchserve_token() -> dict[str, str]:
    """TorchServe keeps token authorization on: its inference key is in key_file.json (cwd)."""
    workdir = os.environ.get("CXR_SERVING_WORKDIR", os.getcwd())
    try:
        with open(os.path.join(workdir, "key_file.json"), encoding="utf-8") as handle:
            key = json.load(handle)["inference"]["key"]
    except (OSError, KeyError, ValueError):
        return {}
    return {"Authorization": f"Bearer {key}"}


def serving() -> bool:
    torchserve = os.environ.get("CXR_TORCHSERVE_PORT", "8085")
    front = os.environ.get("CXR_FRONT_HTTP_PORT", "8080")
    return answers(f"http://127.0.0.1:{torchserve}/ping", torchserve_token()) and answers(
        f"http://127.0.0.1:{front}/v2/health/live"
    )


def jobs() -> bool:
    import cxr_core  # noqa: F401  (the project's code is importable)

    url = os.environ.get("CXR_HEALTH_URL")
    return answers(url) if url else True


if __name__ == "__main__":
    check = sys.argv[1] if len(sys.argv) > 1 else "serving"
    sys.exit(0 if {"serving": serving, "jobs": jobs}[check]() else 1)
