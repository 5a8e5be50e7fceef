"""The Kubernetes API client of the commands that run as cluster Jobs.

The secrets hook (``charts.secrets``) and the drift trigger (``monitoring.trigger``) both talk to the
API server from a pod, and both are run by people against their kubeconfig. It lives in ``charts/``,
which imports nothing else of the project, so the jobs image ships it beside ``charts/secrets.py``
and ``cxr_core`` stays free of cluster code.
"""

from __future__ import annotations

from typing import Any


def kube_api(api_class: str = "CoreV1Api") -> Any:
    """``kubernetes.client.<api_class>`` from the pod's ServiceAccount, else the local kubeconfig."""
    import os

    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # KUBECONFIG read now: the library reads it once, when it is first imported
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    return getattr(client, api_class)()
