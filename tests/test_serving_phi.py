"""No patient data out: a DICOM with patient tags through every route and every error path we can
trigger, then every response, every log file and the audit log are searched for those tags.

One real stack (TorchServe + KServe front) for the module, the tiny cnn3 bundle.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import pytest

from serving.client import v1_request, v2_request
from serving.schemas import MODEL_NAME
from tests.imaging import dicom_bytes, gray_of
from tests.test_serving import API_KEY, offline, stack  # noqa: F401  (module-scoped fixtures, own instance)

pytestmark = pytest.mark.slow

PHI = {"PatientName": "Phimarker^Zelda^Q", "PatientID": "PIDQ7X93ZK", "PatientBirthDate": "19230417",
       "InstitutionName": "Saint Phimarker Infirmary", "AccessionNumber": "ACCZ93QK71"}
MARKERS = ["Phimarker", "PIDQ7X93ZK", "19230417", "ACCZ93QK71"]


def phi_dicom(gray, drop_pixels: bool = False) -> bytes:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(gray)))
    for tag, value in PHI.items():
        setattr(dataset, tag, value)
    if drop_pixels:
        del dataset.PixelData
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def binary_v2(images: list[bytes], header_extra: dict | None = None, size_delta: int = 0,
              length_delta: int = 0) -> tuple[bytes, dict[str, str]]:
    """The OIP binary tensor extension: JSON header + length-prefixed BYTES elements."""
    blob = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(blob) + size_delta}}], **(header_extra or {})}
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text) + length_delta),
                         "Content-Type": "application/octet-stream"}


def phi_forms(data: bytes) -> list[str]:
    """The markers plus pieces of the request as it travelled (base64 at the three alignments, repr)."""
    forms = list(MARKERS)
    encoded = base64.b64encode(data).decode()
    forms += [encoded[i:i + 48] for i in (300, 301, 302)]
    forms.append(repr(data[128:160])[2:-1])  # a bytes repr of the DICOM header
    return forms


@pytest.fixture(scope="module")
def dicoms(data_dir):
    path = sorted((data_dir / "test" / "normal").glob("*.jpg"))[2]
    gray = gray_of(path)
    whole = phi_dicom(gray)
    return {"whole": whole, "truncated": whole[: len(whole) // 2], "no_pixels": phi_dicom(gray, drop_pixels=True)}


def test_no_patient_data_in_any_response_or_log(stack, dicoms, tmp_path, capsys):  # noqa: F811
    whole, truncated, no_pixels = dicoms["whole"], dicoms["truncated"], dicoms["no_pixels"]
    for tag, value in PHI.items():  # the file really carries the tags
        assert value.encode() in whole, tag
    v1, v1x, v2 = (f"/v1/models/{MODEL_NAME}:predict", f"/v1/models/{MODEL_NAME}:explain",
                   f"/v2/models/{MODEL_NAME}/infer")
    front = stack.front
    responses: dict[str, tuple] = {}

    def front_raw(path, content, headers, key=API_KEY):
        headers = {"X-Request-Id": stack.new_id(), **headers}
        if key:
            headers["X-API-Key"] = key
        return stack.http.post(f"{stack.front_url}{path}", content=content, headers=headers)

    # routes that answer
    routes = {
        "v1 predict": (lambda: front(v1, json_body=v1_request([whole])), 200),
        "v1 explain": (lambda: front(v1x, json_body=v1_request([whole])), 200),
        "v1 raw dicom": (lambda: front(v1, content=whole, content_type="application/dicom"), 200),
        "v2 json": (lambda: front(v2, json_body=v2_request([whole])), 200),
        "v2 json, no content type": (lambda: front_raw(v2, json.dumps(v2_request([whole])).encode(), {}), 200),
        "v2 explain": (lambda: front(v2, json_body=v2_request([whole], explain=True)), 200),
        "v2 binary": (lambda: front_raw(v2, *binary_v2([whole])), 200),
        "v2 binary, versioned url": (lambda: front_raw(f"/v2/models/{MODEL_NAME}/versions/{stack.version}/infer",
                                                       *binary_v2([whole])), 200),
        "torchserve native": (lambda: stack.torchserve_post(f"/predictions/{MODEL_NAME}", content=whole), 200),
        "torchserve v1": (lambda: stack.torchserve_post(f"/v1/models/{MODEL_NAME}:predict",
                                                        json_body=v1_request([whole])), 200),
        "torchserve v2": (lambda: stack.torchserve_post(f"/v2/models/{MODEL_NAME}/infer",
                                                        json_body=v2_request([whole])), 200),
        "torchserve explain": (lambda: stack.torchserve_post(f"/explanations/{MODEL_NAME}", content=whole), 200),
    }
    # error paths, each with the patient's file (or its tags) inside the request
    patient_name = PHI["PatientName"]
    errors = {
        "v1 truncated dicom": (lambda: front(v1, json_body=v1_request([truncated])), 422),
        "v1 dicom without pixels": (lambda: front(v1, json_body=v1_request([no_pixels])), 415),
        "v1 dicom bytes as a JSON body": (lambda: front(v1, content=whole), 400),
        "v1 dicom text instead of base64": (lambda: front(v1, json_body={"instances": [whole.decode("latin-1")]}), 400),
        "v1 unknown explain method": (lambda: front(v1, json_body={**v1_request([whole]), "explain_method": patient_name}),
                                      400),
        "v1 wrong field type": (lambda: front(v1, json_body={"instances": [{"data": 7, "b64": patient_name}]}), 400),
        "v1 no api key": (lambda: front(v1, json_body=v1_request([whole]), key=None), 401),
        "v1 body too large": (lambda: front(v1, content=whole + b" " * (3 << 20)), 413),
        "v2 dicom bytes as the body": (lambda: front_raw(v2, whole, {}), 400),
        "v2 dicom bytes as a JSON body": (lambda: front(v2, content=whole), 400),
        "v2 binary truncated": (lambda: front_raw(v2, *binary_v2([truncated])), 422),
        "v2 binary without pixels": (lambda: front_raw(v2, *binary_v2([no_pixels])), 415),
        "v2 binary wrong size": (lambda: front_raw(v2, *binary_v2([whole], size_delta=-10)), 400),
        "v2 binary header length too long": (lambda: front_raw(v2, *binary_v2([whole], length_delta=10**7)), 400),
        "v2 binary header length inside the image": (lambda: front_raw(v2, *binary_v2([whole], length_delta=40)), 400),
        "v2 wrong input name": (lambda: front(v2, json_body={"inputs": [{**v2_request([whole])["inputs"][0],
                                                                         "name": patient_name}]}), 400),
        "v2 wrong datatype": (lambda: front(v2, json_body={"inputs": [{**v2_request([whole])["inputs"][0],
                                                                       "datatype": patient_name}]}), 400),
        "v2 parameter named after the patient": (lambda: front(v2, json_body={**v2_request([whole]),
                                                                              "parameters": {patient_name: 1,
                                                                                             "explain": "x"}}), 400),
        "v2 unknown output": (lambda: front(v2, json_body={**v2_request([whole]), "outputs": [{"name": patient_name}]}),
                              400),
        "v2 wrong model version": (lambda: front_raw(f"/v2/models/{MODEL_NAME}/versions/{patient_name}/infer",
                                                     *binary_v2([whole])), 404),
        "v2 no api key": (lambda: front_raw(v2, *binary_v2([whole]), key=None), 401),
        "torchserve truncated": (lambda: stack.torchserve_post(f"/predictions/{MODEL_NAME}", content=truncated), 422),
        "torchserve v2 dicom with json type": (lambda: stack.http.post(
            f"{stack.torchserve.inference_url}/v2/models/{MODEL_NAME}/infer", content=whole,
            headers={**stack.torchserve.inference_headers(), "Content-Type": "application/json",
                     "X-Request-Id": stack.new_id()}), 400),
        "torchserve v2 wrong datatype": (lambda: stack.torchserve_post(f"/v2/models/{MODEL_NAME}/infer", json_body={
            "inputs": [{**v2_request([whole])["inputs"][0], "datatype": patient_name, "name": patient_name}]}), 400),
        "torchserve v1 method named after the patient": (lambda: stack.torchserve_post(
            f"/v1/models/{MODEL_NAME}:predict", json_body={**v1_request([whole]), "explain_method": patient_name}), 400),
    }
    for name, (send, status) in {**routes, **errors}.items():
        response = send()
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        if status >= 400:
            body = response.json()
            assert body["code"] and body["error"] and body.get("request_id"), (name, body)
        responses[name] = (response.headers, response.content)

    # the triage CLI, offline and through the front
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "patient.dcm").write_bytes(whole)
    (inbox / "patient-cut.dcm").write_bytes(truncated)
    from serving.triage import main as triage

    offline_csv, endpoint_csv = tmp_path / "offline.csv", tmp_path / "endpoint.csv"
    triage([str(inbox), "--offline", "--bundle", str(stack.bundle), "--out", str(offline_csv)])
    triage([str(inbox), "--url", stack.front_url, "--api-key", API_KEY, "--out", str(endpoint_csv)])
    captured = capsys.readouterr()
    texts = {"triage stdout/stderr": captured.out + captured.err, "triage offline csv": offline_csv.read_text(),
             "triage endpoint csv": endpoint_csv.read_text()}
    assert "truncated" in texts["triage offline csv"] and "truncated" in texts["triage endpoint csv"]

    for name, (headers, content) in responses.items():
        texts[f"response {name}"] = content.decode("latin-1") + "\n" + "\n".join(f"{k}: {v}" for k, v in headers.items())
    logs = [path for path in Path(stack.root).rglob("*") if path.is_file() and path.suffix in
            (".log", ".out", ".jsonl", ".txt", "")] + [stack.audit_log]
    assert any(path.name == "front.out" for path in logs) and any(path.name == "model_log.log" for path in logs)
    for path in logs:
        texts[f"log {path.relative_to(stack.root)}"] = path.read_bytes().decode("latin-1")
    hits = {(where, form) for where, text in texts.items() for form in phi_forms(whole) if form in text}
    context = [texts[where][max(0, texts[where].index(form) - 300): texts[where].index(form) + 100]
               for where, form in sorted(hits)[:3]]
    assert hits == set(), (sorted(hits)[:20], context)
    # and the routes really ran: every one of them is in the audit log
    assert len(responses) == len(routes) + len(errors) >= 35
