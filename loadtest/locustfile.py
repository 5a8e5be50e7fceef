"""Locust users for the served model: TorchServe native, KServe v1, KServe v2 and v1 explain.

Run it through ``python -m loadtest.run`` (or ``make loadtest``), which starts Locust headless as
its own process with the targets and credentials in the environment (see
:mod:`loadtest.workload`); never import this module into another process: Locust monkey-patches
the standard library with gevent when it is imported.

    CXR_API_KEY=... CXR_TORCHSERVE_TOKEN=... locust -f loadtest/locustfile.py --headless -u 8 -t 60s

Each user sends one real radiograph per request, cycling through images whose request bodies were
built once at start, and checks every answer (status, schema, a decision; an explanation on the
explain route). Route shares come from ``CXR_LOADTEST_WEIGHT_<ROUTE>``; a weight of 0 leaves the
route's user class out. Only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import itertools
import random
import uuid

from locust import FastHttpUser, between, constant, task

from loadtest.workload import (
    Route,
    Targets,
    check_answer,
    prepare_images,
    radiographs,
    route_weights,
    wait_range,
)

TARGETS = Targets.from_env()
IMAGES = prepare_images(radiographs(TARGETS.data_dir, TARGETS.n_images), TARGETS.explain_method)
WEIGHTS = route_weights()
WAIT_LOW, WAIT_HIGH = wait_range()
REQUEST_NAMES: dict[str, str] = {"native": "TorchServe native /predictions", "v1": "KServe v1 :predict",
                                 "v2": "KServe v2 /infer", "explain": "KServe v1 :explain"}


class CxrScreenUser(FastHttpUser):
    """One caller of one route: a request, its check, the next image."""

    abstract = True
    route: Route = "v2"
    wait_time = between(WAIT_LOW, WAIT_HIGH) if WAIT_HIGH > 0 else constant(0)
    network_timeout = 120.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        start = random.randrange(len(IMAGES))
        self._images = itertools.islice(itertools.cycle(IMAGES), start, None)
        self._path = TARGETS.path(self.route)
        self._headers = TARGETS.headers(self.route)

    @task
    def send_one_image(self) -> None:
        image = next(self._images)
        headers = {**self._headers, "X-Request-Id": f"loadtest-{uuid.uuid4().hex}"}
        with self.client.post(self._path, data=image.body(self.route), headers=headers,
                              name=REQUEST_NAMES[self.route], catch_response=True) as response:
            problem = check_answer(self.route, response.status_code or 0, response.content or b"", TARGETS.model_name)
            if problem:
                response.failure(f"{image.name}: {problem}")
            else:
                response.success()


class TorchServeNativeUser(CxrScreenUser):
    """Raw image bytes to TorchServe's own inference API, with its bearer token."""

    abstract = WEIGHTS["native"] == 0
    weight = max(WEIGHTS["native"], 1)
    route = "native"
    host = TARGETS.torchserve_url


class KServeV1User(CxrScreenUser):
    """``{"instances": [{"data": b64}]}`` to the front's v1 ``:predict``, with an API key."""

    abstract = WEIGHTS["v1"] == 0
    weight = max(WEIGHTS["v1"], 1)
    route = "v1"
    host = TARGETS.front_url


class KServeV2User(CxrScreenUser):
    """An Open Inference Protocol BYTES tensor to the front's v2 ``/infer``, with an API key."""

    abstract = WEIGHTS["v2"] == 0
    weight = max(WEIGHTS["v2"], 1)
    route = "v2"
    host = TARGETS.front_url


class KServeExplainUser(CxrScreenUser):
    """The front's v1 ``:explain``: prediction plus Grad-CAM heatmap and lung-zone shares."""

    abstract = WEIGHTS["explain"] == 0
    weight = max(WEIGHTS["explain"], 1)
    route = "explain"
    host = TARGETS.front_url
