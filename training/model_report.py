"""``make model-report``: the champion's one report card, on the patients that matter.

    python -m training.model_report --bundle DIR [--data-dir DIR] [--out reports/model] [--name champion]
        [--loso reports/robustness/loso-<family>.json] [--segmenter reports/lungs/segmenter.json]

A screening model is judged on the adults it has never seen, so the headline numbers are the
ones issue 13 sets floors for, not the pooled accuracy that pediatric images inflate:

- TB against *adult* normals (all TB in cxr3 is adult; pediatric normals are an easy contrast);
- adult pneumonia against adult normals of the same hospital (nih-cxr14: the only source holding
  both), how much adult pneumonia the policy calls TB, and how much it flags at all;
- every table per source, per population (adult / pediatric, :mod:`training.robustness.populations`)
  and, for NIH images, per view (AP / PA, from ``nih-metadata.csv``);
- shortcut probes on the model's own features: can a linear probe tell adult from pediatric
  *normals* (age leaking into the representation) or AP from PA among NIH images (the view, which
  follows how sick the patient was, leaking in);
- leave-one-source-out worst-source TB sensitivity, copied from a LOSO report of the same family
  when one is given, else ``null`` with the reason (a neural LOSO is about an hour per fold here);
- the gate's refusals on the real test split, per source;
- the lung segmenter's Dice on its held-out masks.

Decisions and probabilities come from :meth:`cxr_core.bundle.Predictor.score` (the bundle's own
temperature and validation-fitted thresholds), exactly what the endpoint computes. Writes
``<out>/<name>.json`` and ``<out>/<name>.md``; the targets block says for each floor whether it
holds and by how much it misses.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score
from tqdm import tqdm

from cxr_core.bundle import Predictor, load_bundle
from cxr_core.calibration import expected_calibration_error
from cxr_core.errors import InputError
from cxr_core.preprocess import prepare_image
from cxr_core.reporting import fmt, markdown_table
from training.config import family_name
from training.data import ImageRecord, default_data_dir
from training.datasets import open_dataset, sample_per_class
from training.provenance import git_commit, utc_now
from training.robustness.populations import ADULT, age_group
from training.robustness.shortcuts import penultimate_features, probe_accuracy

log = logging.getLogger("training.model_report")

TB, PNEUMONIA, NORMAL = "tuberculosis", "pneumonia", "normal"
NIH = "nih-cxr14"

#: issue 13's "done when" floors: key -> (comparison, bound)
TARGETS: dict[str, tuple[str, float]] = {
    "test.tb_vs_adult_normal_auc": (">=", 0.95),
    "test.tb_sensitivity": (">=", 0.90),
    "test.tb_specificity_adult_normal": (">=", 0.80),
    "test.adult_pneumonia_vs_adult_normal_auc": (">=", 0.90),
    "test.adult_pneumonia_called_tb": ("<=", 0.15),
    "test.adult_pneumonia_flagged": (">=", 0.90),
    "loso.worst_source_tb_sensitivity": (">=", 0.85),
    "test.macro_auc": (">=", 0.97),
    "test.ece": ("<=", 0.03),
}


class Scored:
    """Records of one or more splits with the bundle's calibrated probabilities and decisions."""

    def __init__(self, classes: list[str], records: list[ImageRecord], probabilities: np.ndarray,
                 decisions: np.ndarray, refusals: list[str | None], pixels: np.ndarray):
        self.classes = classes
        self.records = records
        self.probabilities = probabilities
        self.decisions = decisions  # class indices, the policy's
        self.refusals = refusals  # gate code per image, None where gradable
        self.pixels = pixels
        self.labels = np.asarray([classes.index(r.label) for r in records])

    def mask(self, keep) -> np.ndarray:
        return np.asarray([bool(keep(r)) for r in self.records], dtype=bool)

    def p(self, name: str) -> np.ndarray:
        return self.probabilities[:, self.classes.index(name)]

    def decided(self, name: str) -> np.ndarray:
        return self.decisions == self.classes.index(name)


def score_records(predictor: Predictor, records: list[ImageRecord], batch_size: int = 32, desc: str = "") -> Scored:
    """Prepare every image as serving does, score it, and ask the gate (without letting it change the scores)."""
    kept, prepared = [], []
    for record in tqdm(records, desc=f"model report: preparing {desc}", unit="img", file=sys.stderr):
        try:
            prepared.append(prepare_image(record.path.read_bytes(), predictor.manifest.preprocess))
            kept.append(record)
        except InputError as error:
            log.warning("unreadable %s: %s", record.relpath, error.code)
    pixels = np.stack([p.pixels for p in prepared])
    probabilities, decisions, refusals = [], [], []
    for start in tqdm(range(0, len(pixels), batch_size), desc=f"model report: scoring {desc}", file=sys.stderr):
        chunk = pixels[start:start + batch_size]
        scores = predictor.score(chunk)
        probabilities.append(scores.probabilities)
        decisions.append(scores.decisions)
        if predictor.gate is not None:
            batch = prepared[start:start + batch_size]
            verdicts = predictor.gate_verdicts(chunk, [p.flags for p in batch], [p.colourfulness for p in batch])
            refusals.extend(None if v.gradable else v.code for v in verdicts)
        else:
            refusals.extend([None] * len(chunk))
    return Scored(predictor.classes, kept, np.concatenate(probabilities), np.concatenate(decisions), refusals, pixels)


def _auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    if positive.sum() == 0 or (~positive).sum() == 0:
        return None
    return round(float(roc_auc_score(positive, scores)), 4)


def _share(hits: np.ndarray) -> float | None:
    return round(float(hits.mean()), 4) if hits.size else None


def headline(s: Scored) -> dict[str, Any]:
    """The numbers issue 13 sets floors for, on one scored split."""
    adult_normal = s.mask(lambda r: r.label == NORMAL and age_group(r) == ADULT)
    tb = s.mask(lambda r: r.label == TB)
    nih_normal = s.mask(lambda r: r.label == NORMAL and r.source == NIH)
    nih_pneumonia = s.mask(lambda r: r.label == PNEUMONIA and r.source == NIH)
    tb_pair, nih_pair = tb | adult_normal, nih_normal | nih_pneumonia
    present = sorted(set(s.labels.tolist()))
    macro_auc = (round(float(roc_auc_score(s.labels, s.probabilities, multi_class="ovr", average="macro",
                                           labels=list(range(len(s.classes))))), 4)
                 if len(present) == len(s.classes) else None)
    return {
        "n": len(s.records),
        "macro_auc": macro_auc,
        "ece": round(float(expected_calibration_error(s.probabilities, s.labels)), 4),
        "accuracy_policy": _share(s.decisions == s.labels),
        "tb_vs_adult_normal_auc": _auc(tb[tb_pair], s.p(TB)[tb_pair]),
        "tb_sensitivity": _share(s.decided(TB)[tb]),
        "tb_specificity_adult_normal": _share(~s.decided(TB)[adult_normal]),
        "adult_normal_called_normal": _share(s.decided(NORMAL)[adult_normal]),
        "adult_pneumonia_vs_adult_normal_auc": _auc(nih_pneumonia[nih_pair], s.p(PNEUMONIA)[nih_pair]),
        "adult_pneumonia_called_tb": _share(s.decided(TB)[nih_pneumonia]),
        "adult_pneumonia_flagged": _share((s.decided(TB) | s.decided(PNEUMONIA))[nih_pneumonia]),
        "n_tb": int(tb.sum()), "n_adult_normal": int(adult_normal.sum()), "n_adult_pneumonia": int(nih_pneumonia.sum()),
        "confusion_policy": confusion_matrix(s.labels, s.decisions, labels=list(range(len(s.classes)))).tolist(),
    }


def group_rows(s: Scored, key) -> dict[str, dict[str, Any]]:
    """Per group (source / population / view): n per class, the policy's recall per class, called-TB share, AUCs."""
    groups: dict[str, dict[str, Any]] = {}
    names = sorted({key(r) for r in s.records} - {None})
    for name in names:
        rows = s.mask(lambda r, name=name: key(r) == name)
        entry: dict[str, Any] = {"n": int(rows.sum()),
                                 "counts": dict(sorted(Counter(r.label for r, k in zip(s.records, rows) if k).items())),
                                 "accuracy_policy": _share((s.decisions == s.labels)[rows]),
                                 "called_tb": _share(s.decided(TB)[rows]),
                                 "refused_by_gate": _share(np.asarray([c is not None for c in s.refusals])[rows])}
        for cls in s.classes:
            members = rows & (s.labels == s.classes.index(cls))
            entry[f"recall_{cls}"] = _share(s.decided(cls)[members])
        for disease in (TB, PNEUMONIA):
            pair = rows & ((s.labels == s.classes.index(disease)) | (s.labels == s.classes.index(NORMAL)))
            entry[f"auc_{disease}_vs_normal"] = _auc((s.labels == s.classes.index(disease))[pair], s.p(disease)[pair])
        groups[name] = entry
    return groups


def nih_views(data_dir: Path) -> dict[str, str]:
    path = data_dir / "nih-metadata.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        return {row["id"]: row["view"] for row in csv.DictReader(handle)}


def shortcut_probes(predictor: Predictor, s: Scored, views: dict[str, str], seed: int) -> dict[str, Any]:
    """Linear probes on the model's features: age within normals, AP/PA within NIH images."""
    features = penultimate_features(predictor, s.pixels)
    normals = np.flatnonzero(s.mask(lambda r: r.label == NORMAL))
    nih = np.flatnonzero(s.mask(lambda r: r.image_id in views))
    age = probe_accuracy(features[normals], [age_group(s.records[i]) for i in normals], seed=seed)
    view = probe_accuracy(features[nih], [views[s.records[i].image_id] for i in nih], seed=seed)
    return {"age_probe_accuracy": age["accuracy"], "age_probe": age,
            "view_probe_accuracy": view["accuracy"], "view_probe": view,
            "note": "cross-validated logistic regression on the penultimate features; compare with chance (majority share)"}


def loso_block(path: Path | None) -> dict[str, Any]:
    """The headline of a ``training.robustness.loso`` report (its ``baseline`` mitigation: the family
    config as trained), with the per-source numbers and the recipe the folds were trained with."""
    if path is None or not path.exists():
        return {"worst_source_tb_sensitivity": None,
                "reason": "no leave-one-source-out report given for this family (LOSO_REPORT=...); a neural fold takes "
                          "37-47 min on 2 CPU cores (make loso-champion)"}
    document = json.loads(path.read_text())
    target = document.get("target_class", "tuberculosis")
    mitigations = document.get("mitigations", {})
    name = "baseline" if "baseline" in mitigations else next(iter(mitigations), None)
    entry = mitigations.get(name, {}) if name else {}
    summary = entry.get("summary", {})
    folds = {f["fold"]: f for f in entry.get("folds", []) if f.get("holdout")}
    return {
        "worst_source_tb_sensitivity": summary.get(f"worst_source_{target}_sensitivity"),
        "worst_source": summary.get("worst_source"),
        "tb_specificity_at_worst_source": summary.get(f"{target}_specificity_at_worst_source"),
        "worst_source_same_population_tb_auc": summary.get(f"worst_source_same_population_{target}_auc"),
        "per_source": {fold: {"tb_sensitivity": summary.get(f"per_source_{target}_sensitivity", {}).get(fold),
                              "tb_specificity": summary.get(f"per_source_{target}_specificity", {}).get(fold),
                              "same_population_tb_auc": summary.get(f"per_source_same_population_{target}_auc", {}).get(fold),
                              "counts": folds[fold]["heldout"]["counts"], "tested_on": folds[fold]["tested_on"],
                              "train_seconds": folds[fold].get("train_seconds")}
                       for fold in folds},
        "folds_not_run": [f for f in document.get("folds", []) if f != "all-sources" and f not in folds],
        "family": document.get("family"), "mitigation": name, "recipe": document.get("recipe", {}),
        "schedule": document.get("schedule", {}), "created_at": document.get("created_at"), "source": str(path),
    }


def targets_block(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, (op, bound) in TARGETS.items():
        section, name = key.split(".")
        value = report[section].get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        gap = None if value is None else round((bound - value) if op == ">=" else (value - bound), 4)
        out[key] = {"value": value, "target": f"{op} {bound}", "met": met, "miss_by": gap if met is False else 0.0 if met else None}
    return out


def build_report(bundle: Path, data_dir: Path, loso: Path | None, segmenter: Path, seed: int = 0,
                 limit: int | None = None) -> dict[str, Any]:
    predictor = load_bundle(bundle)
    dataset = open_dataset(data_dir, None)
    views = nih_views(data_dir)
    split = lambda name: sample_per_class(dataset.split(name), limit, seed)  # noqa: E731  (limit: smoke tests only)
    test = score_records(predictor, split("test"), desc="test")
    probe_split = score_records(predictor, split("val") + split("test"), desc="val+test for probes")
    view_of = lambda r: views.get(r.image_id)  # noqa: E731
    manifest = json.loads((bundle / "bundle.json").read_text())
    weights = sorted(p for p in bundle.iterdir() if p.suffix in (".pt", ".pth", ".joblib", ".pkl"))
    refusals = Counter(code for code in test.refusals if code)
    report: dict[str, Any] = {
        "generated": utc_now(), "commit": git_commit(), "data_dir": str(data_dir), "limit_per_class": limit,
        "bundle": {"path": str(bundle), "family": manifest.get("family") or manifest.get("model", {}).get("name"),
                   "preprocess": manifest.get("preprocess"), "temperature": manifest.get("temperature"),
                   "thresholds": manifest.get("policy", {}).get("thresholds"),
                   "weights": {p.name: {"bytes": p.stat().st_size,
                                        "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in weights},
                   "provenance": manifest.get("provenance")},
        "classes": test.classes,
        "test": headline(test),
        "per_source": group_rows(test, lambda r: r.source),
        "per_population": group_rows(test, age_group),
        "per_nih_view": group_rows(test, view_of),
        "gate_on_test": {"refused": sum(refusals.values()), "n": len(test.records), "codes": dict(refusals),
                         "refusal_rate": round(sum(refusals.values()) / max(len(test.records), 1), 4)},
        "shortcuts": shortcut_probes(predictor, probe_split, views, seed),
        "loso": _same_family(loso_block(loso), manifest.get("model", {})),
        "segmenter": _segmenter(segmenter),
    }
    report["targets"] = targets_block(report)
    return report


def _same_family(loso: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """A LOSO report of another family says nothing about this bundle: keep it visible, drop its headline."""
    if loso.get("reason"):
        return loso
    family = family_name(model.get("name", "?"), model.get("training_mode"))
    if loso.get("family") != family:
        return {**loso, "worst_source_tb_sensitivity": None, "worst_source_tb_sensitivity_of_report": loso[
            "worst_source_tb_sensitivity"], "reason": f"the LOSO report is of {loso.get('family')}, the bundle is {family}"}
    return loso


def _segmenter(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"dice_mean": None, "reason": f"{path} missing (make train-lungs)"}
    document = json.loads(path.read_text())
    return {"dice_mean": document.get("test", {}).get("dice_mean"), "val_dice_mean": document.get("val_dice_mean"),
            "source": str(path)}


def write_markdown(report: dict[str, Any], path: Path) -> None:
    t = report["test"]
    lines = [f"# Model report: {report['bundle']['family']}", "",
             f"Generated by `python -m training.model_report` ({report['generated']}, commit `{report['commit'][:10]}`) "
             f"on `{report['data_dir']}`, test split, thresholds fitted on validation. Do not edit by hand.", "",
             "## Targets (issue 13)", ""]
    lines += markdown_table(["measure", "value", "target", "met", "missed by"],
                            [[k, fmt(v["value"]), v["target"], {True: "yes", False: "**no**", None: "n/a"}[v["met"]],
                              fmt(v["miss_by"]) if v["met"] is False else ""] for k, v in report["targets"].items()])
    lines += ["", f"n = {t['n']} test images: {t['n_tb']} TB, {t['n_adult_normal']} adult normals, "
              f"{t['n_adult_pneumonia']} adult pneumonia (nih-cxr14). Policy accuracy {fmt(t['accuracy_policy'])}; "
              f"adult normals called normal {fmt(t['adult_normal_called_normal'])}.", "",
              "Confusion (policy; rows true, columns decided): " + ", ".join(report["classes"]), ""]
    lines += markdown_table(["true \\ decided"] + report["classes"],
                            [[c] + row for c, row in zip(report["classes"], t["confusion_policy"])])
    for title, key in (("Per source", "per_source"), ("Per population", "per_population"),
                       ("NIH images per view", "per_nih_view")):
        lines += ["", f"## {title}", ""]
        header = ["group", "n", "classes", "accuracy", "recall normal", "recall pneumonia", "recall TB", "called TB",
                  "AUC TB vs normal", "AUC pneumonia vs normal", "gate refused"]
        lines += markdown_table(header, [[name, g["n"], ", ".join(f"{k} {v}" for k, v in g["counts"].items()),
                                          fmt(g["accuracy_policy"]), fmt(g.get("recall_normal")),
                                          fmt(g.get("recall_pneumonia")), fmt(g.get("recall_tuberculosis")),
                                          fmt(g["called_tb"]), fmt(g["auc_tuberculosis_vs_normal"]),
                                          fmt(g["auc_pneumonia_vs_normal"]), fmt(g["refused_by_gate"])]
                                         for name, g in report[key].items()])
    s = report["shortcuts"]
    lines += ["", "## Shortcuts", "",
              f"- age group within normals: probe accuracy {fmt(s['age_probe_accuracy'])} "
              f"(chance {fmt(s['age_probe']['chance'])}, n {s['age_probe']['n']})",
              f"- NIH view AP/PA: probe accuracy {fmt(s['view_probe_accuracy'])} "
              f"(chance {fmt(s['view_probe']['chance'])}, n {s['view_probe']['n']})",
              "", "## Leave-one-source-out", ""]
    lines += loso_markdown(report["loso"])
    lines += ["", "## Gate and segmenter", "",
              f"- gate refusals on the real test split: {report['gate_on_test']['refused']} / {report['gate_on_test']['n']} "
              f"({fmt(report['gate_on_test']['refusal_rate'])}) {report['gate_on_test']['codes']}",
              f"- lung segmenter Dice on its held-out masks: {fmt(report['segmenter']['dice_mean'])}", ""]
    path.write_text("\n".join(lines))


def loso_markdown(loso: dict[str, Any]) -> list[str]:
    """The LOSO section: the headline, where it came from, and one row per held-out source."""
    if loso.get("reason"):
        return [f"- worst-source TB sensitivity: n/a ({loso['reason']})"]
    recipe, schedule = loso.get("recipe") or {}, loso.get("schedule") or {}
    lines = [f"- worst-source TB sensitivity: {fmt(loso['worst_source_tb_sensitivity'])} ({loso.get('worst_source')}; "
             f"TB specificity there {fmt(loso.get('tb_specificity_at_worst_source'))})",
             f"- from `{loso['source']}` ({loso.get('family')}, mitigation `{loso.get('mitigation')}`, "
             f"{loso.get('created_at')}); recipe `{recipe.get('config', '?')}`"
             + (f" with `{' '.join(recipe['overrides'])}`" if recipe.get("overrides") else "")
             + (f", {schedule['epochs']} epochs x {schedule['samples_per_epoch']} draws" if schedule.get("epochs")
                and schedule.get("samples_per_epoch") else "")]
    if loso.get("folds_not_run"):
        lines.append(f"- **not run**: {', '.join(loso['folds_not_run'])} (the worst source is over the rows below only)")
    lines.append("")
    lines += markdown_table(["held-out source", "tested on", "n", "TB sensitivity", "TB specificity",
                             "same-population TB AUC"],
                            [[fold, f["tested_on"], ", ".join(f"{k} {v}" for k, v in f["counts"].items() if v),
                              fmt(f["tb_sensitivity"]), fmt(f["tb_specificity"]), fmt(f["same_population_tb_auc"])]
                             for fold, f in loso.get("per_source", {}).items()])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.model_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("reports/model"))
    parser.add_argument("--name", default="champion")
    parser.add_argument("--loso", type=Path, default=None, help="a LOSO report of the same family (optional)")
    parser.add_argument("--segmenter", type=Path, default=Path("reports/lungs/segmenter.json"))
    parser.add_argument("--limit", type=int, default=None, help="images per class and split (smoke runs; None = all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = build_report(args.bundle, args.data_dir, args.loso, args.segmenter, limit=args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_markdown(report, args.out / f"{args.name}.md")
    for key, entry in report["targets"].items():
        print(f"model-report: {key} = {entry['value']} (target {entry['target']}, met {entry['met']})")
    print(f"model-report: {args.out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
