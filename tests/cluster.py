"""A real Kubernetes control plane on 127.0.0.1 for tests and for people (``make cluster``).

etcd (Debian's ``etcd-server``) + kube-apiserver + kube-controller-manager + kube-scheduler v1.31
from ``../shared/k8s-bin`` (gzipped; unpacked once into ``.cache/k8s-bin`` and checked against
``SHA256SUMS``), each on a free port, with throwaway certificates, a service-account key pair and a
static admin token, all in one state folder. After ``/readyz`` the KServe and KubeRay CRDs are
applied (built from the openAPI schemas in ``../shared/k8s-schemas``), one Node is created with a
Ready status (there is no kubelet: pods are admitted and bound, then stay Pending), and a pool of
PersistentVolumes lets the chart's PersistentVolumeClaims bind so their pods get scheduled.

    cluster = Cluster.start(state_dir)      # ~10-20 s; cluster.kubeconfig, cluster.api_client()
    cluster.stop()                          # kills every process group, removes nothing else

    python -m tests.cluster start --dir .cache/cluster    # prints KUBECONFIG=...; `make cluster`
    python -m tests.cluster stop --dir .cache/cluster     # `make cluster-stop`
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED_DIR", REPO_ROOT.parent / "shared"))
K8S_BIN_SOURCE = Path(os.environ.get("CXR_K8S_BIN", SHARED / "k8s-bin"))
K8S_SCHEMAS = Path(os.environ.get("CXR_CRD_SCHEMA_DIR", SHARED / "k8s-schemas"))
BIN_CACHE = REPO_ROOT / ".cache" / "k8s-bin"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE_NAME = "cxr-node-1"
PV_POOL = 60
STATE_FILE = "cluster.json"

# (schema file, group, version, kind, plural, scope)
CRDS = (
    ("inferenceservice-serving-v1beta1.json.gz", "serving.kserve.io", "v1beta1", "InferenceService",
     "inferenceservices", "Namespaced"),
    ("servingruntime-serving-v1alpha1.json.gz", "serving.kserve.io", "v1alpha1", "ServingRuntime",
     "servingruntimes", "Namespaced"),
    ("clusterservingruntime-serving-v1alpha1.json.gz", "serving.kserve.io", "v1alpha1", "ClusterServingRuntime",
     "clusterservingruntimes", "Cluster"),
    ("rayjob-ray-v1.json.gz", "ray.io", "v1", "RayJob", "rayjobs", "Namespaced"),
    ("raycluster-ray-v1.json.gz", "ray.io", "v1", "RayCluster", "rayclusters", "Namespaced"),
)


class ClusterError(RuntimeError):
    """The control plane could not be started (missing binaries, a process exited, a timeout)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- binaries ------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def control_plane_binaries(source: Path = K8S_BIN_SOURCE, cache: Path = BIN_CACHE) -> dict[str, Path]:
    """Unpack the gzipped binaries into ``cache`` once, verified against ``SHA256SUMS``."""
    sums = {}
    for line in (source / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in BINARIES:
        target = cache / name
        if not target.exists() or _sha256(target) != sums[name]:
            partial = cache / f".{name}.{uuid.uuid4().hex}"  # parallel sessions never see half a file
            with gzip.open(source / f"{name}.gz", "rb") as packed, open(partial, "wb") as out:
                shutil.copyfileobj(packed, out)
            if _sha256(partial) != sums[name]:
                partial.unlink()
                raise ClusterError(f"{name}: SHA256 does not match {source / 'SHA256SUMS'}")
            partial.chmod(0o755)
            os.replace(partial, target)
        paths[name] = target
    etcd = shutil.which("etcd")
    if etcd is None:
        raise ClusterError("etcd is not installed: apt-get install -y etcd-server (make install does it)")
    paths["etcd"] = Path(etcd)
    return paths


# --- CRDs from the schemas -----------------------------------------------------------------------


def crd_manifests(schema_dir: Path = K8S_SCHEMAS) -> list[dict[str, Any]]:
    """CustomResourceDefinitions of the KServe and KubeRay kinds the chart renders (status subresource)."""
    crds = []
    for filename, group, version, kind, plural, scope in CRDS:
        schema = json.loads(gzip.decompress((schema_dir / filename).read_bytes()))
        crds.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {
                "group": group,
                "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                "versions": [{"name": version, "served": True, "storage": True,
                              "schema": {"openAPIV3Schema": schema}, "subresources": {"status": {}}}],
            },
        })
    return crds


# --- the control plane ---------------------------------------------------------------------------


@dataclass
class Cluster:
    """A running control plane; everything it owns lives in ``state_dir``."""

    state_dir: Path
    server: str
    token: str
    pids: dict[str, int] = field(default_factory=dict)
    started_s: float = 0.0

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "certs" / "apiserver.crt"

    # -- start / stop
    @classmethod
    def start(cls, state_dir: Path | str, timeout_s: float = 120.0) -> "Cluster":
        began = time.monotonic()
        state = Path(state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
        bins = control_plane_binaries()
        certs, logs = state / "certs", state / "logs"
        certs.mkdir(exist_ok=True)
        logs.mkdir(exist_ok=True)
        sa_key, sa_pub = certs / "sa.key", certs / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)], check=True,
                       capture_output=True)
        token = uuid.uuid4().hex
        tokens = certs / "tokens.csv"
        tokens.write_text(f'{token},cxr-admin,cxr-admin-uid,"system:masters"\n')
        tokens.chmod(0o600)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        cluster = cls(state, f"https://127.0.0.1:{api_port}", token)
        try:
            cluster._spawn("etcd", [
                str(bins["etcd"]), "--name", "cxr", "--data-dir", str(state / "etcd"),
                "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"cxr=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync"])
            cluster._spawn("kube-apiserver", [
                str(bins["kube-apiserver"]), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
                f"--cert-dir={certs}", f"--token-auth-file={tokens}", "--authorization-mode=Node,RBAC",
                f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/24", "--endpoint-reconciler-type=none",
                "--allow-privileged=false", "--profiling=false"])
            cluster._wait_ready(time.monotonic() + timeout_s)
            cluster.kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig_dict()))
            cluster.kubeconfig.chmod(0o600)
            cluster._spawn("kube-controller-manager", [
                str(bins["kube-controller-manager"]), f"--kubeconfig={cluster.kubeconfig}",
                "--leader-elect=false", "--secure-port=0", f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={cluster.ca_file}", "--use-service-account-credentials=false",
                "--controllers=*,-node-lifecycle-controller,-node-ipam-controller,"
                "-cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller"])
            cluster._spawn("kube-scheduler", [
                str(bins["kube-scheduler"]), f"--kubeconfig={cluster.kubeconfig}", "--leader-elect=false",
                "--secure-port=0"])
            cluster._bootstrap(time.monotonic() + timeout_s)
        except BaseException:
            cluster.stop()
            raise
        cluster.started_s = round(time.monotonic() - began, 1)
        cluster.save()
        return cluster

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.state_dir / "logs" / f"{name}.log", "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.pids[name] = process.pid
        self.save()

    def _alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        if pid is None:
            return False
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (make cluster-stop): ask the kernel
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True
        return finished == 0

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _wait_ready(self, deadline: float) -> None:
        context = ssl.create_default_context(cafile=None)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the serving certificate appears with /readyz
        request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
        while time.monotonic() < deadline:
            for name in self.pids:
                if not self._alive(name):
                    raise ClusterError(f"{name} exited:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise ClusterError(f"kube-apiserver not ready in time:\n{self.log_tail('kube-apiserver')}")

    def kubeconfig_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "cxr",
            "clusters": [{"name": "cxr", "cluster": {"server": self.server,
                                                     "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "cxr-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "cxr", "context": {"cluster": "cxr", "user": "cxr-admin"}}],
        }

    def api_client(self, impersonate: str | None = None):
        """A ``kubernetes.client.ApiClient`` as the admin, or impersonating ``impersonate``."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_file)
        configuration.api_key = {"authorization": f"Bearer {self.token}"}
        api = client.ApiClient(configuration)
        if impersonate:
            api.set_default_header("Impersonate-User", impersonate)
        return api

    def _bootstrap(self, deadline: float) -> None:
        """CRDs (until Established), the Ready Node, the PV pool and the default ServiceAccount."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api = self.api_client()
        extensions = client.ApiextensionsV1Api(api)
        for crd in crd_manifests():
            extensions.create_custom_resource_definition(crd)
        core = client.CoreV1Api(api)
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
                                          "kubernetes.io/arch": "amd64"}}})
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "500Gi",
                    "nvidia.com/gpu": "4"}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        core.patch_node_status(NODE_NAME, {"status": {"capacity": capacity, "allocatable": capacity, "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "no kubelet: a test node",
             "lastHeartbeatTime": now, "lastTransitionTime": now}]}})
        # admission (TaintNodesByCondition) adds not-ready:NoSchedule; the node-lifecycle controller that
        # would lift it is off (it would also evict everything from a node with no kubelet heartbeat)
        core.patch_node(NODE_NAME, {"spec": {"taints": None}})
        for index in range(PV_POOL):
            core.create_persistent_volume({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {
                "name": f"cxr-pv-{index:03d}"}, "spec": {
                "capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/cxr-pv-{index:03d}"}}})
        pending = {crd["metadata"]["name"] for crd in crd_manifests()}
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                status = extensions.read_custom_resource_definition(name).status
                if any(c.type == "Established" and c.status == "True" for c in (status.conditions or [])):
                    pending.discard(name)
            time.sleep(0.2)
        while time.monotonic() < deadline:  # the serviceaccount controller is up: pods can be admitted
            try:
                core.read_namespaced_service_account("default", "default")
                break
            except ApiException:
                time.sleep(0.2)
        if pending:
            raise ClusterError(f"CRDs not established: {sorted(pending)}")
        api.close()

    def save(self) -> None:
        (self.state_dir / STATE_FILE).write_text(json.dumps(
            {"server": self.server, "token": self.token, "pids": self.pids, "started_s": self.started_s}))

    @classmethod
    def load(cls, state_dir: Path | str) -> "Cluster":
        state = Path(state_dir).resolve()
        saved = json.loads((state / STATE_FILE).read_text())
        return cls(state, saved["server"], saved["token"], saved["pids"], saved.get("started_s", 0.0))

    def stop(self, timeout_s: float = 15.0) -> None:
        """TERM each process group (scheduler first, etcd last), KILL what is left."""
        for name in reversed(list(self.pids)):
            pid = self.pids[name]
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout_s
            while self._alive(name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(name):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        self.pids = {}
        if (self.state_dir / STATE_FILE).exists():
            self.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".cache" / "cluster", help="state folder")
    args = parser.parse_args(argv)
    if args.action == "stop":
        if not (args.dir / STATE_FILE).exists():
            print(f"no cluster in {args.dir}")
            return 0
        Cluster.load(args.dir).stop()
        shutil.rmtree(args.dir, ignore_errors=True)
        print(f"stopped; removed {args.dir}")
        return 0
    if (args.dir / STATE_FILE).exists() and Cluster.load(args.dir).pids:
        print(f"a cluster is already running in {args.dir} (make cluster-stop first)", file=sys.stderr)
        return 1
    shutil.rmtree(args.dir, ignore_errors=True)
    cluster = Cluster.start(args.dir)
    print(f"cluster up in {cluster.started_s} s: {cluster.server} (node {NODE_NAME}, no kubelet)")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
