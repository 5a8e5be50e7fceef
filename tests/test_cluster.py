"""The chart against a real API server (tests/cluster.py): what `helm install` really gets answered.

One control plane for the session (`kube_cluster`), one namespace per test, each labelled
PodSecurity `enforce=restricted`, so the tests run in any order and in parallel sessions. There is
no kubelet and no KServe / KubeRay controller: pods are admitted and bound, then stay Pending; the
pods KServe and KubeRay would create from the InferenceService and the RayJob are sent as
server-side dry-run Pods instead.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from charts import validate
from tests.cluster import NODE_NAME, Cluster
from tests.kserve_pod import predictor_container

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
CI_DIR = validate.CHART_DIR / "ci"
CI_FILES = sorted(path.name for path in CI_DIR.glob("*.yaml"))
RELEASE = "cxr-screen"
KEEP = "helm.sh/resource-policy"
WORKLOADS = ("Deployment", "StatefulSet")


# --- small REST helpers (the API server's own answers, status codes included) ---------------------


def plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


def collection(obj: dict[str, Any], namespace: str) -> str:
    api_version = obj["apiVersion"]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural(obj['kind'])}"


def rest(cluster: Cluster, token: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=cluster.server, verify=str(cluster.ca_file), timeout=30,
                        headers={"Authorization": f"Bearer {token or cluster.token}"})


def restricted_namespace(cluster: Cluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    with rest(cluster) as kube:
        response = kube.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                     "pod-security.kubernetes.io/enforce-version": "latest"}}})
        assert response.status_code == 201, response.text
        deadline = time.monotonic() + 30  # pods need the namespace's default ServiceAccount
        while kube.get(f"/api/v1/namespaces/{name}/serviceaccounts/default").status_code != 200:
            assert time.monotonic() < deadline, "no default ServiceAccount"
            time.sleep(0.2)
    return name


def helm_config(cluster: Cluster, namespace: str):
    import helm_python

    return helm_python.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=namespace)


def manifest_objects(release: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]


def claims_named_in(values: Any) -> set[str]:
    """Every ``existingClaim`` a values file names: the cluster has those before `helm install`."""
    found: set[str] = set()
    if isinstance(values, dict):
        for key, value in values.items():
            if key == "existingClaim" and value:
                found.add(value)
            else:
                found |= claims_named_in(value)
    elif isinstance(values, list):
        for item in values:
            found |= claims_named_in(item)
    return found


def create_claim(kube: httpx.Client, namespace: str, name: str) -> None:
    response = kube.post(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", json={
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    assert response.status_code == 201, response.text


def pods_bound(kube: httpx.Client, namespace: str, expected: int, timeout_s: float = 90) -> list[dict]:
    """Wait until ``expected`` pods exist in ``namespace`` and each is bound to the node."""
    deadline = time.monotonic() + timeout_s
    while True:
        pods = kube.get(f"/api/v1/namespaces/{namespace}/pods").json()["items"]
        bound = [pod for pod in pods if pod["spec"].get("nodeName") == NODE_NAME]
        if len(bound) >= expected:
            return bound
        if time.monotonic() > deadline:
            events = kube.get(f"/api/v1/namespaces/{namespace}/events").json()["items"]
            problems = sorted({f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['message']}"
                               for e in events if e["type"] == "Warning"})
            pytest.fail(f"{len(bound)}/{expected} pods bound in {namespace}:\n" + "\n".join(problems))
        time.sleep(0.5)


def dry_run_pod(kube: httpx.Client, namespace: str, name: str, spec: dict[str, Any]) -> httpx.Response:
    return kube.post(f"/api/v1/namespaces/{namespace}/pods", params={"dryRun": "All", "fieldValidation": "Strict"},
                     json={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def controller_pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pods KServe and KubeRay would create: the predictor (runtime + model container, the
    predictor's pod fields) and the Ray head and worker groups."""
    specs: dict[str, dict[str, Any]] = {}
    runtimes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServingRuntime"}
    for isvc in (o for o in objects if o["kind"] == "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        runtime = runtimes.get(predictor["model"].get("runtime", ""))
        if runtime is None:
            continue
        container = predictor_container(runtime, isvc)
        pod_fields = {k: v for k, v in predictor.items() if k in (
            "serviceAccountName", "securityContext", "imagePullSecrets", "nodeSelector", "tolerations",
            "affinity", "volumes", "automountServiceAccountToken")}
        volumes = pod_fields.get("volumes", [])
        container["volumeMounts"] = [m for m in container.get("volumeMounts", [])
                                     if m["name"] in {v["name"] for v in volumes}]
        specs["predictor"] = {**pod_fields, "containers": [container]}
    for rayjob in (o for o in objects if o["kind"] == "RayJob"):
        cluster_spec = rayjob["spec"]["rayClusterSpec"]
        specs["ray-head"] = cluster_spec["headGroupSpec"]["template"]["spec"]
        for group in cluster_spec.get("workerGroupSpecs", []):
            specs[f"ray-{group['groupName']}"] = group["template"]["spec"]
    return specs


# --- hooks: no kubelet, so a hook Job would never complete ---------------------------------------
# helm-python-sdk's install / upgrade wait for a hook Job to finish; with no kubelet its pod stays
# Pending and the install would time out. So the tests install with hooks disabled
# (`disable_hooks`, passed to helm-c-sdk's options as `helm install --no-hooks` does) and stand in
# for the hook themselves: they create the hook's rendered ServiceAccount / Role / RoleBinding as
# Helm would, mint that ServiceAccount a token (TokenRequest, as the kubelet would) and run the
# hook container's command, `python -m charts.secrets`, as a local process with it.


def _release_call(helm, action: str, values: dict[str, Any], namespace: str, timeout: int = 120) -> dict[str, Any]:
    from helm_python import _native
    from helm_python.config import _loads_obj, _opts

    handle, ref = helm._chart_args(str(validate.CHART_DIR))
    payload = _native.call_string(f"helm_{action}", helm._raw(), helm._context_arg(None), handle, ref, RELEASE,
                                  json.dumps(values), _opts(namespace=namespace, timeout_seconds=timeout,
                                                            disable_hooks=True))
    return _loads_obj(payload)


def hook_objects(values: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    chart = validate.render_chart(values, namespace=namespace)
    return [o for o in chart.objects if (o["metadata"].get("annotations") or {}).get("helm.sh/hook")]


def run_secrets_hook(cluster: Cluster, values: dict[str, Any], namespace: str, tmp_path: Path) -> list[dict]:
    """What the pre-install / pre-upgrade hook does, as the hook's own ServiceAccount."""
    hooks = hook_objects(values, namespace)
    jobs = [o for o in hooks if o["kind"] == "Job"]
    if not jobs:  # every Secret is the user's own (existingSecret): no hook is rendered
        return []
    (job,) = jobs
    with rest(cluster) as kube:
        for obj in (o for o in hooks if o["kind"] != "Job"):
            url = f"{collection(obj, namespace)}/{obj['metadata']['name']}"
            kube.delete(url)  # before-hook-creation
            response = kube.post(collection(obj, namespace), json=obj)
            assert response.status_code == 201, response.text
    container = job["spec"]["template"]["spec"]["containers"][0]
    account = job["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = service_account_kubeconfig(cluster, namespace, account, tmp_path / f"hook-{uuid.uuid4().hex[:6]}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "KUBECONFIG": str(kubeconfig),
           **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    command = [sys.executable if part == "python" else part for part in container["command"]]
    done = subprocess.run([*command, *container["args"]], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def install(cluster: Cluster, helm, values: dict[str, Any], namespace: str, tmp_path: Path) -> dict[str, Any]:
    run_secrets_hook(cluster, values, namespace, tmp_path)
    return _release_call(helm, "install", values, namespace)


def upgrade(cluster: Cluster, helm, values: dict[str, Any], namespace: str, tmp_path: Path) -> dict[str, Any]:
    run_secrets_hook(cluster, values, namespace, tmp_path)
    return _release_call(helm, "upgrade", values, namespace)


def secret_data(kube: httpx.Client, namespace: str, name: str) -> dict[str, str]:
    response = kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    assert response.status_code == 200, response.text
    return response.json()["data"]


# --- the tests -----------------------------------------------------------------------------------


def test_cluster_has_a_ready_node_the_crds_and_started_quickly(kube_cluster):
    with rest(kube_cluster) as kube:
        node = kube.get(f"/api/v1/nodes/{NODE_NAME}").json()
        assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
        assert not node["spec"].get("taints")
        for path in ("/apis/serving.kserve.io/v1beta1", "/apis/serving.kserve.io/v1alpha1", "/apis/ray.io/v1"):
            assert kube.get(path).status_code == 200, path
    print(f"control plane started in {kube_cluster.started_s} s")
    assert kube_cluster.started_s < 120


@pytest.mark.parametrize("name", CI_FILES)
def test_helm_install_in_a_restricted_namespace_admits_and_binds_every_pod(kube_cluster, name, tmp_path):
    values = yaml.safe_load((CI_DIR / name).read_text()) or {}
    namespace = restricted_namespace(kube_cluster, "ci-" + name.removesuffix("-values.yaml"))
    with rest(kube_cluster) as kube, helm_config(kube_cluster, namespace) as helm:
        for claim in sorted(claims_named_in(values)):
            create_claim(kube, namespace, claim)
        release = install(kube_cluster, helm, values, namespace, tmp_path)
        assert helm.status(RELEASE)["status"] == "deployed"
        objects = manifest_objects(release)
        for obj in objects:  # the API server holds every object the chart rendered
            response = kube.get(f"{collection(obj, namespace)}/{obj['metadata']['name']}")
            assert response.status_code == 200, f"{obj['kind']}/{obj['metadata']['name']}: {response.text}"
        expected = sum(int(o["spec"].get("replicas", 1)) for o in objects if o["kind"] in WORKLOADS)
        for cronjob in (o for o in objects if o["kind"] == "CronJob"):  # kubectl create job --from=cronjob/...
            response = kube.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", json={
                "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": cronjob["metadata"]["name"] + "-now"},
                "spec": cronjob["spec"]["jobTemplate"]["spec"]})
            assert response.status_code == 201, response.text
            expected += 1
        bound = pods_bound(kube, namespace, expected)
        assert len(bound) == expected
        specs = controller_pod_specs(objects)
        for job in (o for o in hook_objects(values, namespace) if o["kind"] == "Job"):  # PodSecurity restricted
            specs["secrets-hook"] = job["spec"]["template"]["spec"]
        for pod_name, spec in specs.items():
            response = dry_run_pod(kube, namespace, pod_name, spec)
            assert response.status_code == 201, f"{pod_name}: {response.json().get('message')}"


def workers_of(deployment: dict[str, Any]) -> str:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--workers") + 1]


def test_upgrade_keeps_generated_secrets_rollback_restores_and_uninstall_leaves_only_kept(kube_cluster, tmp_path):
    namespace = restricted_namespace(kube_cluster, "lifecycle")
    secrets = [f"{RELEASE}-api-keys", f"{RELEASE}-postgresql"]
    with rest(kube_cluster) as kube, helm_config(kube_cluster, namespace) as helm:
        first = install(kube_cluster, helm, {}, namespace, tmp_path)
        assert not [o for o in manifest_objects(first) if o["kind"] == "Secret"]  # none rendered
        before = {n: secret_data(kube, namespace, n) for n in secrets}
        caller, _, key = base64.b64decode(before[secrets[0]]["api-keys"]).decode().partition(":")
        assert caller == "default" and len(key) >= 40
        assert len(base64.b64decode(before[secrets[1]]["password"])) >= 40

        upgrade(kube_cluster, helm, {"mlflow": {"workers": 3}}, namespace, tmp_path)
        assert {n: secret_data(kube, namespace, n) for n in secrets} == before
        mlflow = [o for o in manifest_objects(first) if o["kind"] == "Deployment"
                  and o["metadata"]["labels"].get("app.kubernetes.io/component") == "mlflow"][0]
        path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{mlflow['metadata']['name']}"
        assert workers_of(kube.get(path).json()) == "3"

        helm.rollback(RELEASE, version=1, timeout=120)
        assert helm.status(RELEASE)["revision"] == 3
        assert workers_of(kube.get(path).json()) == workers_of(mlflow) == "2"
        assert {n: secret_data(kube, namespace, n) for n in secrets} == before

        objects = manifest_objects(first)
        helm.uninstall(RELEASE, timeout=120)
        kept = {(o["kind"], o["metadata"]["name"]) for o in objects
                if (o["metadata"].get("annotations") or {}).get(KEEP) == "keep"}
        for obj in objects:
            status = kube.get(f"{collection(obj, namespace)}/{obj['metadata']['name']}").status_code
            key = (obj["kind"], obj["metadata"]["name"])
            assert status == (200 if key in kept else 404), f"{key}: {status}"
        for name in secrets:  # the hook's Secrets are not the release's: uninstall leaves them
            response = kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
            assert response.status_code == 200
            assert response.json()["metadata"]["annotations"][KEEP] == "keep"
            assert response.json()["data"] == before[name]


def test_secrets_hook_account_may_read_only_its_secrets_and_create(kube_cluster, tmp_path):
    namespace = restricted_namespace(kube_cluster, "hook")
    first = run_secrets_hook(kube_cluster, {}, namespace, tmp_path)
    assert [(r["secret"], r["action"]) for r in first] == [
        (f"{RELEASE}-api-keys", "created"), (f"{RELEASE}-postgresql", "created")]
    assert all("value" not in r and "data" not in r for r in first)
    with rest(kube_cluster) as kube:
        before = {r["secret"]: secret_data(kube, namespace, r["secret"]) for r in first}
        second = run_secrets_hook(kube_cluster, {}, namespace, tmp_path)
        assert [r["action"] for r in second] == ["kept", "kept"]
        assert {r["secret"]: secret_data(kube, namespace, r["secret"]) for r in first} == before
    user = f"system:serviceaccount:{namespace}:{RELEASE}-secrets"
    for name in before:
        assert can(kube_cluster, user, "get", "secrets", namespace, resource_name=name)
    assert can(kube_cluster, user, "create", "secrets", namespace)
    denied = [("get", "secrets", "other"), ("list", "secrets", ""), ("watch", "secrets", ""),
              ("update", "secrets", f"{RELEASE}-postgresql"), ("patch", "secrets", f"{RELEASE}-api-keys"),
              ("delete", "secrets", f"{RELEASE}-api-keys"), ("create", "pods", ""), ("get", "configmaps", "")]
    for verb, resource, name in denied:
        assert not can(kube_cluster, user, verb, resource, namespace, resource_name=name), (verb, name)
    assert not can(kube_cluster, user, "create", "secrets", "default")


@pytest.fixture(scope="module")
def installed(kube_cluster, tmp_path_factory):
    """The default install in its own restricted namespace, for RBAC, the trigger and dry runs."""
    namespace = restricted_namespace(kube_cluster, "release")
    with helm_config(kube_cluster, namespace) as helm:
        release = install(kube_cluster, helm, {}, namespace, tmp_path_factory.mktemp("hook"))
    objects = manifest_objects(release)
    (account,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"
                  and o["metadata"]["labels"].get("app.kubernetes.io/component") == "drift"]
    return {"namespace": namespace, "objects": objects, "drift_account": account}


def can(cluster: Cluster, user: str, verb: str, resource: str, namespace: str, group: str = "",
        subresource: str = "", resource_name: str = "") -> bool:
    """SelfSubjectAccessReview, sent as ``user`` (impersonation)."""
    with rest(cluster) as kube:
        response = kube.post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", headers={
            "Impersonate-User": user, "Impersonate-Group": "system:serviceaccounts"}, json={
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {
                "resourceAttributes": {"namespace": namespace, "verb": verb, "group": group, "resource": resource,
                                       "subresource": subresource, "name": resource_name}}})
        assert response.status_code == 201, response.text
        return response.json()["status"]["allowed"]


def test_drift_service_account_may_start_a_rayjob_and_nothing_else(kube_cluster, installed):
    namespace = installed["namespace"]
    user = f"system:serviceaccount:{namespace}:{installed['drift_account']}"
    for verb in ("create", "get", "list"):
        assert can(kube_cluster, user, verb, "rayjobs", namespace, "ray.io"), verb
    denied = [("delete", "rayjobs", "ray.io", ""), ("patch", "rayjobs", "ray.io", ""),
              ("update", "rayjobs", "ray.io", "status"), ("create", "rayclusters", "ray.io", ""),
              ("get", "secrets", "", ""), ("list", "secrets", "", ""), ("create", "pods", "", ""),
              ("create", "pods", "", "exec"), ("create", "jobs", "batch", ""), ("get", "configmaps", "", ""),
              ("create", "inferenceservices", "serving.kserve.io", ""), ("create", "rolebindings",
                                                                          "rbac.authorization.k8s.io", "")]
    for verb, resource, group, sub in denied:
        assert not can(kube_cluster, user, verb, resource, namespace, group, sub), (verb, resource, sub)
    assert not can(kube_cluster, user, "create", "rayjobs", "default", "ray.io")  # only its own namespace


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig with a short-lived token of ``account`` (TokenRequest), as the pod would hold."""
    with rest(cluster) as kube:
        response = kube.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", json={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}})
        assert response.status_code == 201, response.text
        token = response.json()["status"]["token"]
    config = cluster.kubeconfig_dict()
    config["users"] = [{"name": "cxr-admin", "user": {"token": token}}]
    config["contexts"][0]["context"]["namespace"] = namespace
    path.write_text(yaml.safe_dump(config))
    return path


def test_trigger_creates_the_rayjob_as_the_drift_account_and_refuses_a_second_while_active(
        kube_cluster, installed, tmp_path):
    namespace = installed["namespace"]
    (configmap,) = [o for o in installed["objects"] if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"].endswith("-drift-rayjob-template")]
    template = tmp_path / "rayjob.yaml"
    template.write_text(configmap["data"]["rayjob.yaml"])
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"decision": "retrain", "created_at": "2026-03-02T02:00:00+00:00",
                                   "reasons": ["PSI of key feature border_ratio = 17.3 > 0.2"]}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "POD_NAMESPACE": namespace, "CXR_RAYJOB_TEMPLATE": str(template),
           "KUBECONFIG": str(service_account_kubeconfig(kube_cluster, namespace, installed["drift_account"],
                                                        tmp_path / "kubeconfig"))}

    def trigger() -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "monitoring.trigger", "--summary", str(summary),
                               "--target", "kubernetes"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout[done.stdout.index("{"):])

    def retrain_jobs() -> list[dict[str, Any]]:
        with rest(kube_cluster) as kube:
            return kube.get(f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs",
                            params={"labelSelector": "cxr-screen/trigger=drift"}).json()["items"]

    first = trigger()
    assert first["ok"] and first["created"].startswith(f"{RELEASE}-retrain-"), first
    (created,) = retrain_jobs()
    assert created["metadata"]["name"] == first["created"]
    assert created["metadata"]["annotations"]["cxr-screen/drift-decision"] == "retrain"

    second = trigger()
    assert second["ok"] and second["created"] is None and second["active"] == [first["created"]], second
    assert len(retrain_jobs()) == 1

    with rest(kube_cluster) as kube:  # KubeRay's word that it finished
        response = kube.patch(f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{first['created']}/status",
                              headers={"Content-Type": "application/merge-patch+json"},
                              json={"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
        assert response.status_code == 200, response.text
    third = trigger()
    assert third["ok"] and third["created"] not in (None, first["created"]), third
    assert len(retrain_jobs()) == 2


def test_server_side_dry_run_accepts_the_chart_and_rejects_a_misspelled_field(kube_cluster, installed):
    namespace = restricted_namespace(kube_cluster, "dryrun")
    strict = {"dryRun": "All", "fieldValidation": "Strict"}
    objects = [o for o in installed["objects"] if o["kind"] in ("Deployment", "InferenceService", "RayJob")]
    assert {o["kind"] for o in objects} >= {"Deployment", "InferenceService"}
    with rest(kube_cluster) as kube:
        for obj in objects:
            body = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
            response = kube.post(collection(obj, namespace), params=strict, json=body)
            assert response.status_code == 201, f"{obj['kind']}: {response.text}"
        deployment = json.loads(json.dumps(next(o for o in objects if o["kind"] == "Deployment")))
        deployment["metadata"]["namespace"] = namespace
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container["imagePullPolicyy"] = container.pop("imagePullPolicy", "IfNotPresent")
        response = kube.post(collection(deployment, namespace), params=strict, json=deployment)
        assert response.status_code in (400, 422) and "imagePullPolicyy" in response.text, response.text
        isvc = json.loads(json.dumps(next(o for o in objects if o["kind"] == "InferenceService")))
        isvc["metadata"]["namespace"] = namespace
        isvc["spec"]["predictor"]["minReplica"] = isvc["spec"]["predictor"].pop("minReplicas")
        response = kube.post(collection(isvc, namespace), params=strict, json=isvc)
        assert response.status_code in (400, 422) and "minReplica" in response.text, response.text
