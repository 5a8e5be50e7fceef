"""``make perturb``: graded image perturbations, applied before the shared preprocessing.

    python -m training.robustness.perturb (--bundle [NAME=]DIR ... | --from-loso reports/robustness/loso.json)
        [--data-dir DIR]
        [--split test] [--limit-per-class N] [--out reports/robustness] [--robustness configs/robustness.yaml]

Every test image is decoded once (the bytes -> 8-bit grayscale step of the serving chain); each
perturbation is applied to that decoded image at each severity, then the bundle's own
:func:`cxr_core.preprocess.prepare_gray` (border crop, CLAHE if configured, resize), model,
temperature and policy thresholds run unchanged. Severity 0 is the identity, so its numbers are
the clean evaluation. Per severity: macro AUC, tuberculosis / pneumonia sensitivity and
specificity at the policy thresholds, same-population TB AUC, and the share of decisions that
changed. Per perturbation: the first severity at which TB sensitivity falls below the floor
(0.90) and the first at which it loses ``drop_margin`` against clean.

Writes ``<out>/<name>.json``, ``<out>/<name>.md`` (name: ``perturb``) and one ``<out>/perturb_<bundle>.png`` per bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel
from tqdm import tqdm

from cxr_core.bundle import Predictor, load_bundle
from cxr_core.decode import decode_grayscale
from cxr_core.preprocess import prepare_gray, to_uint8
from cxr_core.reporting import markdown_table
from training.data import ImageRecord, default_data_dir
from training.datasets import open_dataset, sample_per_class
from training.provenance import git_commit, utc_now
from training.robustness.config import DEFAULT_CONFIG_PATH, PerturbConfig, RobustnessConfig
from training.robustness.measures import operating_point_metrics, same_population_auc, value
from training.robustness.populations import age_group

log = logging.getLogger("training.robustness.perturb")

Perturbation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def gaussian_noise(gray: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = gray.astype(np.float32) + rng.normal(0.0, sigma, gray.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def blur(gray: np.ndarray, sigma_at_256: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur; sigma scales with the image so a 1024 px and a 256 px film blur alike."""
    sigma = sigma_at_256 * min(gray.shape) / 256.0
    return cv2.GaussianBlur(gray, (0, 0), sigma)


def jpeg(gray: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def gamma(gray: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    table = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** exponent), 0, 255).astype(np.uint8)
    return cv2.LUT(gray, table)


def contrast(gray: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    values = gray.astype(np.float32)
    mean = float(values.mean())
    return np.clip(np.rint((values - mean) * factor + mean), 0, 255).astype(np.uint8)


def rotation(gray: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate by +-``degrees`` (sign drawn per image) about the centre; edges replicated (a tilted patient)."""
    height, width = gray.shape
    angle = degrees if rng.random() < 0.5 else -degrees
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    return cv2.warpAffine(gray, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def black_border(gray: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pad a black frame, ``fraction`` of the height/width on each side (scanner / letterbox frame)."""
    height, width = gray.shape
    top, side = int(round(fraction * height)), int(round(fraction * width))
    return cv2.copyMakeBorder(gray, top, top, side, side, cv2.BORDER_CONSTANT, value=0)


def burned_text(gray: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Burn in a laterality marker and an annotation line, ``size`` x a small font, in white."""
    out = gray.copy()
    height, width = gray.shape
    scale = size * min(height, width) / 512.0
    thickness = max(1, int(round(2 * scale)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(out, "PORTABLE AP  01/01/24", (int(0.03 * width), int(0.06 * height) + int(20 * scale)), font,
                0.8 * scale, 255, thickness, cv2.LINE_AA)
    (text_w, _), _ = cv2.getTextSize("L", font, 1.6 * scale, thickness + 1)
    cv2.putText(out, "L", (width - int(0.05 * width) - text_w, int(0.08 * height) + int(40 * scale)), font,
                1.6 * scale, 255, thickness + 1, cv2.LINE_AA)
    box = max(2, int(round(12 * scale)))
    cv2.rectangle(out, (int(0.05 * width), height - int(0.06 * height) - box),
                  (int(0.05 * width) + box, height - int(0.06 * height)), 255, -1)
    return out


def resample(gray: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Down to ``factor`` of the original size and back up: destroys the resolution cue."""
    height, width = gray.shape
    small = cv2.resize(gray, (max(8, int(round(width * factor))), max(8, int(round(height * factor)))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


PERTURBATIONS: dict[str, Perturbation] = {
    "gaussian_noise": gaussian_noise, "blur": blur, "jpeg": jpeg, "gamma_dark": gamma, "gamma_bright": gamma,
    "contrast": contrast, "rotation": rotation, "black_border": black_border, "burned_text": burned_text,
    "resample": resample,
}
IDENTITY: dict[str, float] = {
    "gaussian_noise": 0, "blur": 0, "jpeg": 0, "gamma_dark": 1, "gamma_bright": 1, "contrast": 1, "rotation": 0,
    "black_border": 0, "burned_text": 0, "resample": 1,
}


def perturb(gray: np.ndarray, name: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """One perturbation of one decoded 8-bit image; the identity level returns the image unchanged."""
    if level == IDENTITY[name]:
        return gray
    return PERTURBATIONS[name](np.ascontiguousarray(gray), level, rng)


def decode_records(records: list[ImageRecord], max_megapixels: float) -> list[tuple[np.ndarray, str, int]]:
    """(8-bit gray, format, bit depth) per record: the first step of :func:`cxr_core.preprocess.prepare_image`."""
    decoded = []
    for record in tqdm(records, desc="perturb: decoding", unit="img", file=sys.stderr, leave=False):
        image = decode_grayscale(record.path.read_bytes(), max_megapixels)
        decoded.append((to_uint8(image.pixels), image.source_format, image.bit_depth))
    return decoded


def predict_perturbed(predictor: Predictor, decoded: list[tuple[np.ndarray, str, int]], name: str | None,
                      level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Perturb each decoded image, run the bundle's chain; returns (calibrated probs, policy decisions)."""
    config = predictor.manifest.preprocess
    pixels = []
    for index, (gray, fmt, depth) in enumerate(decoded):
        image = gray if name is None else perturb(gray, name, level, np.random.default_rng((seed, index)))
        pixels.append(prepare_gray(image, config, fmt, depth).pixels)
    scores = predictor.score(np.stack(pixels))
    return scores.probabilities, scores.decisions


def first_level(rows: list[dict], predicate: Callable[[float], bool], key: str) -> dict | None:
    for row in rows:
        v = row.get(key)
        if v is not None and predicate(v):
            return {"severity_index": row["severity_index"], "level": row["level"], key: v}
    return None


def run_bundle(predictor: Predictor, records: list[ImageRecord], settings: PerturbConfig, seed: int,
               target: str = "tuberculosis") -> dict[str, Any]:
    classes = predictor.classes
    labels = np.asarray([classes.index(r.label) for r in records], dtype=np.int64)
    ages = [age_group(r) for r in records]
    decoded = decode_records(records, predictor.manifest.preprocess.max_megapixels)
    clean_probs, clean_decisions = predict_perturbed(predictor, decoded, None, 0, seed)

    def row(name: str, index: int, level: float, probs: np.ndarray, decisions: np.ndarray) -> dict:
        m = operating_point_metrics(classes, labels, probs, decisions, ages)
        tb, pn = m["classes"].get(target, {}), m["classes"].get("pneumonia", {})
        return {
            "severity_index": index, "level": level, "macro_auc": m["macro_auc"],
            f"{target}_auc": tb.get("auc"), f"{target}_sensitivity": value(tb.get("sensitivity")),
            f"{target}_specificity": value(tb.get("specificity")),
            f"same_population_{target}_auc": same_population_auc(m, target),
            "pneumonia_auc": pn.get("auc"), "pneumonia_sensitivity": value(pn.get("sensitivity")),
            "pneumonia_specificity": value(pn.get("specificity")),
            "decisions_changed": round(float(np.mean(decisions != clean_decisions)), 4),
        }

    clean = row("clean", 0, 0, clean_probs, clean_decisions)
    results: dict[str, Any] = {"n": len(records), "clean": clean, "perturbations": {}, "summary": {}}
    key = f"{target}_sensitivity"
    for name, levels in settings.severities.items():
        rows = []
        for index, level in enumerate(levels):
            if index == 0:
                rows.append({**clean, "level": level})
                continue
            probs, decisions = predict_perturbed(predictor, decoded, name, level, seed)
            rows.append(row(name, index, level, probs, decisions))
            log.info("perturb %s %s=%s: %s sens %s, macro AUC %s", predictor.manifest.model.name, name, level,
                     target, rows[-1][key], rows[-1]["macro_auc"])
        results["perturbations"][name] = rows
        results["summary"][name] = {
            f"first_below_{settings.sensitivity_floor:.2f}": first_level(rows, lambda v: v < settings.sensitivity_floor, key),
            f"first_drop_{settings.drop_margin:.2f}": first_level(rows, lambda v: v < clean[key] - settings.drop_margin, key),
            f"min_{key}": min(r[key] for r in rows if r[key] is not None),
            "min_macro_auc": min(r["macro_auc"] for r in rows if r["macro_auc"] is not None),
        }
    return results


def plot_bundle(name: str, result: dict[str, Any], settings: PerturbConfig, path: Path) -> None:
    from training.figures import plt, save_figure

    perturbations = list(result["perturbations"])
    columns = 5
    rows = (len(perturbations) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), sharey=True, squeeze=False)
    for ax, pert in zip(axes.flat, perturbations):
        data = result["perturbations"][pert]
        x = [r["severity_index"] for r in data]
        for key, label, style in (("tuberculosis_sensitivity", "TB sens", "-o"),
                                  ("tuberculosis_specificity", "TB spec", "-x"),
                                  ("pneumonia_sensitivity", "pneumonia sens", "-s"),
                                  ("macro_auc", "macro AUC", "--^"),
                                  ("same_population_tuberculosis_auc", "same-pop TB AUC", ":d")):
            ax.plot(x, [r[key] if r[key] is not None else np.nan for r in data], style, label=label, markersize=4)
        ax.axhline(settings.sensitivity_floor, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(pert, fontsize=10)
        ax.set_xticks(x, [f"{r['level']:g}" for r in data], fontsize=7)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(perturbations):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{name}: test metrics at the bundle's policy thresholds vs perturbation severity "
                 f"(grey: TB floor {settings.sensitivity_floor:.2f})", fontsize=11)
    save_figure(fig, path)


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _level(found: dict | None) -> str:
    return "never" if found is None else f"{found['level']:g} (#{found['severity_index']})"


def write_markdown(document: dict[str, Any], path: Path) -> None:
    floor_key = f"first_below_{document['settings']['sensitivity_floor']:.2f}"
    drop_key = f"first_drop_{document['settings']['drop_margin']:.2f}"
    lines = [
        "# Perturbation suite", "",
        f"Generated by `python -m training.robustness.perturb` ({document['created_at']}, commit "
        f"`{document['git_commit'][:10]}`) on the `{document['split']}` split of `{document['data_dir']}`. "
        "Perturbations are applied to the decoded 8-bit image before the bundle's preprocessing; metrics at "
        "the bundle's temperature and policy thresholds. Do not edit by hand.", "",
    ]
    for name, result in document["bundles"].items():
        clean = result["clean"]
        lines += [f"## {name}", "", f"Bundle `{result['bundle']}`, {result['n']} images. Clean: macro AUC "
                  f"{_f(clean['macro_auc'])}, TB sensitivity {_f(clean['tuberculosis_sensitivity'])}, TB specificity "
                  f"{_f(clean['tuberculosis_specificity'])}, pneumonia sensitivity {_f(clean['pneumonia_sensitivity'])}. "
                  f"Figure: `perturb_{name}.png`.", ""]
        table = []
        for pert, rows in result["perturbations"].items():
            s = result["summary"][pert]
            per_level = [" / ".join(_f(r[key]) for r in rows)
                         for key in ("tuberculosis_sensitivity", "tuberculosis_specificity", "pneumonia_sensitivity",
                                     "macro_auc")]
            table.append([pert, ", ".join(f"{r['level']:g}" for r in rows), *per_level, _level(s[floor_key]),
                          _level(s[drop_key]), _f(rows[-1]["decisions_changed"])])
        lines += markdown_table(
            ["perturbation", "levels", "TB sens per level", "TB spec per level", "pneumonia sens per level",
             "macro AUC per level", "first level TB sens < floor", "first level TB sens drops > margin",
             "decisions changed at max"], table)
        lines.append("")
    lines += ["Level #0 is the clean image. \"first level TB sens < floor\" is #0 when the clean sensitivity is "
              "already below the floor; a perturbation can also raise TB sensitivity by calling more images TB "
              "(watch TB specificity and the share of decisions changed).", ""]
    path.write_text("\n".join(lines))


def bundle_name(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (name: the family recorded in the bundle)."""
    if "=" in spec:
        name, _, directory = spec.partition("=")
        return name, Path(directory)
    from training.config import TrainConfig

    manifest = load_bundle(spec).manifest
    train_config = manifest.provenance.train_config
    name = TrainConfig.model_validate(train_config).family if train_config else manifest.model.name
    return name, Path(spec)


def bundles_from_loso(path: Path, mitigations: list[str] | None = None) -> list[str]:
    """``NAME=DIR`` specs of the all-sources bundles a LOSO report trained: by default the
    unmitigated config (when the report has it: the "before"), the baseline (the family config as
    is) and the winning mitigation. Experimental mitigations are skipped: their bundles lack the
    transform they were trained with."""
    document = json.loads(Path(path).read_text())
    winner = (document.get("winner") or {}).get("mitigation")
    default = [n for n in ("unmitigated", "baseline") if n in document["mitigations"]]
    names = mitigations or default + ([winner] if winner and winner not in default else [])
    specs = []
    for name in names:
        entry = document["mitigations"].get(name)
        if entry is None:
            raise ValueError(f"{path} has no mitigation {name!r} (has {list(document['mitigations'])})")
        if not entry.get("deployable", True):
            log.warning("skipping %s: experimental mitigation, its bundle does not carry the transform", name)
            continue
        bundle = entry.get("summary", {}).get("all_sources_test", {}).get("bundle_dir")
        if bundle is None:
            raise ValueError(f"{path}: mitigation {name!r} has no all-sources run (include_all_sources)")
        specs.append(f"{document['family']}{'' if name == 'baseline' else '-' + name}={bundle}")
    return specs


def add_audit_arguments(parser: argparse.ArgumentParser, report_name: str) -> None:
    """The arguments every bundle audit (perturb, shortcuts) takes: bundles, data, settings, report."""
    parser.add_argument("--bundle", action="append", default=[], help="[NAME=]bundle directory (repeatable)")
    parser.add_argument("--from-loso", type=Path, default=None,
                        help="also audit the all-sources bundles of a LOSO report (unmitigated + baseline + winner)")
    parser.add_argument("--loso-mitigations", default="", help="with --from-loso: comma list instead of baseline + winner")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--exclusions", default="reports/audit/exclusions.json")
    parser.add_argument("--robustness", type=Path, default=DEFAULT_CONFIG_PATH)
    parser.add_argument("--out", type=Path, default=Path("reports/robustness"))
    parser.add_argument("--name", default=report_name, help="report file stem (<out>/<name>.json, .md)")
    parser.add_argument("--seed", type=int, default=20240611)


def bundle_specs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    specs = list(args.bundle)
    if args.from_loso:
        specs += bundles_from_loso(args.from_loso, [n for n in args.loso_mitigations.split(",") if n] or None)
    if not specs:
        parser.error("give --bundle DIR and/or --from-loso reports/robustness/loso.json")
    return specs


def audit_document(args: argparse.Namespace, settings: BaseModel, **extra: Any) -> dict[str, Any]:
    """The head every bundle audit's JSON starts with; ``bundles`` is filled one bundle at a time."""
    return {"created_at": utc_now(), "git_commit": git_commit(), "data_dir": str(args.data_dir), **extra,
            "settings": settings.model_dump(), "bundles": {}}


def write_audit_report(document: dict[str, Any], args: argparse.Namespace,
                       write_markdown: Callable[[dict[str, Any], Path], None], prog: str) -> None:
    """``<out>/<name>.json`` and the Markdown rendered from it (the .md is never edited by hand)."""
    (args.out / f"{args.name}.json").write_text(json.dumps(document, indent=1, default=float) + "\n")
    write_markdown(document, args.out / f"{args.name}.md")
    print(f"{prog}: report {args.out / f'{args.name}.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.robustness.perturb", description=__doc__.split("\n\n")[0])
    add_audit_arguments(parser, "perturb")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit-per-class", type=int, default=None, help="seeded per-class sample (CPU budget)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    specs = bundle_specs(parser, args)
    settings = RobustnessConfig.from_yaml(args.robustness).perturb
    dataset = open_dataset(args.data_dir, args.exclusions)
    records = sample_per_class(dataset.split(args.split), args.limit_per_class, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    document = audit_document(args, settings, split=args.split, limit_per_class=args.limit_per_class)
    for spec in specs:
        name, directory = bundle_name(spec)
        predictor = load_bundle(directory)
        result = run_bundle(predictor, records, settings, args.seed)
        result["bundle"] = str(directory)
        document["bundles"][name] = result
        plot_bundle(name, result, settings, args.out / f"perturb_{name}.png")
        floor_key = f"first_below_{settings.sensitivity_floor:.2f}"
        worst = {p: s[floor_key] for p, s in result["summary"].items()}
        print(f"perturb: {name}: clean TB sensitivity {_f(result['clean']['tuberculosis_sensitivity'])}; first level "
              f"below {settings.sensitivity_floor:.2f}: " + ", ".join(f"{p} {_level(v)}" for p, v in worst.items()))
    write_audit_report(document, args, write_markdown, "perturb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
