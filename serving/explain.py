"""Explain one radiograph offline: Grad-CAM(++) overlay PNG + lung-zone shares.

    python -m serving.explain IMAGE --bundle DIR --out overlay.png [--method gradcam++] [--target-class C]
    python -m serving.explain IMAGE --model-uri models:/cxr-screen@champion

Prints the decision and the heat share per lung zone and outside the central chest region (with the
shortcut warning); writes the overlay at the input image's size. Same code as the served
``:explain`` (cxr_core.explain).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cxr_core.bundle import load_bundle
from cxr_core.errors import InputError
from cxr_core.explain import EXPLAIN_METHODS, ExplanationUnavailableError, explain_image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="JPEG, PNG or DICOM file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="bundle directory")
    source.add_argument("--model-uri", help="registered model, e.g. models:/cxr-screen@champion")
    parser.add_argument("--out", type=Path, default=Path("overlay.png"), help="overlay PNG (default overlay.png)")
    parser.add_argument("--method", choices=EXPLAIN_METHODS, default="gradcam")
    parser.add_argument("--target-class", default=None, help="explain this class instead of the decided one")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.model_uri:
        from serving.mar import fetch_registered_bundle

        with tempfile.TemporaryDirectory(prefix="cxr-explain-") as scratch:
            predictor = load_bundle(fetch_registered_bundle(args.model_uri, Path(scratch) / "bundle")[0])
    else:
        predictor = load_bundle(args.bundle)
    try:
        prediction, explanation = explain_image(predictor, args.image.read_bytes(), args.method, args.target_class)
    except (InputError, ExplanationUnavailableError) as error:
        print(f"cannot explain {args.image}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(explanation.overlay_png)
    shares = explanation.shares
    summary = {"decision": prediction.decision.label, "triage": prediction.decision.triage,
               "probabilities": prediction.probabilities, "method": explanation.method,
               "target_class": explanation.target_class, "overlay": str(args.out),
               "size": [explanation.width, explanation.height], "lung_zones": shares.zones,
               "outside_chest": shares.outside_chest, "shortcut_warning": shares.shortcut_warning}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"{args.image.name}: {prediction.decision.label} ({prediction.decision.triage}); "
          f"{explanation.method} of {explanation.target_class} -> {args.out} ({explanation.width}x{explanation.height})")
    for zone, share in shares.zones.items():
        print(f"  {zone:13s} {share:6.1%}")
    print(f"  {'outside chest':13s} {shares.outside_chest:6.1%}"
          + ("   WARNING: much attention outside the chest (borders, text, markers): possible shortcut"
             if shares.shortcut_warning else ""))


if __name__ == "__main__":
    main()
