"""What a load test sends and how each answer is checked; no Locust in here.

The Locust users (:mod:`loadtest.locustfile`) and the benchmark (:mod:`loadtest.bench`) share it:
real radiographs from the default data, every request body built once (base64 and JSON are paid
before the clock starts, not per request), and one check per answer — status 200, the protocol's
schema parsed into :class:`serving.schemas.PredictionResponse`, one answer per image, a decision
whose label is one of the model's classes (and an explanation on the explain route).

The targets come from the environment, so the Locust process (started by :mod:`loadtest.run`)
needs no command-line options of its own and secrets never appear in a process listing:

    CXR_LOADTEST_FRONT_URL        KServe front (default http://127.0.0.1:8080)
    CXR_LOADTEST_TORCHSERVE_URL   TorchServe inference API (default http://127.0.0.1:8085)
    CXR_API_KEY                   the front's API key (X-API-Key)
    CXR_TORCHSERVE_TOKEN          TorchServe's inference token (Authorization: Bearer)
    CXR_LOADTEST_DATA_DIR         labelled folder with test/<class>/*.jpg (default data)
    CXR_LOADTEST_IMAGES           how many images to cycle through (default 24)
    CXR_LOADTEST_WEIGHT_<ROUTE>   relative share of users per route (NATIVE, V1, V2, EXPLAIN)
    CXR_LOADTEST_WAIT_S           think time per user: "0" (closed loop) or "min,max" seconds
    CXR_LOADTEST_EXPLAIN_METHOD   gradcam or gradcam++
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from serving.client import read_answers, v1_request, v2_request
from serving.oip import OipRequest
from serving.schemas import MODEL_NAME, PredictionResponse

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "cxr3"

ENV_FRONT_URL = "CXR_LOADTEST_FRONT_URL"
ENV_TORCHSERVE_URL = "CXR_LOADTEST_TORCHSERVE_URL"
ENV_API_KEY = "CXR_API_KEY"
ENV_TORCHSERVE_TOKEN = "CXR_TORCHSERVE_TOKEN"
ENV_DATA_DIR = "CXR_LOADTEST_DATA_DIR"
ENV_IMAGES = "CXR_LOADTEST_IMAGES"
ENV_WAIT_S = "CXR_LOADTEST_WAIT_S"
ENV_EXPLAIN_METHOD = "CXR_LOADTEST_EXPLAIN_METHOD"
ENV_MODEL_NAME = "CXR_LOADTEST_MODEL_NAME"
WEIGHT_ENV_PREFIX = "CXR_LOADTEST_WEIGHT_"

Route = Literal["native", "v1", "v2", "v2_binary", "explain"]
ROUTES: tuple[Route, ...] = ("native", "v1", "v2", "explain")  # Locust's user classes; v2_binary: the benchmark
# Explanations (Grad-CAM) cost several predictions each and are asked for rarely: default share 1 in 10.
DEFAULT_WEIGHTS: dict[str, int] = {"native": 3, "v1": 3, "v2": 3, "explain": 1}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class NotLoopbackError(ValueError):
    """Load tests only ever target this machine."""


def require_loopback(url: str) -> str:
    """``url`` without a trailing slash, if it points at this machine; refuses anything else."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in LOOPBACK_HOSTS:
        raise NotLoopbackError(f"{url!r}: load tests run against 127.0.0.1 only")
    return url.rstrip("/")


def route_weights(environ: dict[str, str] | None = None) -> dict[str, int]:
    """Users per route in proportion to these weights; 0 leaves a route out."""
    environ = os.environ if environ is None else environ
    weights = {}
    for route in ROUTES:
        value = environ.get(WEIGHT_ENV_PREFIX + route.upper(), str(DEFAULT_WEIGHTS[route]))
        weight = int(value)
        if weight < 0:
            raise ValueError(f"{WEIGHT_ENV_PREFIX}{route.upper()} must be >= 0, got {weight}")
        weights[route] = weight
    return weights


def wait_range(environ: dict[str, str] | None = None) -> tuple[float, float]:
    """Think time between a user's requests: ``"0"`` -> (0, 0), ``"0.5,2"`` -> (0.5, 2)."""
    environ = os.environ if environ is None else environ
    parts = [float(part) for part in environ.get(ENV_WAIT_S, "0").split(",")]
    low, high = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if low < 0 or high < low:
        raise ValueError(f"{ENV_WAIT_S} must be 'seconds' or 'min,max' with 0 <= min <= max")
    return low, high


def radiographs(data_dir: Path, count: int) -> list[Path]:
    """``count`` real test radiographs, taken round-robin over the classes (sorted, reproducible)."""
    test_dir = Path(data_dir) / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} has no test/ folder of labelled images")
    per_class = [sorted(folder.glob("*.jpg")) for folder in sorted(test_dir.iterdir()) if folder.is_dir()]
    chosen: list[Path] = []
    for index in range(max(len(paths) for paths in per_class)):
        for paths in per_class:
            if index < len(paths) and len(chosen) < count:
                chosen.append(paths[index])
    if not chosen:
        raise FileNotFoundError(f"no *.jpg under {test_dir}/<class>/")
    return chosen


@dataclass(frozen=True)
class PreparedImage:
    """One radiograph with every route's request body, built once."""

    name: str
    raw: bytes
    v1: bytes
    v2: bytes
    explain: bytes
    v2_binary: bytes = b""
    v2_binary_headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, name: str, data: bytes, explain_method: str = "gradcam") -> "PreparedImage":
        binary, binary_headers = OipRequest(images=[data]).forward_binary()  # tritonclient's layout
        return cls(name=name, raw=data, v1=json.dumps(v1_request([data])).encode(),
                   v2=json.dumps(v2_request([data])).encode(),
                   explain=json.dumps(v1_request([data], explain=True, method=explain_method)).encode(),
                   v2_binary=binary, v2_binary_headers=tuple(binary_headers.items()))

    def body(self, route: Route) -> bytes:
        return {"native": self.raw, "v1": self.v1, "v2": self.v2, "v2_binary": self.v2_binary,
                "explain": self.explain}[route]

    def headers(self, route: Route) -> dict[str, str]:
        """This body's own headers (the binary extension's JSON header length differs per image)."""
        return {k: v for k, v in self.v2_binary_headers if k != "content-type"} if route == "v2_binary" else {}


def prepare_images(paths: list[Path], explain_method: str = "gradcam") -> list[PreparedImage]:
    return [PreparedImage.of(path.name, path.read_bytes(), explain_method) for path in paths]


@dataclass(frozen=True)
class Targets:
    """Where the load goes and with which credentials (see the module docstring)."""

    front_url: str
    torchserve_url: str
    api_key: str
    torchserve_token: str
    model_name: str
    data_dir: Path
    n_images: int
    explain_method: str

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Targets":
        environ = os.environ if environ is None else environ
        return cls(front_url=require_loopback(environ.get(ENV_FRONT_URL, "http://127.0.0.1:8080")),
                   torchserve_url=require_loopback(environ.get(ENV_TORCHSERVE_URL, "http://127.0.0.1:8085")),
                   api_key=environ.get(ENV_API_KEY, ""), torchserve_token=environ.get(ENV_TORCHSERVE_TOKEN, ""),
                   model_name=environ.get(ENV_MODEL_NAME, MODEL_NAME),
                   data_dir=Path(environ.get(ENV_DATA_DIR) or environ.get("DATA_DIR") or DEFAULT_DATA_DIR),
                   n_images=int(environ.get(ENV_IMAGES, "24")),
                   explain_method=environ.get(ENV_EXPLAIN_METHOD, "gradcam"))

    def path(self, route: Route) -> str:
        """The request path of a route (relative to its base URL)."""
        return {"native": f"/predictions/{self.model_name}", "v1": f"/v1/models/{self.model_name}:predict",
                "v2": f"/v2/models/{self.model_name}/infer", "v2_binary": f"/v2/models/{self.model_name}/infer",
                "explain": f"/v1/models/{self.model_name}:explain"}[route]

    def base_url(self, route: Route) -> str:
        return self.torchserve_url if route == "native" else self.front_url

    def headers(self, route: Route) -> dict[str, str]:
        """Auth and content type of a route (X-Request-Id is added per request)."""
        if route == "native":
            headers = {"Content-Type": "application/octet-stream"}
            if self.torchserve_token:
                headers["Authorization"] = f"Bearer {self.torchserve_token}"
            return headers
        headers = {"Content-Type": "application/octet-stream" if route == "v2_binary" else "application/json"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        return headers


def check_answer(route: Route, status: int, content: bytes, model_name: str = MODEL_NAME) -> str | None:
    """None when the answer is a valid one-image answer of ``route``; else what is wrong with it."""
    if status != 200:
        return f"status {status}: {content[:200].decode('utf-8', 'replace')}"
    try:
        payload = json.loads(content)
        protocol = "native" if route == "native" else "v2" if route in ("v2", "v2_binary") else "v1"
        answers: list[PredictionResponse] = read_answers(protocol, payload)
    except (ValueError, KeyError, StopIteration, TypeError) as error:  # pydantic's ValidationError is a ValueError
        return f"schema: {type(error).__name__}: {str(error)[:200]}"
    if len(answers) != 1:
        return f"schema: {len(answers)} answers for one image"
    answer = answers[0]
    if answer.model_name != model_name:
        return f"answered by model {answer.model_name!r}, not {model_name!r}"
    if not answer.decision.label or answer.decision.label not in answer.classes:
        return f"no decision: label {answer.decision.label!r} is not one of {answer.classes}"
    if route == "explain" and answer.explanation is None:
        return "the explain route answered without an explanation"
    return None
