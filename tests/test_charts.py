"""The Helm chart, rendered offline with every CI values file and validated without a cluster.

Built-in kinds go through kubernetes-validate (strict) for Kubernetes 1.30-1.33; InferenceService,
ServingRuntime and RayJob go through the CRD schemas in ../shared/k8s-schemas with unknown fields
forbidden. No torch, no cluster, no network.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
from pathlib import Path

import helm_python
import jsonschema
import pytest
import yaml

from charts import validate
from cxr_core.config import deep_merge

CI_FILES = {
    "default": "default-values.yaml",
    "production": "production-values.yaml",
    "no-mlflow": "no-mlflow-values.yaml",
    "no-drift": "no-drift-values.yaml",
    "no-sweep": "no-sweep-values.yaml",
    "no-inference": "no-inference-values.yaml",
    "no-networkpolicies": "no-networkpolicies-values.yaml",
    "review": "review-values.yaml",
}
# What `make package-model` writes and KServe mounts at /mnt/models (DESIGN.md, storage layout).
STORAGE_LAYOUT = ("config/config.properties", "model-store/cxr-screen.mar")
MOUNT = "/mnt/models"


def ci_path(name: str) -> Path:
    return validate.CI_VALUES_DIR / CI_FILES[name]


@functools.lru_cache(maxsize=None)
def _render_file(name: str) -> validate.RenderedChart:
    return validate.render_chart(ci_path(name))


def rendered(name: str) -> validate.RenderedChart:
    """A private copy of a cached render, so tests cannot disturb each other."""
    return copy.deepcopy(_render_file(name))


def one(chart: validate.RenderedChart, kind: str, name: str | None = None) -> dict:
    found = [
        obj
        for obj in chart.of_kind(kind)
        if name is None or obj["metadata"].get("name") == name
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def env_of(container: dict) -> dict:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def values_schema() -> dict:
    return json.loads((validate.CHART_DIR / "values.schema.json").read_text())


def default_values() -> dict:
    return yaml.safe_load((validate.CHART_DIR / "values.yaml").read_text())


# --- every values file: render, lint --strict, validate -----------------------------------------


def test_every_ci_values_file_is_checked():
    assert sorted(p.name for p in validate.ci_values_files()) == sorted(CI_FILES.values())


@pytest.mark.parametrize("name", sorted(CI_FILES))
def test_values_file_renders_lints_strictly_and_validates(name):
    report = validate.check_values(ci_path(name), name=name)
    assert report.problems == []
    assert sum(report.kinds.values()) > 0


def test_kubernetes_versions_are_all_supported_and_unknown_ones_fail_loudly():
    supported = validate.supported_kubernetes_versions()
    assert set(validate.KUBERNETES_VERSIONS) == {"1.30", "1.31", "1.32", "1.33"}
    assert set(validate.KUBERNETES_VERSIONS) <= set(supported)
    service = one(rendered("default"), "Service", "cxr-screen-mlflow")
    with pytest.raises(validate.ChartValidationError, match="1.99"):
        validate.validate_builtin(service, ["1.30", "1.99"])


def test_cli_prints_kinds_per_values_file_and_exits_zero(capsys):
    assert validate.main(["--values", str(ci_path("no-sweep"))]) == 0
    out = capsys.readouterr().out
    assert "| kind | no-sweep |" in out
    assert "| InferenceService | 1 |" in out
    assert "RayJob" not in out


def test_cli_exits_nonzero_on_a_bad_values_file(tmp_path, capsys):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("inferenceService:\n  predictorExtra:\n    minReplica: 2\n")
    assert validate.main(["--values", str(bad)]) == 1
    assert "minReplica" in capsys.readouterr().err


# --- key facts ------------------------------------------------------------------------------


def test_default_keeps_at_least_one_replica_and_the_schema_enforces_it():
    isvc = one(rendered("default"), "InferenceService")
    assert isvc["spec"]["predictor"]["minReplicas"] >= 1
    assert default_values()["inferenceService"]["minReplicas"] == 1
    with pytest.raises(helm_python.HelmValuesError, match="minReplicas"):
        validate.render_chart({"inferenceService": {"minReplicas": 0}})


def test_max_replicas_below_min_replicas_fails_to_render():
    with pytest.raises(helm_python.HelmError, match="maxReplicas"):
        validate.render_chart({"inferenceService": {"minReplicas": 3, "maxReplicas": 2}})


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_protocol_version_switch(protocol):
    chart = validate.render_chart({"inferenceService": {"protocolVersion": protocol}})
    isvc = one(chart, "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == protocol
    assert validate.validate_objects(chart.objects) == []
    runtime = one(chart, "ServingRuntime")
    assert {"v1", "v2"} <= set(runtime["spec"]["protocolVersions"])


def test_unknown_protocol_version_is_rejected():
    with pytest.raises(helm_python.HelmValuesError, match="protocolVersion"):
        validate.render_chart({"inferenceService": {"protocolVersion": "grpc-v3"}})


def test_predictor_is_pytorch_on_the_charts_torchserve_runtime():
    chart = rendered("default")
    model = one(chart, "InferenceService")["spec"]["predictor"]["model"]
    runtime = one(chart, "ServingRuntime")
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert "pytorch" in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    # A runtime that is not created leaves the choice to KServe (kserve-torchserve).
    plain = validate.render_chart({"inferenceService": {"runtime": {"create": False}}})
    assert "runtime" not in one(plain, "InferenceService")["spec"]["predictor"]["model"]
    assert plain.of_kind("ServingRuntime") == []


def test_storage_uri_ends_at_the_folder_holding_config_and_model_store():
    for name in ("default", "production"):
        chart = rendered(name)
        values = validate.load_values(ci_path(name))
        uri = one(chart, "InferenceService")["spec"]["predictor"]["model"]["storageUri"]
        expected = values.get("inferenceService", {}).get(
            "storageUri", default_values()["inferenceService"]["storageUri"]
        )
        assert uri == expected
        assert uri.split("://")[0] in {"pvc", "s3", "gs"}
        assert not uri.rstrip("/").endswith(("model-store", "config", ".mar"))
        # The runtime opens exactly the layout below the folder KServe mounts at /mnt/models.
        args = one(chart, "ServingRuntime")["spec"]["containers"][0]["args"]
        ts_config = args[args.index("--ts-config") + 1]
        model_store = args[args.index("--model-store") + 1]
        model_name = one(chart, "InferenceService")["spec"]["predictor"]["model"]["env"]
        model_name = {e["name"]: e.get("value") for e in model_name}["CXR_MODEL_NAME"]
        opened = (
            str(Path(ts_config).relative_to(MOUNT)),
            str(Path(model_store).relative_to(MOUNT) / f"{model_name}.mar"),
        )
        assert opened == STORAGE_LAYOUT


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://models/champion/model-store",
        "pvc://models/champion/model-store/cxr-screen.mar",
        "s3://bucket/champion/config",
        "s3://bucket/champion/config/config.properties",
        "https://example.org/champion",
        "/mnt/models",
    ],
)
def test_storage_uri_below_or_outside_the_layout_folder_is_rejected(uri):
    with pytest.raises(helm_python.HelmValuesError, match="storageUri"):
        validate.render_chart({"inferenceService": {"storageUri": uri}})


def test_canary_percent_lands_in_the_inference_service():
    assert "canaryTrafficPercent" not in one(rendered("default"), "InferenceService")["spec"]["predictor"]
    assert one(rendered("production"), "InferenceService")["spec"]["predictor"]["canaryTrafficPercent"] == 10
    chart = validate.render_chart({"inferenceService": {"canaryTrafficPercent": 0}})
    assert one(chart, "InferenceService")["spec"]["predictor"]["canaryTrafficPercent"] == 0
    with pytest.raises(helm_python.HelmValuesError, match="canaryTrafficPercent"):
        validate.render_chart({"inferenceService": {"canaryTrafficPercent": 101}})


def test_production_predictor_has_gpu_api_key_autoscaling_and_private_images():
    chart = rendered("production")
    predictor = one(chart, "InferenceService")["spec"]["predictor"]
    model = predictor["model"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 8)
    assert predictor["maxReplicas"] == 6
    api_keys = env_of(model)["CXR_API_KEYS"]
    assert api_keys == {"secretKeyRef": {"name": "cxr-screen-api-keys", "key": "api-keys"}}
    assert chart.of_kind("Secret") == []  # every Secret is the hospital's own
    runtime = one(chart, "ServingRuntime")
    assert runtime["spec"]["containers"][0]["image"].startswith("registry.radiology.hospital.example/")
    for obj in chart.objects:
        for image in _images(obj):
            assert image.startswith("registry.radiology.hospital.example/"), (obj["kind"], image)
    ingress = one(chart, "Ingress")
    assert ingress["spec"]["tls"][0]["secretName"] == "cxr-screen-tls"
    # Without a GPU nothing asks for one.
    default_model = one(rendered("default"), "InferenceService")["spec"]["predictor"]["model"]
    assert "nvidia.com/gpu" not in default_model["resources"].get("limits", {})


def _images(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images(item)


# --- each feature off really removes its objects ---------------------------------------------

FEATURE_OBJECTS = {
    "no-mlflow": [
        ("Deployment", "cxr-screen-mlflow"),
        ("Service", "cxr-screen-mlflow"),
        ("NetworkPolicy", "cxr-screen-mlflow"),
        ("StatefulSet", "cxr-screen-postgresql"),
        ("Service", "cxr-screen-postgresql"),
        ("NetworkPolicy", "cxr-screen-postgresql"),
        ("PersistentVolumeClaim", "cxr-screen-mlflow-artifacts"),
    ],
    "no-drift": [
        ("CronJob", "cxr-screen-drift"),
        ("ServiceAccount", "cxr-screen-drift"),
        ("Role", "cxr-screen-drift-rayjobs"),
        ("RoleBinding", "cxr-screen-drift-rayjobs"),
        ("ConfigMap", "cxr-screen-drift-rayjob-template"),
    ],
    "no-sweep": [("RayJob", "cxr-screen-sweep")],
    "no-inference": [
        ("InferenceService", "cxr-screen"),
        ("ServingRuntime", "cxr-screen-torchserve"),
        ("NetworkPolicy", "cxr-screen-predictor"),
        ("ServiceAccount", "cxr-screen-predictor"),
    ],
    "no-networkpolicies": [
        ("NetworkPolicy", "cxr-screen-predictor"),
        ("NetworkPolicy", "cxr-screen-mlflow"),
        ("NetworkPolicy", "cxr-screen-postgresql"),
    ],
}


def _keys(chart: validate.RenderedChart) -> set[tuple[str, str]]:
    return {(obj["kind"], obj["metadata"].get("name", "")) for obj in chart.objects}


@pytest.mark.parametrize("name", sorted(FEATURE_OBJECTS))
def test_each_feature_off_file_removes_its_objects_and_only_those(name):
    default, off = _keys(rendered("default")), _keys(rendered(name))
    owned = set(FEATURE_OBJECTS[name])
    assert owned <= default
    assert not owned & off
    assert default - off == owned


def test_no_sweep_keeps_the_rayjob_template_for_retraining():
    chart = rendered("no-sweep")
    assert chart.of_kind("RayJob") == []
    template = one(chart, "ConfigMap", "cxr-screen-drift-rayjob-template")
    (embedded,) = validate.parse_manifests(template["data"]["rayjob.yaml"])
    assert embedded["kind"] == "RayJob"
    # Its shared results claim is still rendered.
    one(chart, "PersistentVolumeClaim", "cxr-screen-ray-results")


def test_no_mlflow_points_the_jobs_at_the_external_tracking_server():
    chart = rendered("no-mlflow")
    rayjob = one(chart, "RayJob")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert env_of(head)["MLFLOW_TRACKING_URI"] == "https://mlflow.example.org"


# --- misspelled fields fail -------------------------------------------------------------------


def test_misspelled_field_in_predictor_extra_fails_crd_validation():
    chart = validate.render_chart({"inferenceService": {"predictorExtra": {"minReplica": 2}}})
    problems = validate.validate_objects(chart.objects)
    assert len(problems) == 1
    assert "InferenceService" in problems[0] and "'minReplica' was unexpected" in problems[0]
    # The correctly spelled field passes (predictorExtra is merged as is).
    good = validate.render_chart({"inferenceService": {"predictorExtra": {"containerConcurrency": 4}}})
    assert validate.validate_objects(good.objects) == []


def test_misspelled_affinity_fails_strict_builtin_validation_for_every_version():
    values = {"mlflow": {"affinity": {"nodeAfinity": {}}}}
    problems = validate.validate_objects(validate.render_chart(values).objects)
    assert len(problems) == len(validate.KUBERNETES_VERSIONS)
    for version, problem in zip(validate.KUBERNETES_VERSIONS, problems):
        assert f"k8s {version} strict" in problem and "nodeAfinity" in problem


def test_misspelled_toleration_fails_in_the_rayjob_and_in_its_template():
    values = {"sweep": {"workers": {"tolerations": [{"keyy": "gpu", "operator": "Exists"}]}}}
    problems = validate.validate_objects(validate.render_chart(values).objects)
    assert len(problems) == 2
    assert any(p.startswith("RayJob/cxr-screen-sweep") for p in problems)
    assert any(p.startswith("ConfigMap/cxr-screen-drift-rayjob-template") for p in problems)
    assert all("'keyy' was unexpected" in p for p in problems)


def test_values_schema_rejects_unknown_top_level_and_misspelled_nested_values():
    for bad in ({"inferenceServce": {"enabled": True}}, {"inferenceService": {"minReplica": 2}}):
        with pytest.raises(helm_python.HelmValuesError, match="additional properties"):
            validate.render_chart(bad)
    schema = values_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid(default_values())
    for name in CI_FILES:
        merged = deep_merge(default_values(), validate.load_values(ci_path(name)))
        assert list(validator.iter_errors(merged)) == [], name
    assert not validator.is_valid({**default_values(), "replicaCount": 2})


def test_values_schema_requires_the_external_database_secret_without_bundled_postgres():
    with pytest.raises(helm_python.HelmValuesError, match="existingSecret"):
        validate.render_chart({"postgresql": {"enabled": False}})


# --- the parts ------------------------------------------------------------------------------


def test_mlflow_server_command_probes_and_backend_stores():
    chart = rendered("default")
    container = one(chart, "Deployment", "cxr-screen-mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["command"] == ["mlflow", "server"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "5000"
    # the URI carries the database password: MLflow reads it from the environment, never from argv
    assert "--backend-store-uri" not in args and not any("MLFLOW_BACKEND_STORE_URI" in arg for arg in args)
    assert args[args.index("--artifacts-destination") + 1] == "/mlartifacts"
    env = env_of(container)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:$(POSTGRES_PASSWORD)@cxr-screen-postgresql:5432/")
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # Clients use the Service's DNS name as Host header; MLflow must accept it.
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert "cxr-screen-mlflow.cxr-screen*" in allowed
    # Production: external database and S3 artifacts from existing Secrets.
    prod = one(rendered("production"), "Deployment", "cxr-screen-mlflow")["spec"]["template"]["spec"]
    prod_args, prod_env = prod["containers"][0]["args"], env_of(prod["containers"][0])
    assert prod_args[prod_args.index("--artifacts-destination") + 1] == "s3://radiology-mlflow/cxr-screen"
    assert prod_env["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "cxr-screen-mlflow-db", "key": "uri"}}
    assert prod_env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "cxr-screen-mlflow-s3"
    assert "volumes" not in prod or all(v["name"] != "artifacts" for v in prod["volumes"])


def test_drift_cronjob_command_thresholds_and_least_rbac():
    chart = rendered("default")
    cronjob = one(chart, "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "monitoring.drift"]
    args = container["args"]
    for flag in ("--current", "--reference", "--output"):
        assert flag in args
    thresholds = {
        flag: float(args[args.index(flag) + 1])
        for flag in ("--psi-threshold", "--class-share-threshold", "--ece-threshold")
    }
    assert thresholds == {"--psi-threshold": 0.2, "--class-share-threshold": 0.15, "--ece-threshold": 0.1}
    assert env_of(container)["CXR_RAYJOB_TEMPLATE"] == "/etc/cxr-screen/rayjob/rayjob.yaml"
    assert pod["serviceAccountName"] == "cxr-screen-drift"
    role = one(chart, "Role", "cxr-screen-drift-rayjobs")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}
    ]
    binding = one(chart, "RoleBinding", "cxr-screen-drift-rayjobs")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cxr-screen-drift", "namespace": validate.NAMESPACE}
    ]
    custom = validate.render_chart({"drift": {"thresholds": {"psi": 0.3, "classShare": 0.1, "ece": 0.05}}})
    args = one(custom, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--psi-threshold") + 1] == "0.3"
    assert args[args.index("--ece-threshold") + 1] == "0.05"


def test_rayjob_runs_the_sweep_with_shared_storage_and_mlflow():
    chart = rendered("default")
    rayjob = one(chart, "RayJob")
    spec = rayjob["spec"]
    assert spec["entrypoint"] == (
        "python -m training.sweep --budget full --data-dir /data/cxr3 --storage-path /shared/ray-results"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert env_of(container)["MLFLOW_TRACKING_URI"] == "http://cxr-screen-mlflow.cxr-screen.svc:5000"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/shared"] == "shared" and mounts["/data"] == "data"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
        assert claims["shared"] == "cxr-screen-ray-results"
    assert "MLFLOW_TRACKING_URI" in spec["runtimeEnvYAML"]


def test_drift_template_is_the_sweep_rayjob_with_generate_name():
    chart = rendered("default")
    sweep = one(chart, "RayJob")
    template = one(chart, "ConfigMap", "cxr-screen-drift-rayjob-template")
    (embedded,) = validate.parse_manifests(template["data"]["rayjob.yaml"])
    assert embedded["metadata"]["generateName"] == "cxr-screen-retrain-"
    assert "name" not in embedded["metadata"]
    expected = {k: v for k, v in sweep["spec"].items() if k != "suspend"}
    assert embedded["spec"] == expected
    # monitoring/ validates what it builds the same way.
    assert validate.validate_object(embedded) == []
    embedded["spec"]["shutdownAfterJobFinishs"] = True
    assert "'shutdownAfterJobFinishs' was unexpected" in validate.validate_object(embedded)[0]


def test_network_policies_isolate_predictor_mlflow_and_postgres():
    chart = rendered("default")
    predictor = one(chart, "NetworkPolicy", "cxr-screen-predictor")["spec"]
    assert predictor["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "cxr-screen"}
    peers = predictor["ingress"][0]["from"]
    assert all(set(peer) == {"namespaceSelector"} for peer in peers)
    assert {"istio-system", "knative-serving", "ingress-nginx"} == {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in peers
    }
    mlflow = one(chart, "NetworkPolicy", "cxr-screen-mlflow")["spec"]
    assert mlflow["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"cxr-screen/mlflow-client": "true"}}}]
    # The pods that must reach MLflow carry the label; the predictor does not.
    client_pods = [
        one(chart, "CronJob")["spec"]["jobTemplate"]["spec"]["template"],
        one(chart, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
        one(chart, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"],
    ]
    for pod in client_pods:
        assert pod["metadata"]["labels"]["cxr-screen/mlflow-client"] == "true"
    postgres = one(chart, "NetworkPolicy", "cxr-screen-postgresql")["spec"]
    mlflow_pods = one(chart, "Deployment", "cxr-screen-mlflow")["spec"]["selector"]["matchLabels"]
    assert postgres["ingress"][0]["from"] == [{"podSelector": {"matchLabels": mlflow_pods}}]
    # No configured peer means nothing gets in, never "everything gets in".
    closed = validate.render_chart({"networkPolicies": {"predictor": {"fromNamespaces": []}}})
    assert one(closed, "NetworkPolicy", "cxr-screen-predictor")["spec"]["ingress"] == []


def test_every_pod_runs_as_non_root_without_privilege_escalation():
    for name in ("default", "production"):
        for obj in rendered(name).objects:
            for pod_spec, containers in _pods(obj):
                pod_level = pod_spec.get("securityContext", {}).get("runAsNonRoot")
                for container in containers:
                    context = container["securityContext"]
                    assert context.get("runAsNonRoot", pod_level) is True, obj["kind"]
                    assert context["allowPrivilegeEscalation"] is False, obj["kind"]


def _pods(obj):
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet"):
        yield spec["template"]["spec"], spec["template"]["spec"]["containers"]
    elif kind == "CronJob":
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        yield pod, pod["containers"]
    elif kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            yield group["template"]["spec"], group["template"]["spec"]["containers"]
    elif kind == "InferenceService":
        yield spec["predictor"], [spec["predictor"]["model"]]


def test_default_generates_an_api_key_secret_the_predictor_reads():
    chart = rendered("default")
    (job,) = [j for j in chart.of_kind("Job") if j["metadata"]["name"] == "cxr-screen-secrets"]
    assert "cxr-screen-api-keys/api-keys=default:{token}" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    model = one(chart, "InferenceService")["spec"]["predictor"]["model"]
    assert env_of(model)["CXR_API_KEYS"] == {"secretKeyRef": {"name": "cxr-screen-api-keys", "key": "api-keys"}}


def test_notes_print_v1_and_v2_calls():
    notes = rendered("default").notes
    assert "/v1/models/cxr-screen:predict" in notes
    assert "/v2/models/cxr-screen/infer" in notes
    assert '\\"datatype\\": \\"BYTES\\"' in notes
    prod_notes = rendered("production").notes
    assert "X-API-Key: $API_KEY" in prod_notes
    assert "https://cxr-screen.radiology.hospital.example" in prod_notes
    assert "10%" in prod_notes


# --- the validator itself --------------------------------------------------------------------


def test_forbid_unknown_fields_keeps_preserved_and_map_nodes_open():
    schema = {
        "type": "object",
        "properties": {
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "when": {"type": "string", "nullable": True},
        },
    }
    strict = validate.forbid_unknown_fields(schema)
    validator = jsonschema.Draft7Validator(strict)
    assert validator.is_valid({"open": {"anything": 1}, "map": {"k": "v"}, "when": None})
    assert not validator.is_valid({"typo": 1})
    assert "additionalProperties" not in schema  # the input is not changed


def test_crd_validators_exist_for_every_rendered_custom_kind():
    for kind in ("InferenceService", "ServingRuntime", "RayJob", "RayCluster"):
        assert validate.load_crd_validator(kind) is not None
    with pytest.raises(validate.ChartValidationError, match="no CRD schema"):
        validate.load_crd_validator("TrainJob")
    unknown = {"apiVersion": "kubeflow.org/v1", "kind": "TrainJob", "metadata": {"name": "x"}}
    assert "no schema for custom resource" in validate.validate_object(unknown)[0]


def test_schema_folder_comes_from_the_environment(monkeypatch, tmp_path):
    assert validate.schemas_dir().name == "k8s-schemas"
    monkeypatch.setenv(validate.SCHEMAS_ENV, str(tmp_path / "missing"))
    with pytest.raises(validate.ChartValidationError, match=validate.SCHEMAS_ENV):
        validate.schemas_dir()


def test_duplicate_keys_in_a_manifest_are_an_error():
    with pytest.raises(validate.ChartValidationError, match="duplicate key"):
        validate.parse_manifests("kind: A\nkind: B\n")


def test_make_package_model_writes_the_layout_the_chart_opens(monitoring_bundle, tmp_path):
    """`make package-model` output (serving.mar) is exactly what the rendered runtime reads below storageUri."""
    from serving.mar import build_package

    package = build_package(monitoring_bundle, tmp_path / "package", version="7")
    written = sorted(str(p.relative_to(package.root)) for p in package.root.rglob("*") if p.is_file())
    assert written == sorted(STORAGE_LAYOUT)
    chart = rendered("default")
    args = one(chart, "ServingRuntime")["spec"]["containers"][0]["args"]
    properties = dict(
        line.split("=", 1) for line in package.config.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert properties["model_store"] == args[args.index("--model-store") + 1]
    assert properties["enable_envvars_config"] == "true"
    snapshot = json.loads(properties["model_snapshot"])
    model = snapshot["models"]["cxr-screen"]["7"]
    assert {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"} <= set(model)


def test_predictor_has_probes_a_read_only_root_and_its_own_service_account():
    chart = rendered("default")
    (container,) = one(chart, "ServingRuntime")["spec"]["containers"]
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 300
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "TS_SERVICE_ENVELOPE" not in env_of(container)
    assert one(chart, "ServingRuntime")["spec"]["supportedModelFormats"][0]["autoSelect"] is False
    predictor = one(chart, "InferenceService")["spec"]["predictor"]
    assert predictor["model"]["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in predictor["model"]["volumeMounts"]}
    assert {"/home/model-server", "/tmp", "/var/log/cxr-screen"} <= mounts
    account = one(chart, "ServiceAccount", "cxr-screen-predictor")
    assert predictor["serviceAccountName"] == "cxr-screen-predictor"
    assert account["automountServiceAccountToken"] is False


def test_every_chart_container_but_ray_has_a_read_only_root():
    chart = rendered("default")
    for obj in chart.objects:
        for _, containers in _pods(obj):
            for container in containers:
                expected = not container.get("name", "").startswith("ray-")
                assert container["securityContext"].get("readOnlyRootFilesystem", False) is expected, (
                    obj["kind"], container["name"])


def test_pod_disruption_budgets_only_for_two_or_more_replicas():
    assert not rendered("default").of_kind("PodDisruptionBudget")  # 1 predictor, 1 MLflow
    chart = validate.render_chart({"inferenceService": {"minReplicas": 2}, "mlflow": {"replicas": 2}})
    budgets = {b["metadata"]["name"]: b["spec"] for b in chart.of_kind("PodDisruptionBudget")}
    assert budgets["cxr-screen-predictor"] == {
        "maxUnavailable": 1, "selector": {"matchLabels": {"serving.kserve.io/inferenceservice": "cxr-screen"}}}
    mlflow_pods = one(chart, "Deployment", "cxr-screen-mlflow")["spec"]["selector"]["matchLabels"]
    assert budgets["cxr-screen-mlflow"] == {"maxUnavailable": 1, "selector": {"matchLabels": mlflow_pods}}


def test_sweep_is_suspended_and_ingress_takes_a_radiograph_by_default():
    chart = rendered("default")
    assert one(chart, "RayJob")["spec"]["suspend"] is True
    ingress = one(validate.render_chart({"ingress": {"enabled": True, "host": "cxr.example"}}), "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "48m"


def test_audit_log_claim_is_created_and_mounted_by_predictor_and_drift():
    chart = rendered("default")
    claim = one(chart, "PersistentVolumeClaim", "cxr-screen-audit-log")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    predictor = one(chart, "InferenceService")["spec"]["predictor"]
    drift = one(chart, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for pod in (predictor, drift):
        assert {"name": "audit-log", "persistentVolumeClaim": {"claimName": "cxr-screen-audit-log"}} in pod["volumes"]
    (container,) = drift["containers"]
    assert {"name": "audit-log", "mountPath": "/var/log/cxr-screen"} in container["volumeMounts"]
    args = container["args"]
    assert args[args.index("--current") + 1] == "/var/log/cxr-screen"
    assert args[args.index("--window-days") + 1] == "1"
    assert env_of(container)["CXR_FEEDBACK_DB"] == "/var/log/cxr-screen/feedback.db"
    existing = validate.render_chart({"auditLog": {"existingClaim": "hospital-audit"}})
    assert not [c for c in existing.of_kind("PersistentVolumeClaim") if c["metadata"]["name"].endswith("audit-log")]


def test_review_is_off_by_default_and_reads_what_the_drift_job_reads_when_on():
    assert default_values()["review"]["enabled"] is False
    assert not [o for o in rendered("default").objects if o["metadata"]["name"] == "cxr-screen-review"]
    chart = rendered("review")
    deployment = one(chart, "Deployment", "cxr-screen-review")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1 and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    args = container["args"]
    drift = one(chart, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert args[args.index("--feedback-db") + 1] == env_of(drift)["CXR_FEEDBACK_DB"]  # the ECE input
    assert args[args.index("--audit-log") + 1] == drift["args"][drift["args"].index("--current") + 1]
    assert {"name": "audit-log", "persistentVolumeClaim": {"claimName": "cxr-screen-audit-log"}} in pod["volumes"]
    assert {"name": "reviewers", "secret": {"secretName": "cxr-screen-reviewers"}} in pod["volumes"]
    assert env_of(container)["CXR_REVIEW_SECRET"]["secretKeyRef"] == {"name": "cxr-screen-reviewers",
                                                                       "key": "session-secret"}
    service = one(chart, "Service", "cxr-screen-review")
    assert service["spec"]["ports"][0]["port"] == 8090 and service["spec"]["type"] == "ClusterIP"
    policy = one(chart, "NetworkPolicy", "cxr-screen-review")
    assert policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"}
    with pytest.raises(Exception, match="reviewersSecret"):
        validate.render_chart({"review": {"enabled": True}})


# --- generated secrets: made by a hook at install, never at render time ------------------------

HOOK = "cxr-screen-secrets"


def _hook_objects(chart: validate.RenderedChart) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in chart.objects
            if (obj["metadata"].get("annotations") or {}).get("helm.sh/hook")}


def test_two_renders_are_byte_identical():
    with helm_python.Chart.load(str(validate.CHART_DIR)) as chart:
        first = chart.render({}, name=validate.RELEASE_NAME, namespace=validate.NAMESPACE)
        second = chart.render({}, name=validate.RELEASE_NAME, namespace=validate.NAMESPACE)
    assert first == second


def test_no_secret_with_generated_data_is_rendered():
    for name in CI_FILES:
        assert rendered(name).of_kind("Secret") == [], name


def test_secrets_hook_job_and_minimal_rbac_with_hook_annotations():
    hooks = _hook_objects(rendered("default"))
    assert set(hooks) == {"ServiceAccount", "Role", "RoleBinding", "Job"}
    for kind, obj in hooks.items():
        notes = obj["metadata"]["annotations"]
        assert notes["helm.sh/hook"] == "pre-install,pre-upgrade", kind
        assert notes["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded", kind
        assert obj["metadata"]["name"] == HOOK, kind
    weight = {k: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for k, o in hooks.items()}
    assert max(weight["ServiceAccount"], weight["Role"], weight["RoleBinding"]) < weight["Job"]
    rules = hooks["Role"]["rules"]
    assert rules == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
         "resourceNames": ["cxr-screen-api-keys", "cxr-screen-postgresql"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    pod = hooks["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == HOOK and pod["automountServiceAccountToken"] is True
    (container,) = pod["containers"]
    assert container["image"] == "cxr-screen/jobs:" + yaml.safe_load(
        (validate.CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    assert container["command"][:3] == ["python", "-m", "charts.secrets"]
    assert "cxr-screen-api-keys/api-keys=default:{token}" in container["args"]
    assert "cxr-screen-postgresql/password={token}" in container["args"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_existing_secret_switches_generation_off_for_that_secret():
    api_own = validate.render_chart({"inferenceService": {"apiKey": {"existingSecret": "hospital-keys"}}})
    args = _hook_objects(api_own)["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if "api-keys" in a or "hospital-keys" in a]
    assert _hook_objects(api_own)["Role"]["rules"][0]["resourceNames"] == ["cxr-screen-postgresql"]
    both = validate.render_chart({"inferenceService": {"apiKey": {"existingSecret": "hospital-keys"}},
                                  "postgresql": {"auth": {"existingSecret": "hospital-pg"}}})
    assert _hook_objects(both) == {}
    assert _hook_objects(rendered("production")) == {}


@pytest.mark.parametrize("resources, serving, workers", [
    (None, None, 2),                                        # the default: 2 CPUs -> 2 workers x 1 thread
    ({"requests": {"cpu": "4"}}, None, 4),
    ({"requests": {"cpu": "1500m"}}, None, 1),              # rounded down
    ({"requests": {"cpu": "500m"}}, None, 1),               # never 0
    ({"requests": {"cpu": 4}}, {"threadsPerWorker": 2}, 2),
    ({"requests": {"cpu": "4"}}, {"workers": 3}, 3),        # set explicitly: wins
])
def test_torchserve_workers_and_threads_follow_the_cpu_request(resources, serving, workers):
    isvc = {key: value for key, value in (("resources", resources), ("serving", serving)) if value is not None}
    model = one(validate.render_chart({"inferenceService": isvc} if isvc else {}), "InferenceService")["spec"][
        "predictor"]["model"]
    env = env_of(model)
    threads = str((serving or {}).get("threadsPerWorker", 1))
    assert env["CXR_TORCHSERVE_WORKERS"] == str(workers)
    assert env["CXR_TORCH_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == threads


def test_the_entrypoint_rewrites_the_packages_worker_count():
    from serving.mar import PackageConfig, config_properties
    from serving.ts_config import with_workers

    text = with_workers(config_properties(PackageConfig(workers=1), "3"), 2)
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    entry = json.loads(lines["model_snapshot"])["models"]["cxr-screen"]["3"]
    assert (entry["minWorkers"], entry["maxWorkers"]) == (2, 2) and entry["batchSize"] == PackageConfig().batch_size
    assert '"minWorkers":1,"maxWorkers":1' in with_workers(text, 1)
    with pytest.raises(ValueError):
        with_workers(text, 0)
