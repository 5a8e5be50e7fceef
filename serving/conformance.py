"""Open Inference Protocol conformance: stock clients against the real front, unchanged.

    python -m serving.conformance --bundle DIR [--data-dir ../shared/data/cxr3] [--out reports/serving/conformance.json]

starts TorchServe + the KServe front on free ports with the bundle, runs :func:`run_checks` and
writes what each check saw. The clients are ``tritonclient.http`` (NVIDIA's reference OIP client)
and the kserve SDK's ``InferenceRESTClient``; nothing in them is patched. Each check is a name, a
pass/fail and what was observed (statuses, shapes, labels), never image data.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from serving.report_cli import bundle_report_parser
from serving.schemas import MODEL_NAME


def run_checks(front_url: str, api_key: str, image: bytes, model_version: str,
               expected_label: str | None = None) -> list[dict[str, Any]]:
    """Every conformance check against a running front; returns one record per check."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    def fresh() -> dict[str, str]:  # tritonclient writes into the headers dict it is given
        return {"X-API-Key": api_key}

    host = front_url.split("://", 1)[1]
    client = triton.InferenceServerClient(url=host, connection_timeout=60.0, network_timeout=120.0)
    checks: list[dict[str, Any]] = []

    def check(name: str, run: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        try:
            observed = run()
            ok = bool(observed.pop("ok", True))
        except Exception as error:  # a failing check is recorded, not raised
            observed, ok = {"error": f"{type(error).__name__}: {str(error)[:200]}"}, False
        checks.append({"check": name, "ok": ok, "ms": round((time.perf_counter() - started) * 1000, 1), **observed})

    def tensor(binary: bool) -> Any:
        value = image if binary else base64.b64encode(image).decode("ascii")
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_), binary_data=binary)
        return tensor

    def infer(binary_in: bool, binary_out: bool, version: str = "", outputs: list[str] | None = None):
        requested = [triton.InferRequestedOutput(name, binary_data=binary_out) for name in
                     (outputs or ["result", "label", "triage", "probabilities"])]
        return client.infer(MODEL_NAME, [tensor(binary_in)], model_version=version, outputs=requested, headers=fresh())

    def summary(result) -> dict[str, Any]:
        label = result.as_numpy("label")
        probabilities = result.as_numpy("probabilities")
        answer = json.loads(result.as_numpy("result")[0]) if result.get_output("result") is not None else None
        decided = label[0].decode() if isinstance(label[0], bytes) else str(label[0])
        ok = probabilities is not None and probabilities.shape[0] == 1 and (
            expected_label is None or decided == expected_label)
        return {"ok": ok, "label": decided, "probabilities_shape": list(probabilities.shape),
                "probabilities_dtype": str(probabilities.dtype),
                "result_classes": answer["classes"] if answer else None,
                "binary_outputs": [o["name"] for o in result.get_response()["outputs"]
                                   if "binary_data_size" in (o.get("parameters") or {})]}

    check("tritonclient server live + ready", lambda: {"ok": client.is_server_live(headers=fresh())
                                                      and client.is_server_ready(headers=fresh())})
    check("tritonclient model ready", lambda: {"ok": client.is_model_ready(MODEL_NAME, headers=fresh())})

    def metadata() -> dict[str, Any]:
        meta = client.get_model_metadata(MODEL_NAME, headers=fresh())
        names = [o["name"] for o in meta["outputs"]]
        return {"ok": meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["datatype"] == "BYTES"
                and set(names) == {"result", "label", "triage", "probabilities"}, "inputs": meta["inputs"][0]["name"],
                "outputs": names, "versions": meta.get("versions")}

    check("tritonclient model metadata from the bundle", metadata)
    check("tritonclient infer, JSON in, JSON out", lambda: summary(infer(False, False)))
    check("tritonclient infer, binary BYTES in (raw image), JSON out", lambda: summary(infer(True, False)))
    check("tritonclient infer, binary in, binary out", lambda: summary(infer(True, True)))
    check("tritonclient infer, model version in the URL", lambda: summary(infer(True, False, model_version)))

    def only_requested() -> dict[str, Any]:
        result = infer(True, False, outputs=["label", "probabilities"])
        names = [o["name"] for o in result.get_response()["outputs"]]
        return {"ok": names == ["label", "probabilities"], "outputs": names}

    check("requested outputs honoured", only_requested)

    def refused(run: Callable[[], Any], status: str) -> Callable[[], dict[str, Any]]:
        def inner() -> dict[str, Any]:
            try:
                run()
            except InferenceServerException as error:
                return {"ok": str(error.status()) == status, "status": str(error.status()),
                        "message": str(error.message())[:160]}
            return {"ok": False, "status": "200"}
        return inner

    check("unknown output name refused (400)", refused(lambda: infer(True, False, outputs=["logits"]), "400"))

    def wrong_input(name: str, datatype: str) -> Callable[[], Any]:
        def run():
            tensor = triton.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
            return client.infer(MODEL_NAME, [tensor], headers=fresh())
        return run

    check("wrong input name refused (400)", refused(wrong_input("pixels", "BYTES"), "400"))

    def lower_case_datatype():
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "bytes",
                            "data": [base64.b64encode(image).decode()]}]}
        response = httpx.post(f"{front_url}/v2/models/{MODEL_NAME}/infer", json=body, headers=fresh(), timeout=60)
        return {"ok": response.status_code == 400, "status": response.status_code, "code": response.json().get("code")}

    check("datatype case checked (400)", lower_case_datatype)

    def no_content_type():
        body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(image).decode()]}]}).encode()
        response = httpx.post(f"{front_url}/v2/models/{MODEL_NAME}/infer", content=body,
                              headers={**fresh(), "Content-Type": ""}, timeout=60)
        payload = response.json()
        return {"ok": response.status_code == 200 and "parameters" not in payload, "status": response.status_code}

    check("JSON without Content-Type, no null parameters", no_content_type)

    def wrong_method():
        response = httpx.get(f"{front_url}/v2/models/{MODEL_NAME}/infer", headers=fresh(), timeout=30)
        return {"ok": response.status_code == 405, "status": response.status_code}

    check("wrong method is 405", wrong_method)

    def kserve_client() -> dict[str, Any]:
        from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

        async def run() -> dict[str, Any]:
            async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=120)) as rest:
                ready = await rest.is_server_ready(front_url, headers=fresh())
                observed = {"server_ready": ready}
                for binary in (False, True):
                    tensor = InferInput("image", [1], "BYTES")
                    value = image if binary else base64.b64encode(image)
                    tensor.set_data_from_numpy(np.array([value], dtype=np.object_), binary_data=binary)
                    request = InferRequest(MODEL_NAME, infer_inputs=[tensor])
                    response = await rest.infer(front_url, request, MODEL_NAME, headers=fresh())
                    label = [o for o in response.outputs if o.name == "label"][0].data[0]
                    observed["binary" if binary else "json"] = label
                observed["ok"] = ready and observed["json"] == observed["binary"] and (
                    expected_label is None or observed["json"] == expected_label)
                return observed

        return asyncio.run(run())

    check("kserve InferenceRESTClient, JSON and binary", kserve_client)
    client.close()
    return checks


def main(argv: list[str] | None = None) -> None:
    parser = bundle_report_parser("python -m serving.conformance", __doc__, "reports/serving/conformance.json")
    args = parser.parse_args(argv)
    import secrets

    from cxr_core.bundle import load_bundle
    from serving.config import PackageConfig, ServingConfig
    from serving.mar import build_package
    from serving.stack import start_front
    from serving.torchserve_process import TorchServe, free_port, stop_process_group

    image_path = sorted((args.data_dir / "test" / "tuberculosis").glob("*.jpg"))[0]
    image = image_path.read_bytes()
    expected = load_bundle(args.bundle).predict_bytes(image).decision.label
    with tempfile.TemporaryDirectory(prefix="cxr-conformance-") as scratch:
        root = Path(scratch)
        package = build_package(args.bundle, root / "package", config=PackageConfig(workers=1))
        key = secrets.token_urlsafe(16)
        keys_file = root / "api_keys.json"
        keys_file.write_text(json.dumps({"conformance": key}))
        torchserve = TorchServe(package.root, root / "state", audit_log=root / "audit.jsonl")
        front = None
        try:
            torchserve.start()
            port = free_port()
            front = start_front(torchserve, port, root / "state", keys_file, ServingConfig(), root / "audit.jsonl")
            checks = run_checks(f"http://127.0.0.1:{port}", key, image, package.version, expected)
        finally:
            if front is not None:
                stop_process_group(front.pid)
            torchserve.stop()
    from importlib.metadata import version

    report = {"bundle": args.bundle_name or str(args.bundle),
              "clients": {"tritonclient": version("tritonclient"), "kserve": version("kserve")},
              "image": image_path.name, "expected_label": expected, "passed": sum(c["ok"] for c in checks),
              "total": len(checks), "checks": checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.out}: {report['passed']}/{report['total']} conformance checks pass")
    for entry in checks:
        print(f"  {'ok  ' if entry['ok'] else 'FAIL'} {entry['check']}")


if __name__ == "__main__":
    main()
