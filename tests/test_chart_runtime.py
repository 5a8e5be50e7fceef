"""Run what the chart renders: the predictor container and the drift CronJob's command, as processes.

The offline checks (tests/test_charts.py) say the manifests are well formed; these say they work.
The rendered ServingRuntime + InferenceService container (command from the serving image, args,
env with KServe's placeholders filled as KServe fills them) runs over a `make package-model`
folder of the tiny bundle standing in for /mnt/models; it must load the model, turn
/v2/health/ready true, answer a real radiograph with a decision and leave the prediction line on
the audit claim the chart mounts. Then the drift CronJob's command runs over that claim (another
pod, the same claim) and must decide `ok` and exit 0. See tests/kserve_pod.py for what is mapped.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from charts import validate
from serving.client import read_answers, v2_request
from serving.config import PackageConfig
from serving.mar import build_package
from tests.conftest import free_port
from tests.kserve_pod import MODEL_MOUNT, REPO_ROOT, PodFiles, predictor_container

pytestmark = pytest.mark.slow

API_KEY = "chart-test-" + uuid.uuid4().hex
CALLER = "chart-test"
REFERENCE_MODEL = "cxr-screen-chart-runtime"  # its own registered model: no other test's champion
READY_TIMEOUT_S = 240
LOAD_FAILED = "Load model failed"
WORKER_LOADED = "State change WORKER_STARTED -> WORKER_MODEL_LOADED"


def image_env(dockerfile: Path) -> dict[str, str]:
    """The runtime stage's ``ENV`` of an image (the last ENV instruction), as the container sees it."""
    text = dockerfile.read_text().replace("\\\n", " ")
    (last,) = [line for line in text.splitlines() if line.startswith("ENV ")][-1:]
    return dict(item.split("=", 1) for item in shlex.split(last[4:]))


def image_entrypoint(dockerfile: Path) -> list[str]:
    (line,) = [line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    return [arg for arg in json.loads(line[len("ENTRYPOINT "):]) if arg not in ("/usr/bin/tini", "--")]


def pod_environment(image: dict[str, str], container: dict, files: PodFiles, secrets: dict[str, str],
                    ports: dict[str, str]) -> dict[str, str]:
    """The container's environment here: image ENV, then the container's env (secrets resolved)."""
    env = {key: value for key, value in image.items() if key not in ("PATH", "VIRTUAL_ENV")}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["name"]]
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = {"metadata.namespace": validate.NAMESPACE}.get(
                item["valueFrom"]["fieldRef"]["fieldPath"], "")
    env = {key: files.rewrite(value) if value.startswith("/") else value for key, value in env.items()}
    env.update(ports)
    env.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(REPO_ROOT),
               TMPDIR=str(files.local("/tmp")), LANG="C.UTF-8")
    for key in ("HOME", "CXR_SERVING_WORKDIR", "TMPDIR"):
        if key in env:
            Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def one(chart: validate.RenderedChart, kind: str) -> dict:
    (obj,) = chart.of_kind(kind)
    return obj


@dataclass
class Predictor:
    url: str
    torchserve_url: str
    workdir: Path
    claims: Path
    process: subprocess.Popen
    log: Path
    ready_after_s: float | None
    model_name: str
    rootfs: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def predict(self, image: bytes) -> tuple[str, httpx.Response]:
        request_id = f"chart-{uuid.uuid4().hex}"
        response = httpx.post(f"{self.url}/v2/models/{self.model_name}/infer", json=v2_request([image]),
                              headers={"X-API-Key": API_KEY, "X-Request-Id": request_id}, timeout=120)
        return request_id, response


@pytest.fixture(scope="module")
def chart() -> validate.RenderedChart:
    return validate.render_chart({"drift": {"reference": f"models:/{REFERENCE_MODEL}@champion"}})


@pytest.fixture(scope="module")
def claims(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("claims")


@pytest.fixture(scope="module")
def predictor(chart, claims, tiny_bundle, tmp_path_factory):
    """The rendered predictor container running over the tiny bundle's model package."""
    root = tmp_path_factory.mktemp("predictor-pod")
    package = build_package(tiny_bundle, root / "model-package", version="7",
                            config=PackageConfig(workers=1, batch_size=1, max_batch_delay_ms=20))
    isvc, runtime = one(chart, "InferenceService"), one(chart, "ServingRuntime")
    container = predictor_container(runtime, isvc)
    volumes = isvc["spec"]["predictor"].get("volumes", [])
    files = PodFiles.of(root, claims, container, volumes, extra={
        MODEL_MOUNT: package.root, "/app": REPO_ROOT, "/opt/venv": Path(sys.prefix)})
    dockerfile = REPO_ROOT / "docker" / "serving.Dockerfile"
    ts_port, metrics_port, front_port, management_port = free_port(), free_port(), free_port(), free_port()
    ports = {"CXR_TORCHSERVE_PORT": str(ts_port), "CXR_FRONT_HTTP_PORT": str(front_port),
             "CXR_TORCHSERVE_MANAGEMENT_PORT": str(management_port),
             "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ts_port}",
             "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{management_port}",
             "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics_port}",
             "TS_GRPC_INFERENCE_PORT": str(free_port()), "TS_GRPC_MANAGEMENT_PORT": str(free_port()),
             "TS_DISABLE_SYSTEM_METRICS": "true"}
    secrets = {}
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secrets[ref["name"]] = f"{CALLER}:{API_KEY}"
    env = pod_environment(image_env(dockerfile), container, files, secrets, ports)
    entrypoint = [str(REPO_ROOT / "docker" / "serving-entrypoint.sh")
                  if arg == "/usr/local/bin/cxr-serving-entrypoint" else arg for arg in image_entrypoint(dockerfile)]
    command = container.get("command") or entrypoint
    args = [files.rewrite(arg) for arg in container.get("args", [])]
    log = root / "pod.log"
    model_name = next(e["value"] for e in container["env"] if e["name"] == "CXR_MODEL_NAME")
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", *command, *args], cwd=env.get("CXR_SERVING_WORKDIR", root), env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    served = Predictor(f"http://127.0.0.1:{front_port}", f"http://127.0.0.1:{ts_port}",
                       Path(env["CXR_SERVING_WORKDIR"]), claims, process, log, None, model_name,
                       files.local("/"))
    try:
        deadline = started + READY_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None and LOAD_FAILED not in served.log_tail(10**7):
            try:
                ready = httpx.get(f"{served.url}/v2/models/{model_name}/ready", timeout=5)
                if ready.status_code == 200 and ready.json().get("ready") and _torchserve_ready(served):
                    served.ready_after_s = round(time.monotonic() - started, 1)
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        yield served
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _torchserve_ready(served: Predictor) -> bool:
    """TorchServe's own word that a worker holds the model (the management API shares the inference
    port in the package's config.properties, so it is not reachable separately)."""
    return WORKER_LOADED in served.log_tail(10**7)


def audit_claim(chart: validate.RenderedChart) -> str | None:
    """The claim the predictor mounts at auditLog.mountPath (None: the chart mounts none)."""
    isvc = one(chart, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    mounts = {m["name"]: m["mountPath"] for m in predictor["model"].get("volumeMounts", [])}
    for volume in predictor.get("volumes", []):
        if volume["name"] in mounts and "persistentVolumeClaim" in volume:
            return volume["persistentVolumeClaim"]["claimName"]
    return None


def test_rendered_predictor_loads_the_model_and_turns_ready(chart, predictor):
    assert predictor.process.poll() is None, f"the predictor exited:\n{predictor.log_tail()}"
    assert predictor.ready_after_s is not None, (
        f"no READY TorchServe worker / model ready in {READY_TIMEOUT_S} s:\n{predictor.log_tail()}")
    print(f"rendered predictor ready after {predictor.ready_after_s} s")
    health = httpx.get(f"{predictor.url}/v2/health/ready", timeout=5)
    assert health.status_code == 200
    (container,) = one(chart, "ServingRuntime")["spec"]["containers"]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():  # what the kubelet would call, on the front's (remapped) port
        assert probe["port"] == 8080 == container["ports"][0]["containerPort"], kind
        assert httpx.get(f"{predictor.url}{probe['path']}", timeout=5).status_code == 200, kind
    timeout = container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
    assert predictor.ready_after_s < timeout  # the startup probe waits long enough for this load
    assert LOAD_FAILED not in predictor.log_tail(10**7)


def test_rendered_predictor_runs_the_worker_count_of_its_cpu_request(chart, predictor):
    """The package was built with 1 worker; the chart renders CPU request / threads (2 by default) and
    the image's entry point rewrites the package's config.properties to it."""
    env = {item["name"]: item.get("value") for item in one(chart, "InferenceService")["spec"]["predictor"]["model"]["env"]}
    workers = int(env["CXR_TORCHSERVE_WORKERS"])
    assert workers == 2
    deadline = time.monotonic() + 120
    while predictor.log_tail(10**7).count(WORKER_LOADED) < workers and time.monotonic() < deadline:
        time.sleep(1)
    assert predictor.log_tail(10**7).count(WORKER_LOADED) == workers, predictor.log_tail()


def test_rendered_predictor_answers_a_radiograph_and_audits_it_on_the_claim(chart, predictor, sample_image):
    assert predictor.ready_after_s is not None, f"predictor not ready:\n{predictor.log_tail()}"
    request_id, response = predictor.predict(sample_image.read_bytes())
    assert response.status_code == 200, response.text
    (answer,) = read_answers("v2", response.json())
    assert answer.decision.label in answer.classes or answer.decision.label in ("abstain", "review", "ungradable")
    claim = audit_claim(chart)
    assert claim is not None, "the predictor mounts no audit claim: its log stays in the pod"
    lines = [json.loads(line) for path in sorted((predictor.claims / claim).glob("*.jsonl"))
             for line in path.read_text().splitlines() if line.strip()]
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert [line["event"] for line in mine] == ["prediction"], f"audit lines for {request_id}: {mine}"
    assert mine[0]["decision"] == answer.decision.label


@pytest.fixture(scope="module")
def champion_reference(mlflow_server, tiny_bundle, data_dir, tmp_path_factory):
    """The tiny bundle, with a reference profile of 20 validation images, registered as
    ``models:/<REFERENCE_MODEL>@champion`` on the session's MLflow (as the sweep registers one)."""
    import shutil

    import mlflow

    from cxr_core.reference import write_reference_profile
    from training.registry import register_bundle
    from tests.conftest import make_subset

    root = tmp_path_factory.mktemp("champion")
    bundle = shutil.copytree(tiny_bundle, root / "bundle")
    subset = make_subset(data_dir, root / "data", {"normal": 7, "pneumonia": 7, "tuberculosis": 6}, splits=("val",))
    write_reference_profile(bundle, subset, splits=("val",))

    mlflow.set_experiment("chart-runtime")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    register_bundle(bundle, run_id, tags={"source": "tests"}, promote=True, name=REFERENCE_MODEL)
    return mlflow_server.url


def test_drift_cronjob_command_reads_the_audit_claim_and_decides_ok(chart, predictor, claims, sample_image,
                                                                   champion_reference, tmp_path):
    assert predictor.ready_after_s is not None, f"predictor not ready:\n{predictor.log_tail()}"
    request_id, response = predictor.predict(sample_image.read_bytes())
    assert response.status_code == 200, response.text
    cronjob = one(chart, "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    files = PodFiles.of(tmp_path / "drift-pod", claims, container, pod.get("volumes", []),
                        extra={"/app": REPO_ROOT, "/opt/venv": Path(sys.prefix)})
    template = files.mounts.get("/etc/cxr-screen/rayjob")
    if template is not None:  # the ConfigMap's content, as the kubelet projects it
        (configmap,) = [c for c in chart.of_kind("ConfigMap") if c["metadata"]["name"].endswith("rayjob-template")]
        (template / "rayjob.yaml").write_text(configmap["data"]["rayjob.yaml"])
    env = pod_environment(image_env(REPO_ROOT / "docker" / "jobs.Dockerfile"), container, files, {}, {})
    env["MLFLOW_TRACKING_URI"] = champion_reference  # the chart's MLflow Service, here the session's server
    command = [sys.executable if arg == "python" else arg for arg in container["command"]]
    args = [files.rewrite(arg) for arg in container.get("args", [])]
    done = subprocess.run([*command, *args], cwd=env["HOME"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"drift exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    rendered_args = container["args"]
    out = files.local(rendered_args[rendered_args.index("--output") + 1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decision"] == "ok"
    assert summary["current"]["window"]["rows"] >= 1, summary["current"]


def test_rendered_predictor_writes_only_to_its_volumes(chart, predictor, sample_image):
    """readOnlyRootFilesystem holds: after a served request nothing was written outside the mounts."""
    assert predictor.ready_after_s is not None, f"predictor not ready:\n{predictor.log_tail()}"
    _, response = predictor.predict(sample_image.read_bytes())
    assert response.status_code == 200, response.text
    (container,) = [c for c in one(chart, "ServingRuntime")["spec"]["containers"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    written = sorted(str(path.relative_to(predictor.rootfs)) for path in predictor.rootfs.rglob("*") if path.is_file())
    assert written == [], f"written outside the pod's volumes: {written[:20]}"
