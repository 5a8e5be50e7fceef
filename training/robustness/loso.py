"""``make loso``: leave-one-source-out training and evaluation, per mitigation.

    python -m training.robustness.loso --config configs/train/hog_logreg.yaml [--data-dir DIR]
        [--out reports/robustness] [--name loso] [--robustness configs/robustness.yaml]
        [--mitigations baseline,clahe] [--folds tbx11k,tbdb] [--runs runs/robustness/loso] [key=value ...]

For each fold (``configs/robustness.yaml``: ``loso.folds``) the family is trained by the ordinary
:func:`training.train.run_training` on the train/val splits *without* the held-out source (and
without images the manifest says were copies of it); temperature and policy thresholds are fitted
on that remaining validation split; the model is then tested on every image of the held-out
source (all splits: it never saw them). A source without normal images (tbx11k) is tested against
same-age normals from the other sources' test split. An extra "all sources" run trains on the
standard splits and is tested on the standard test split: the in-distribution reference, and the
bundle that ``make perturb`` / ``make shortcuts`` audit.

Headline per mitigation: worst-source tuberculosis sensitivity and specificity at the policy
thresholds, same-population (adult TB vs adult normal) AUC, and the worst-source objective that
``objective_mode: worst_source`` selects by (:func:`training.objective.worst_source_objective`).
Writes ``<out>/<name>.json`` and ``<out>/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.bundle import load_bundle, read_manifest
from training.cache import load_pixel_array
from cxr_core.config import parse_overrides
from cxr_core.reporting import markdown_table
from training.config import TrainConfig
from training.data import Dataset, default_data_dir
from training.datasets import load_training_data, open_dataset
from training.evaluate import evaluate_predictions
from training.objective import worst_source_objective
from training.provenance import git_commit, utc_now
from training.robustness.config import DEFAULT_CONFIG_PATH, FoldSpec, MitigationSpec, RobustnessConfig
from training.robustness.measures import operating_point_metrics, same_population_auc, value
from training.robustness.mitigations import crop_toward_chest, mitigated_config, transform_split
from training.robustness.populations import AGE_RULE, age_group, describe, heldout_records, kept_for_training

log = logging.getLogger("training.robustness.loso")

ALL_SOURCES = "all-sources"


def fold_name(fold: FoldSpec | None) -> str:
    return ALL_SOURCES if fold is None else fold.holdout


def run_fold(base: TrainConfig, mitigation_name: str, mitigation: MitigationSpec, fold: FoldSpec | None,
             dataset: Dataset, data_dir: Path, runs_dir: Path, settings: RobustnessConfig) -> dict[str, Any]:
    """Train without the held-out source, test on it; returns the fold's JSON-ready result."""
    from training.train import run_training

    name = fold_name(fold)
    config = mitigated_config(base, mitigation, {**settings.loso.run_overrides,
                                                 "run_name": f"{base.run_name}-{mitigation_name}-{name}"})
    data = load_training_data(data_dir, config.exclusions, config.preprocess, config.subset, config.seed,
                              keep=lambda r: kept_for_training(r, fold),
                              transform=lambda s: transform_split(s, config, mitigation))
    result = run_training(config, data, runs_dir / base.family / mitigation_name, track=False)
    loaded = data.splits
    leaked = [r.relpath for s in ("train", "val") for r in loaded[s].records if not kept_for_training(r, fold)]
    if leaked:
        raise RuntimeError(f"{len(leaked)} images of held-out source {name} reached training, e.g. {leaked[:3]}")

    classes = result.classes
    reference = settings.loso.reference_class
    records = heldout_records(dataset, fold, reference)
    pixels = crop_toward_chest(load_pixel_array([r.path for r in records], config.preprocess), mitigation.chest_crop)
    scores = load_bundle(result.bundle_dir, gate=False).score(pixels)
    logits, probs, decisions = scores.logits, scores.probabilities, scores.decisions
    labels = np.asarray([classes.index(r.label) for r in records], dtype=np.int64)
    metrics = operating_point_metrics(classes, labels, probs, decisions, [age_group(r) for r in records], reference)
    evaluate_predictions(  # the full held-out report, for a person to read (runs/, not committed)
        classes=classes, y_true=labels, logits=logits, temperature=result.temperature, policy_decisions=decisions,
        thresholds=result.policy.thresholds, floors=result.policy.config.floors, sources=[r.source for r in records],
        relpaths=[r.relpath for r in records], out_dir=result.out_dir / "evaluation" / "heldout", n_bootstrap=0,
        seed=config.seed, figures=False,
    )
    target = settings.loso.target_class
    in_dist = result.test_metrics
    return {
        "fold": name,
        "holdout": None if fold is None else fold.holdout,
        "note": "" if fold is None else fold.note,
        "tested_on": "standard test split" if fold is None else
                     "every image of the held-out source (all splits)" + (
                         " + same-age normals from the other sources' test split"
                         if not any(r.label == reference for r in records if r.source == fold.holdout) else ""),
        "trained_on": {s: describe(loaded[s].records)["source_label"] for s in ("train", "val")},
        # rows the model was fitted on after its config's sampling/augmentation (fixed-matrix families)
        "fitted_on": read_manifest(result.bundle_dir).provenance.training_info.get("fitted_rows"),
        "n_train_rows": int(len(loaded["train"].labels)),
        "heldout_counts": describe(records),
        "temperature": round(result.temperature, 4),
        "thresholds": {k: round(v, 4) for k, v in result.policy.thresholds.items()},
        "heldout": metrics,
        "in_distribution_test": {
            "macro_auc": in_dist.get("macro_auc"),
            f"{target}_policy_sensitivity": in_dist["per_class"]["policy"].get(target, {}).get("sensitivity"),
            f"{target}_policy_specificity": in_dist["per_class"]["policy"].get(target, {}).get("specificity"),
        },
        "bundle_dir": str(result.bundle_dir),
        "train_seconds": round(result.train_seconds, 1),
    }


def heldout_for_objective(folds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Fold results -> the mapping :func:`training.objective.worst_source_objective` reads."""
    result = {}
    for fold in folds:
        if fold["holdout"] is None:
            continue
        per_class = fold["heldout"]["classes"]
        result[fold["holdout"]] = {
            "sensitivity": {c: value(m["sensitivity"]) for c, m in per_class.items()},
            "specificity": {c: value(m["specificity"]) for c, m in per_class.items()},
            "auc": {c: m["auc"] for c, m in per_class.items()},
        }
    return result


def summarize(folds: list[dict[str, Any]], target: str, floors: dict[str, float]) -> dict[str, Any]:
    """Worst-source headline numbers of one mitigation."""
    heldout = [f for f in folds if f["holdout"] is not None]
    summary: dict[str, Any] = {}
    with_target = [f for f in heldout if f["heldout"]["counts"].get(target)]
    if with_target:
        sens = {f["holdout"]: value(f["heldout"]["classes"][target]["sensitivity"]) for f in with_target}
        spec = {f["holdout"]: value(f["heldout"]["classes"][target]["specificity"]) for f in with_target}
        same = {f["holdout"]: same_population_auc(f["heldout"], target) for f in with_target}
        worst = min(sens, key=lambda s: sens[s])
        summary.update({
            f"worst_source_{target}_sensitivity": sens[worst], "worst_source": worst,
            f"{target}_specificity_at_worst_source": spec[worst],
            f"worst_source_{target}_specificity": min(v for v in spec.values() if v is not None),
            f"worst_source_same_population_{target}_auc": min((v for v in same.values() if v is not None), default=None),
            f"mean_source_{target}_sensitivity": round(float(np.mean(list(sens.values()))), 4),
            f"per_source_{target}_sensitivity": sens, f"per_source_{target}_specificity": spec,
            f"per_source_same_population_{target}_auc": same,
        })
    if heldout:
        summary["objective"] = worst_source_objective(heldout_for_objective(heldout), floors)
    everything = next((f for f in folds if f["holdout"] is None), None)
    if everything is not None:
        test = everything["heldout"]
        summary["all_sources_test"] = {
            "macro_auc": test["macro_auc"],
            f"{target}_sensitivity": value(test["classes"][target]["sensitivity"]),
            f"{target}_specificity": value(test["classes"][target]["specificity"]),
            f"same_population_{target}_auc": same_population_auc(test, target),
            "bundle_dir": everything["bundle_dir"],
        }
    return summary


def choose_winner(results: dict[str, dict[str, Any]], mitigations: dict[str, MitigationSpec]) -> dict[str, Any]:
    """Best mitigation by the worst-source objective, overall and among those deployable by config.

    ``mitigation`` is the best deployable one (what ``--from-loso`` audits and what can become the
    default); ``best_overall`` may be experimental. ``reference`` is what "better" is measured
    against: ``unmitigated`` when the report has it (the family configs carry a mitigation since
    issue 9, so ``baseline`` is no longer the untreated model), else ``baseline``.
    ``beats_reference``: strictly higher objective.
    """
    scored = {name: r["summary"]["objective"]["objective"] for name, r in results.items()
              if "objective" in r.get("summary", {})}
    if not scored:
        return {}
    reference = "unmitigated" if "unmitigated" in scored else "baseline"
    baseline = scored.get(reference)
    deployable = {n: v for n, v in scored.items() if n not in mitigations or mitigations[n].deployable}
    best_overall = max(scored, key=lambda n: scored[n])
    best = max(deployable, key=lambda n: deployable[n]) if deployable else best_overall
    spec = mitigations.get(best, MitigationSpec())
    return {
        "by": "worst-source objective (training.objective.worst_source_objective)",
        "mitigation": best, "objective": scored[best], "reference": reference, "reference_objective": baseline,
        "beats_reference": baseline is not None and best != reference and scored[best] > baseline,
        "config_overrides": spec.overrides,
        "best_overall": best_overall, "best_overall_objective": scored[best_overall],
        "best_overall_deployable": best_overall not in mitigations or mitigations[best_overall].deployable,
        "ranking": sorted(scored, key=lambda n: -scored[n]),
    }


def run_loso(base: TrainConfig, data_dir: Path, settings: RobustnessConfig, mitigation_names: list[str],
             fold_names: list[str] | None, runs_dir: Path, on_fold: Callable[[dict], None] | None = None,
             recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every requested mitigation x fold; returns the report document.

    ``recipe`` (the family config file and its command-line overrides) goes into the report as is, so
    a reader sees when the folds were trained on a shorter schedule than the shipped model.
    """
    dataset = open_dataset(data_dir, base.exclusions)
    folds: list[FoldSpec | None] = ([None] if settings.loso.include_all_sources else []) + list(settings.loso.folds)
    if fold_names:
        # in the order asked for: the fold a person most needs (the product's own source) can go first
        folds = sorted((f for f in folds if fold_name(f) in fold_names), key=lambda f: fold_names.index(fold_name(f)))
        missing = set(fold_names) - {fold_name(f) for f in folds}
        if missing:
            raise ValueError(f"unknown folds {sorted(missing)}; configured: {[fold_name(f) for f in folds]}")
    sources = set(dataset.sources())
    folds = [f for f in folds if f is None or f.holdout in sources]
    document: dict[str, Any] = {
        "family": base.family, "data_dir": str(data_dir), "created_at": utc_now(), "git_commit": git_commit(),
        "recipe": recipe or {}, "schedule": {"epochs": getattr(base, "epochs", None),
                                             "samples_per_epoch": getattr(base, "samples_per_epoch", None)},
        "protocol": __doc__.split("\n\n")[2].replace("\n", " "),
        "age_rule": AGE_RULE,
        "folds": [fold_name(f) for f in folds],
        "target_class": settings.loso.target_class,
        "mitigations": {}, "winner": {},
    }
    floors = base.policy.floors
    for name in mitigation_names:
        spec = settings.mitigations[name]
        entry = {"description": spec.description, "overrides": spec.overrides,
                 "chest_crop": spec.chest_crop, "deployable": spec.deployable, "folds": []}
        document["mitigations"][name] = entry
        for fold in folds:
            started = time.perf_counter()
            log.info("loso: %s / %s / %s", base.family, name, fold_name(fold))
            entry["folds"].append(run_fold(base, name, spec, fold, dataset, data_dir, runs_dir, settings))
            entry["folds"][-1]["wall_seconds"] = round(time.perf_counter() - started, 1)
            entry["summary"] = summarize(entry["folds"], settings.loso.target_class, floors)
            if on_fold:
                on_fold(document)
    document["winner"] = choose_winner(document["mitigations"], settings.mitigations)
    return document


def resummarize(document: dict[str, Any], settings: RobustnessConfig, floors: dict[str, float]) -> dict[str, Any]:
    """Recompute summaries, objective and winner from the measured fold results (no training)."""
    for entry in document["mitigations"].values():
        entry["summary"] = summarize(entry["folds"], document["target_class"], floors)
    document["winner"] = choose_winner(document["mitigations"], settings.mitigations)
    document["summarized_at"] = utc_now()
    return document


def loso_heldout(config: TrainConfig, data_dir: Path, runs_dir: Path,
                 settings: RobustnessConfig | None = None) -> dict[str, dict[str, dict[str, float | None]]]:
    """One config's held-out-source metrics, for ``objective_mode: worst_source`` in the sweep.

    Runs every configured fold (not the all-sources run) for the config as given and returns the
    mapping :func:`training.objective.select_objective` takes as ``heldout``.
    """
    settings = settings or RobustnessConfig.from_yaml(DEFAULT_CONFIG_PATH)
    settings = settings.model_copy(update={"loso": settings.loso.model_copy(update={"include_all_sources": False})})
    document = run_loso(config, data_dir, settings, ["baseline"], None, runs_dir)
    return heldout_for_objective(document["mitigations"]["baseline"]["folds"])


# ----------------------------------------------------------------------------------------------
# report


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _rate(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] (n={entry['n']})" if ci else f"{entry['value']:.3f}"


def write_markdown(document: dict[str, Any], path: Path) -> None:
    target = document["target_class"]
    lines = [
        f"# Leave-one-source-out — {document['family']}",
        "",
        f"Generated by `python -m training.robustness.loso` ({document['created_at']}, commit "
        f"`{document['git_commit'][:10]}`) on `{document['data_dir']}`. Do not edit by hand.",
        "",
        f"Protocol: {document['protocol']}",
        "",
        *([f"Recipe: `{document['recipe'].get('config')}` with overrides "
           f"`{' '.join(document['recipe'].get('overrides') or []) or 'none'}`.", ""] if document.get("recipe") else []),
        f"Age groups: {document['age_rule']}",
        "",
        f"## Mitigations compared (worst held-out source; {target} at the policy thresholds)",
        "",
    ]
    compared = []
    for name, entry in document["mitigations"].items():
        s = entry.get("summary", {})
        a = s.get("all_sources_test", {})
        compared.append([
            f"{name}{'' if entry['deployable'] else ' (experimental)'}", _f(a.get('macro_auc')),
            f"{_f(a.get(f'{target}_sensitivity'))} / {_f(a.get(f'{target}_specificity'))}",
            _f(a.get(f'same_population_{target}_auc')),
            f"{_f(s.get(f'worst_source_{target}_sensitivity'))} ({s.get('worst_source', '–')})",
            _f(s.get(f'{target}_specificity_at_worst_source')), _f(s.get(f'worst_source_{target}_specificity')),
            _f(s.get(f'worst_source_same_population_{target}_auc')), _f((s.get('objective') or {}).get('objective'))])
    lines += markdown_table(
        ["mitigation", "all-sources test macro AUC", f"all-sources {target} sens / spec",
         f"all-sources same-pop {target} AUC", f"worst-source {target} sens (source)", f"{target} spec there",
         f"worst-source {target} spec", f"worst same-pop {target} AUC", "worst-source objective"], compared)
    winner = document.get("winner") or {}
    if winner:
        reference = winner.get("reference", "baseline")
        lines += ["", f"Ranking by the worst-source objective: {', '.join(winner['ranking'])}. Best deployable by "
                      f"config: **{winner['mitigation']}** ({_f(winner['objective'])} vs {reference} "
                      f"{_f(winner['reference_objective'])}; {'beats' if winner['beats_reference'] else 'does not beat'} "
                      f"the {reference})."]
        if winner["best_overall"] != winner["mitigation"]:
            lines[-1] += (f" Best overall: {winner['best_overall']} ({_f(winner['best_overall_objective'])}), "
                          "experimental (no PreprocessConfig field carries it into a bundle yet).")
        lines += ["", "The objective scores each held-out (source, disease) cell as Youden's J at the policy "
                      "minus the sensitivity shortfall below the floor, and takes the worst cell: it rewards "
                      "thresholds that still reach the floor on an unseen hospital, so read it beside the AUC "
                      "columns, which do not depend on the thresholds. Per held-out source:", ""]
        sources = [f for f in document["folds"] if f != ALL_SOURCES]
        lines += markdown_table(
            ["mitigation", *sources],
            [[name, *(_f((entry.get("summary", {}).get("objective") or {}).get(f"heldout_score_{s}")) for s in sources)]
             for name, entry in document["mitigations"].items()])
    lines += ["", "Descriptions:", ""]
    lines += [f"- **{name}**: {entry['description']} overrides `{json.dumps(entry['overrides'])}`"
              + (f", {entry['augment_copies']} materialized augmented copies" if entry.get("augment_copies") else "")
              + (f", chest crop {entry['chest_crop']}" if entry["chest_crop"] else "")
              for name, entry in document["mitigations"].items()]
    for name, entry in document["mitigations"].items():
        lines += ["", f"## {name}: per fold", ""]
        per_fold = []
        for fold in entry["folds"]:
            h = fold["heldout"]
            tb = h["classes"].get(target, {})
            pn = h["classes"].get("pneumonia", {})
            per_fold.append([
                fold["fold"], ", ".join(f"{k} {v}" for k, v in h["counts"].items() if v), _rate(tb.get("sensitivity")),
                _f(value(tb.get("specificity"))), _f(tb.get("auc")), _f(same_population_auc(h, target)),
                _f(value(pn.get("sensitivity"))), _f(pn.get("auc")), _f(_normal_kept(h, target)),
                f"{_f(fold['thresholds'].get(target))} / {_f(fold['thresholds'].get('pneumonia'))}",
                _f(fold["in_distribution_test"].get("macro_auc"))])
        lines += markdown_table(
            ["fold", "tested on", f"{target} sens [95% CI]", f"{target} spec", f"{target} AUC",
             f"same-pop {target} AUC", "pneumonia sens", "pneumonia AUC", "normal kept", "thresholds TB / pneu",
             "in-dist test macro AUC"], per_fold)
        not_run = [f for f in document.get("folds", []) if f not in {fold["fold"] for fold in entry["folds"]}]
        if not_run:  # a run stopped early: its summary covers only the folds above
            lines += ["", f"**Not run** (no result; the worst-source figures cover only the rows above): {', '.join(not_run)}"]
        notes = [f"- {fold['fold']}: {fold['note']}" for fold in entry["folds"] if fold.get("note")]
        if notes and name == next(iter(document["mitigations"])):
            lines += ["", *notes]
    lines += ["", "Specificity of a class: share of all held-out images of other classes not decided as it. "
                  "Same-pop AUC: the class against reference (normal) images of the same age group. "
                  "\"normal kept\": share of held-out normal images the policy leaves normal. Thresholds are "
                  "fitted on the validation split left without the held-out source. The JSON's `trained_on` "
                  "counts are the images that reached training; `fitted_on` (classical and probe families) the "
                  "rows fitted after source resampling and augmented copies; "
                  "each fold's `bundle_dir` is under the git-ignored runs/ folder.", ""]
    path.write_text("\n".join(lines))


def _normal_kept(metrics: dict, target: str) -> float | None:
    counts = metrics["counts"]
    if not counts.get("normal"):
        return None
    misses = []
    for entry in metrics["classes"].values():
        ref = entry.get("reference_specificity")
        if ref and ref.get("value") is not None:
            misses.append(1 - ref["value"])
    return round(1 - sum(misses), 4) if misses else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.robustness.loso", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/train/hog_logreg.yaml"), help="family config")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("reports/robustness"), help="report directory")
    parser.add_argument("--name", default="loso", help="report file stem (<out>/<name>.json, .md)")
    parser.add_argument("--robustness", type=Path, default=DEFAULT_CONFIG_PATH, help="robustness settings (YAML)")
    parser.add_argument("--mitigations", default="", help="comma list (default: every configured mitigation)")
    parser.add_argument("--folds", default="", help=f"comma list of held-out sources and/or {ALL_SOURCES}, run in this order (default: all)")
    parser.add_argument("--runs", type=Path, default=Path("runs/robustness/loso"), help="where the trained runs go")
    parser.add_argument("--resummarize", action="store_true",
                        help="recompute summaries, objective and winner of an existing <out>/<name>.json; no training")
    parser.add_argument("overrides", nargs="*", help="family config overrides, e.g. subset.train=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = RobustnessConfig.from_yaml(args.robustness)
    base = TrainConfig.from_yaml(args.config, parse_overrides(args.overrides))
    names = [n for n in args.mitigations.split(",") if n] or list(settings.mitigations)
    unknown = [n for n in names if n not in settings.mitigations]
    if unknown:
        parser.error(f"unknown mitigations {unknown}; configured: {list(settings.mitigations)}")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"

    def save(document: dict) -> None:
        json_path.write_text(json.dumps(document, indent=1, default=float) + "\n")
        write_markdown(document, md_path)

    if args.resummarize:
        document = resummarize(json.loads(json_path.read_text()), settings, base.policy.floors)
    else:
        document = run_loso(base, args.data_dir, settings, names, [f for f in args.folds.split(",") if f] or None,
                            args.runs, on_fold=save, recipe={"config": str(args.config), "overrides": args.overrides})
    save(document)
    for name, entry in document["mitigations"].items():
        s = entry.get("summary", {})
        target = document["target_class"]
        print(f"loso: {base.family} {name}: worst-source {target} sensitivity "
              f"{_f(s.get(f'worst_source_{target}_sensitivity'))} ({s.get('worst_source', '-')}), objective "
              f"{_f((s.get('objective') or {}).get('objective'))}")
    print(f"loso: report {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
