"""Send a few real radiographs to the running local stack over KServe v1 and v2, one with explain.

    python -m serving.demo [--data-dir DIR] [--overlay reports/serving/demo_overlay.png]

Reads the stack's address and API key file from ``configs/serving.yaml`` (what ``make serve``
started) and prints each decision, the URLs and how to stop the stack.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

from serving.client import CxrScreenClient, EndpointError, api_key_from_file
from serving.config import DEFAULT_CONFIG, ServingConfig
from serving.stack import REPO_ROOT, StackUrls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "cxr3")))
    parser.add_argument("--overlay", type=Path, default=Path("reports/serving/demo_overlay.png"))
    args = parser.parse_args(argv)
    config = ServingConfig.load(args.config)
    local = config.local
    state_dir = (REPO_ROOT / local.state_dir).resolve()
    keys_file = Path(config.front.api_keys_file) if config.front.api_keys_file else state_dir / "api_keys.json"
    api_key = os.environ.get("CXR_API_KEY") or api_key_from_file(keys_file)
    urls = StackUrls(front=f"http://{local.host}:{local.front_port}",
                     inference=f"http://{local.host}:{local.inference_port}",
                     management=f"http://{local.host}:{local.management_port}")
    samples = [(label, sorted((args.data_dir / "test" / label).glob("*.jpg"))[0])
               for label in ("tuberculosis", "pneumonia", "normal")]
    with CxrScreenClient(urls.front, api_key=api_key, request_id_prefix="demo-") as client:
        for index, (label, path) in enumerate(samples):
            protocol = "v1" if index % 2 == 0 else "v2"
            explain = index == 0
            try:
                answer = client.predict(path.read_bytes(), protocol=protocol, explain=explain)  # type: ignore[arg-type]
            except EndpointError as error:
                if error.code != "explanations_unavailable":
                    raise
                print(f"    explain: {error.reason}")
                answer = client.predict(path.read_bytes(), protocol=protocol)  # type: ignore[arg-type]
            decision = answer.decision
            probabilities = ", ".join(f"{c} {p:.3f}" for c, p in answer.probabilities.items())
            print(f"{protocol} {path.name} (labelled {label}): {decision.label} -> {decision.triage}"
                  f"{' (threshold ' + format(decision.threshold, '.3f') + ' fired)' if decision.threshold else ''}"
                  f"  [{probabilities}]  {answer.latency_ms:.0f} ms, model {answer.model_name} v{answer.model_version}")
            if answer.explanation:
                args.overlay.parent.mkdir(parents=True, exist_ok=True)
                args.overlay.write_bytes(base64.b64decode(answer.explanation.overlay_png_base64))
                outside = answer.explanation.outside_chest
                print(f"    explain ({answer.explanation.method}): overlay {args.overlay}, "
                      f"{outside:.0%} of the heat outside the chest"
                      f"{' - SHORTCUT WARNING' if answer.explanation.shortcut_warning else ''}")
    print("\n".join(urls.lines("cxr-screen")))
    print(f"API key file        {keys_file}")
    print("stop with           make stop")


if __name__ == "__main__":
    main()
