"""Create the chart's generated Secrets once, at install, from a Helm hook Job.

Render-time generation (``randAlphaNum`` + ``lookup``) gives a new value on every offline render
(``helm template``, ``--dry-run=client``, Argo CD), which overwrites the password PostgreSQL kept.
This runs in the pre-install / pre-upgrade hook instead: each named Secret is created with a random
value only if it does not exist, labelled, annotated ``helm.sh/resource-policy: keep``; an existing
one is never touched, so an upgrade keeps it. No value is ever printed.

    python -m charts.secrets --namespace NS --secret NAME/KEY=TEMPLATE [--secret ...] [--label K=V]

TEMPLATE holds ``{token}`` (``secrets.token_urlsafe``), e.g. ``cxr-screen-api-keys/api-keys=default:{token}``.
Exit codes: 0 every Secret exists with its key; 1 the API refused or failed; 2 bad arguments;
3 a Secret exists without the key (left alone: a person decides).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from charts.kube import kube_api

KEEP = {"helm.sh/resource-policy": "keep"}
GENERATED_LABEL = {"cxr-screen/generated-by": "secrets-hook"}
SPEC = re.compile(r"^(?P<name>[a-z0-9]([-a-z0-9.]*[a-z0-9])?)/(?P<key>[-._a-zA-Z0-9]+)=(?P<template>.*\{token\}.*)$")
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class SecretSpec:
    """One Secret to make: its name, the data key, and the value around the random token."""

    name: str
    key: str
    template: str

    @classmethod
    def parse(cls, text: str) -> "SecretSpec":
        match = SPEC.match(text)
        if not match:
            raise ValueError(f"--secret {text!r}: expected NAME/KEY=TEMPLATE with {{token}} in TEMPLATE")
        return cls(match["name"], match["key"], match["template"])

    def value(self, nbytes: int) -> str:
        return self.template.replace("{token}", secrets.token_urlsafe(nbytes))


def ensure(api: Any, namespace: str, spec: SecretSpec, labels: dict[str, str], nbytes: int = 32) -> str:
    """``created`` or ``kept``; ``missing-key`` when the Secret exists without ``spec.key``."""
    from kubernetes.client.rest import ApiException

    try:
        existing = api.read_namespaced_secret(spec.name, namespace)
    except ApiException as error:
        if error.status != 404:
            raise
        existing = None
    if existing is None:
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": spec.name, "namespace": namespace, "labels": {**labels, **GENERATED_LABEL},
                             "annotations": dict(KEEP)},
                "data": {spec.key: base64.b64encode(spec.value(nbytes).encode()).decode()}}
        try:
            api.create_namespaced_secret(namespace, body)
            return "created"
        except ApiException as error:
            if error.status != 409:  # 409: another run created it first; read it back
                raise
            existing = api.read_namespaced_secret(spec.name, namespace)
    return "kept" if spec.key in (existing.data or {}) else "missing-key"


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def main(argv: list[str] | None = None, api: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m charts.secrets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"))
    parser.add_argument("--secret", action="append", default=[], required=True, help="NAME/KEY=TEMPLATE")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE on every created Secret")
    parser.add_argument("--bytes", type=int, default=32, help="random bytes per token (default 32)")
    args = parser.parse_args(argv)
    try:
        specs = [SecretSpec.parse(text) for text in args.secret]
        labels = parse_labels(args.label)
    except ValueError as error:
        parser.error(str(error))
    namespace = args.namespace
    if not namespace and os.path.exists(NAMESPACE_FILE):
        namespace = open(NAMESPACE_FILE).read().strip()
    if not namespace:
        parser.error("no --namespace, POD_NAMESPACE or in-cluster namespace")
    from kubernetes.client.rest import ApiException

    code = 0
    try:
        api = api or kube_api("CoreV1Api")
        for spec in specs:
            action = ensure(api, namespace, spec, labels, args.bytes)
            print(json.dumps({"namespace": namespace, "secret": spec.name, "key": spec.key, "action": action}))
            if action == "missing-key":
                code = 3
    except ApiException as error:
        print(json.dumps({"namespace": namespace, "error": f"{error.status} {error.reason}"}), file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
