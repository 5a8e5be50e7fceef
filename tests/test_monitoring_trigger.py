"""The retrain trigger: the sweep run for real as a local subprocess, and the RayJob it would create.

The RayJob comes from the chart's drift template (rendered offline) and is validated against the
KubeRay CRD schema in ../shared/k8s-schemas with charts.validate; the Kubernetes API is a recording
stand-in (no cluster). The real ``training.sweep`` is not run here (minutes of training): the local
trigger runs an injected command through the same code path.
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from charts import validate
from monitoring.config import TriggerConfig
from monitoring.trigger import (
    TriggerError,
    build_rayjob,
    kubernetes_retrain,
    load_rayjob_template,
    main,
    rayjob_from_chart,
    run_local_sweep,
    sweep_command,
    trigger_retrain,
)

SUMMARY = {"decision": "retrain", "created_at": "2026-03-02T02:00:00+00:00",
           "reasons": ["PSI of key feature border_ratio = 17.349 > 0.2",
                       "ECE (equal_width) = 0.172 > 0.1 on confirmed labels"]}


class RecordingApi:
    """Stands in for kubernetes.client.CustomObjectsApi: records the create call, creates nothing."""

    def __init__(self):
        self.calls = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self.calls.append({"group": group, "version": version, "namespace": namespace, "plural": plural,
                           "body": body, **kwargs})
        return {**body, "metadata": {**body["metadata"], "name": body["metadata"]["generateName"] + "x7k2q"}}

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kwargs):
        return {"items": []}  # no RayJob active: tests/test_cluster.py checks the refusal on a real API


@pytest.fixture(scope="module")
def chart_template():
    return rayjob_from_chart()


def test_rayjob_from_the_chart_template_validates_against_the_crd(chart_template):
    result = kubernetes_retrain(SUMMARY, TriggerConfig(namespace="radiology"), create=False)
    obj = result["object"]
    assert result["validated_locally"] is True
    assert validate.validate_object(obj) == []
    assert (obj["apiVersion"], obj["kind"]) == ("ray.io/v1", "RayJob")
    assert obj["metadata"]["generateName"] == "cxr-screen-retrain-" and "name" not in obj["metadata"]
    assert obj["metadata"]["namespace"] == "radiology"
    assert obj["metadata"]["labels"]["cxr-screen/trigger"] == "drift"
    annotations = obj["metadata"]["annotations"]
    assert annotations["cxr-screen/drift-decision"] == "retrain"
    assert "border_ratio" in annotations["cxr-screen/drift-reasons"]
    assert obj["spec"]["entrypoint"].startswith("python -m training.sweep --budget full --data-dir /data/cxr3")
    # the template itself is untouched
    assert "annotations" not in chart_template["metadata"]


def test_create_calls_the_custom_objects_api(chart_template, tmp_path, monkeypatch):
    template = tmp_path / "rayjob.yaml"
    template.write_text(yaml.safe_dump(chart_template))
    monkeypatch.setenv("CXR_RAYJOB_TEMPLATE", str(template))  # what the CronJob mounts
    monkeypatch.setenv("POD_NAMESPACE", "cxr-prod")
    api = RecordingApi()
    result = trigger_retrain(SUMMARY, target="kubernetes", api=api, dry_run=True)
    assert result["ok"] and result["created"] == "cxr-screen-retrain-x7k2q" and result["namespace"] == "cxr-prod"
    (call,) = api.calls
    assert (call["group"], call["version"], call["plural"], call["namespace"]) == ("ray.io", "v1", "rayjobs", "cxr-prod")
    assert call["dry_run"] == "All" and call["field_validation"] == "Strict"
    assert validate.validate_object(call["body"]) == []


def test_invalid_template_is_refused_before_the_api(chart_template, tmp_path):
    broken = json.loads(json.dumps(chart_template))
    broken["spec"]["shutdownAfterJobFinishs"] = True
    template = tmp_path / "rayjob.yaml"
    template.write_text(yaml.safe_dump(broken))
    api = RecordingApi()
    with pytest.raises(TriggerError, match="shutdownAfterJobFinishs"):
        kubernetes_retrain(SUMMARY, TriggerConfig(namespace="x"), template=template, api=api)
    assert api.calls == []
    result = trigger_retrain(SUMMARY, target="kubernetes", template=template, api=api)
    assert result["ok"] is False and "shutdownAfterJobFinishs" in result["error"]
    template.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}))
    with pytest.raises(TriggerError, match="exactly one RayJob"):
        load_rayjob_template(template)
    with pytest.raises(TriggerError, match="not a ray.io/v1 RayJob"):
        build_rayjob({"apiVersion": "batch/v1", "kind": "Job", "metadata": {}})


def test_cli_prints_the_object_it_would_create(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(SUMMARY))
    assert main(["--summary", str(summary), "--target", "kubernetes", "--namespace", "cxr", "--print"]) == 0
    obj = yaml.safe_load(capsys.readouterr().out)
    assert obj["kind"] == "RayJob" and obj["metadata"]["namespace"] == "cxr"
    assert validate.validate_object(obj) == []


def test_sweep_command_is_the_small_local_sweep():
    command = sweep_command("small", "/data/cxr3")
    assert command == [sys.executable, "-m", "training.sweep", "--budget", "small", "--data-dir", "/data/cxr3"]


def test_local_trigger_really_runs_the_command(tmp_path):
    marker = tmp_path / "sweep-ran.json"
    script = ("import json, sys; json.dump({'argv': sys.argv[1:]}, open(sys.argv[1], 'w')); "
              "print('trial 1/1 done')")
    command = [sys.executable, "-c", script, str(marker), "--budget", "small"]
    result = trigger_retrain(SUMMARY, target="local", command=command, log_dir=tmp_path)
    assert result["ok"] and result["returncode"] == 0 and result["command"] == command
    assert json.loads(marker.read_text())["argv"] == [str(marker), "--budget", "small"]
    assert (tmp_path / "sweep.log").read_text().strip() == "trial 1/1 done"
    failing = run_local_sweep(command=[sys.executable, "-c", "import sys; print('boom'); sys.exit(7)"],
                              log_path=tmp_path / "failed.log")
    assert failing["ok"] is False and failing["returncode"] == 7
    assert (tmp_path / "failed.log").read_text().strip() == "boom"


def test_trigger_cli_runs_a_local_command_only_for_retrain(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('yes')"]
    summary.write_text(json.dumps(SUMMARY | {"decision": "ok"}))
    assert main(["--summary", str(summary), "--target", "local", "--command", *command]) == 0
    assert not marker.exists() and "nothing to start" in capsys.readouterr().out
    summary.write_text(json.dumps(SUMMARY))
    assert main(["--summary", str(summary), "--target", "local", "--command", *command]) == 0
    assert marker.read_text() == "yes"
    assert json.loads(capsys.readouterr().out)["returncode"] == 0


def test_kube_api_outside_a_cluster_reads_the_kubeconfig(tmp_path, monkeypatch):
    """The one client both cluster Jobs use (trigger, secrets hook): kubeconfig when no ServiceAccount."""
    from charts.kube import kube_api

    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "c", "cluster": {"server": "https://kube.test:6443"}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    custom = kube_api("CustomObjectsApi")
    core = kube_api()
    assert type(custom).__name__ == "CustomObjectsApi" and type(core).__name__ == "CoreV1Api"
    assert core.api_client.configuration.host == "https://kube.test:6443"
