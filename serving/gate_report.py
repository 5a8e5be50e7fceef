"""Measure the gradability gate of a bundle: refusals on real radiographs and on every garbage kind.

    python -m serving.gate_report --bundle DIR [--data-dir ../shared/data/cxr3] [--out reports/serving/gate.json]

Real: every image of the test split (bytes through ``Predictor.predict_many``, the path serving
uses); refused = ``ungradable`` or an input error. Garbage: synthetic images (blank, uniform,
transparent, noise, gradients, strips, checkerboards), the natural photographs scikit-image ships
(``skimage.data``), real test radiographs cropped to a corner (the top-left and bottom-right thirds,
at their size and at 320 px, and any corner of 25-55% per side), and truncated PNG/JPEG files
(those must be input errors, code ``truncated``). The goal: real <= 1%, every garbage kind 100%.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from serving.report_cli import bundle_report_parser

NATURAL_PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "brick", "grass", "gravel", "horse",
                  "hubble_deep_field", "immunohistochemistry", "page", "text", "clock", "coins", "moon", "retina",
                  "colorwheel", "logo", "cat", "cell", "shepp_logan_phantom", "binary_blobs", "checkerboard")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG") if mode else Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def incomplete_png(gray: np.ndarray, fraction: float = 0.4) -> bytes:
    """A well-formed PNG (IHDR, IDAT, IEND, valid CRCs) whose pixel stream holds only some rows."""
    height, width = gray.shape
    rows = b"".join(b"\x00" + gray[row].tobytes() for row in range(int(height * fraction)))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _resize_longer(image: Image.Image, longer: int) -> Image.Image:
    scale = longer / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def sources_by_stem(data_dir: Path) -> dict[str, str]:
    """File stem -> source dataset, from the data's ``manifest.csv`` (empty when it has none)."""
    path = Path(data_dir) / "manifest.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        return {row["id"]: row.get("source_dataset") or "unknown" for row in csv.DictReader(handle) if row.get("id")}


def garbage_kinds(radiographs: list[np.ndarray], seed: int = 0) -> dict[str, list[bytes]]:
    """kind -> files that are not gradable chest radiographs (``radiographs``: real 8-bit grays)."""
    rng = np.random.default_rng(seed)
    sizes = [(512, 512), (1024, 800), (300, 400)]

    def each(make: Callable[[int, int, int], bytes]) -> list[bytes]:
        return [make(h, w, i) for i, (h, w) in enumerate(sizes)]

    kinds: dict[str, list[bytes]] = {
        "all_black": each(lambda h, w, i: _png(np.zeros((h, w), np.uint8))),
        "all_white": each(lambda h, w, i: _png(np.full((h, w), 255, np.uint8))),
        "uniform_gray": each(lambda h, w, i: _jpeg(np.full((h, w), 60 + 60 * i, np.uint8))),
        "transparent": each(lambda h, w, i: _png(np.zeros((h, w, 4), np.uint8), "RGBA")),
        "large_black": [_png(np.zeros((4000, 4000), np.uint8))],
        "uniform_noise": each(lambda h, w, i: _png(rng.integers(0, 256, (h, w), dtype=np.uint8))),
        "gaussian_noise": each(lambda h, w, i: _png(np.clip(rng.normal(128, 40, (h, w)), 0, 255).astype(np.uint8))),
        "rgb_noise": each(lambda h, w, i: _jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))),
        "salt_and_pepper": each(lambda h, w, i: _png((rng.random((h, w)) > 0.5).astype(np.uint8) * 255)),
        "rgb_gradient": each(lambda h, w, i: _png(np.stack(np.broadcast_arrays(
            np.linspace(0, 255, w)[None, :], np.linspace(255, 0, h)[:, None], np.full((h, w), 128.0)), -1)
            .astype(np.uint8))),
        "gray_gradient": each(lambda h, w, i: _png(np.broadcast_to(np.linspace(0, 255, w, dtype=np.float32)[None, :],
                                                                    (h, w)).astype(np.uint8))),
        "checkerboard": each(lambda h, w, i: _png(((np.indices((h, w)) // (16 * (i + 1))).sum(0) % 2 * 255)
                                                  .astype(np.uint8))),
        "strip_wide": [_png(np.asarray(Image.fromarray(gray).resize((5000, 64)))) for gray in radiographs[:3]],
        "strip_tall": [_png(np.asarray(Image.fromarray(gray).resize((80, 1200)))) for gray in radiographs[:3]],
    }
    from skimage import data as photos

    natural = []
    for name in NATURAL_PHOTOS:
        image = np.asarray(getattr(photos, name)())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        natural.append(_jpeg(image[..., :3]) if image.ndim == 3 else _png(image.astype(np.uint8)))
    kinds["natural_photo"] = natural
    corners = []
    for gray in radiographs:
        height, width = gray.shape
        h, w = height // 3, width // 3
        corners += [_png(np.ascontiguousarray(gray[:h, :w])), _png(np.ascontiguousarray(gray[-h:, -w:]))]
    kinds["radiograph_corner"] = corners
    # the same corners at a radiograph's size: the size rule alone must not be what refuses a corner
    kinds["radiograph_corner_full_size"] = [_png(np.asarray(_resize_longer(Image.open(io.BytesIO(corner)), 320)))
                                            for corner in corners]
    # any of the four corners, 25-55% of each side, at a radiograph's size: not only the thirds above
    from cxr_core.gate import cut_corner

    kinds["radiograph_corner_any"] = [_png(np.asarray(_resize_longer(Image.fromarray(cut_corner(gray, rng)), 320)))
                                      for gray in radiographs for _ in range(2)]
    kinds["truncated_png"] = [incomplete_png(gray) for gray in radiographs[:4]]
    kinds["truncated_jpeg"] = [_jpeg(gray)[: len(_jpeg(gray)) * 2 // 5] + b"\xff\xd9" for gray in radiographs[:4]]
    kinds["cut_png"] = [_png(gray)[: len(_png(gray)) // 2] for gray in radiographs[:4]]
    return kinds


def refused(result) -> tuple[bool, str]:
    """(refused, code) of one predict_many result."""
    if isinstance(result, Exception):
        return True, getattr(result, "code", "bad_input")
    if not result.gradable:
        return True, f"ungradable:{result.gate.code}"
    return False, result.decision.label


def measure(predictor, real: list[bytes], kinds: dict[str, list[bytes]], chunk: int = 32,
            real_sources: list[str] | None = None) -> dict:
    def run(files: list[bytes]) -> list[tuple[bool, str]]:
        out = []
        for start in range(0, len(files), chunk):
            out += [refused(result) for result in predictor.predict_many(files[start:start + chunk])]
        return out

    real_results = run(real)
    report = {"real_test": {"n": len(real_results), "refused": sum(r for r, _ in real_results),
                            "refusal_rate": round(float(np.mean([r for r, _ in real_results])), 4),
                            "refused_codes": dict(Counter(code for r, code in real_results if r))}}
    if real_sources is not None:
        per_source = {}
        for source in sorted(set(real_sources)):
            mine = [result for result, of in zip(real_results, real_sources) if of == source]
            per_source[source] = {"n": len(mine), "refused": sum(r for r, _ in mine),
                                  "refusal_rate": round(float(np.mean([r for r, _ in mine])), 4),
                                  "refused_codes": dict(Counter(code for r, code in mine if r))}
        report["real_test"]["per_source"] = per_source
    garbage = {}
    for kind, files in kinds.items():
        results = run(files)
        garbage[kind] = {"n": len(results), "refusal_rate": round(float(np.mean([r for r, _ in results])), 4),
                         "codes": dict(Counter(code for _, code in results))}
    report["garbage"] = garbage
    return report


def main(argv: list[str] | None = None) -> None:
    parser = bundle_report_parser("python -m serving.gate_report", __doc__, "reports/serving/gate.json")
    args = parser.parse_args(argv)
    from cxr_core.bundle import load_bundle

    predictor = load_bundle(args.bundle)
    if predictor.gate is None:
        parser.error(f"{args.bundle} has no gate; fit one with python -m cxr_core.gate fit --bundle DIR")
    paths = sorted((args.data_dir / "test").glob("*/*.jpg"))
    real = [path.read_bytes() for path in paths]
    sources = sources_by_stem(args.data_dir)
    # 30 radiographs spread over the split: 60 corners (and 60 at full size) for a rate worth quoting
    grays = [np.asarray(Image.open(path).convert("L")) for path in paths[:: max(1, len(paths) // 30)][:30]]
    report = {"bundle": args.bundle_name or str(args.bundle), "family": predictor.manifest.model.name,
              "image_size": predictor.manifest.preprocess.image_size, "gate": predictor.manifest.gate.model_dump(),
              **measure(predictor, real, garbage_kinds(grays),
                        real_sources=[sources.get(path.stem, "unknown") for path in paths])}
    report["all_garbage_refused"] = all(kind["refusal_rate"] == 1.0 for kind in report["garbage"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.out}: real test refusal {report['real_test']['refusal_rate']:.2%} of {report['real_test']['n']}; "
          "garbage: " + ", ".join(f"{k} {v['refusal_rate']:.0%}" for k, v in report["garbage"].items()))


if __name__ == "__main__":
    main()
