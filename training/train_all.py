"""``make train-all``: train every family on the full data and write the comparison table.

    python -m training.train_all [--plan configs/train-all.yaml] [--data-dir DIR] [--out reports/train-all]

Writes ``summary.json`` (one entry per family: family, val_macro_f1, test_auc {class},
test_policy {class: {sensitivity, specificity}}, ece_before, ece_after, train_seconds) and
``summary.md``. Generated, never hand-edited.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ConfigDict

from cxr_core.config import YamlConfig, parse_overrides
from training.config import TrainConfig
from training.data import default_data_dir
from training.train import TrainResult, run_training
from cxr_core.reporting import markdown_table

log = logging.getLogger("training.train_all")


def summary_entry(result: TrainResult) -> dict:
    test = result.test_metrics
    calibration = test["calibration"]
    return {
        "family": result.config.family,
        "val_macro_f1": round(float(result.val_metrics["macro"]["argmax"]["f1"]), 4),
        "test_auc": {c: v["auc"] for c, v in test["per_class"]["argmax"].items()},
        "test_macro_auc": test["macro_auc"],
        "test_policy": {
            c: {"sensitivity": test["per_class"]["policy"][c]["sensitivity"],
                "specificity": test["per_class"]["policy"][c]["specificity"]}
            for c in test["disease_classes"]
        },
        "thresholds": result.policy.thresholds,
        "same_population_auc": {c: v.get("auc") for c, v in test.get("same_population", {}).items()},
        "ece_before": calibration["ece_before"],
        "ece_after": calibration["ece_after"],
        "temperature": round(result.temperature, 4),
        "train_seconds": round(result.train_seconds, 1),
        "mlflow_run_id": result.mlflow_run_id,
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_markdown(entries: list[dict], path: Path, data_dir: Path) -> None:
    classes = list(entries[0]["test_auc"]) if entries else []
    diseases = list(entries[0]["test_policy"]) if entries else []
    header = (["family", "val macro-F1"] + [f"test AUC {c}" for c in classes]
              + [f"policy {d} sens / spec" for d in diseases]
              + [f"same-pop AUC {d}" for d in diseases] + ["ECE before / after", "train s"])
    lines = [
        "# Every family on the default data",
        "",
        f"Data: `{data_dir}`. Policy thresholds fitted on validation (floors: TB 0.90, pneumonia 0.85, "
        "safety margin 0.03); sensitivities/specificities below are on test. Same-population AUC: disease vs "
        "normal restricted to sources holding both (removes the age shortcut).",
        "",
    ]
    rows = []
    for e in entries:
        row = [e["family"], _fmt(e["val_macro_f1"])]
        row += [_fmt(e["test_auc"][c]) for c in classes]
        row += [f"{_fmt(e['test_policy'][d]['sensitivity'])} / {_fmt(e['test_policy'][d]['specificity'])}" for d in diseases]
        row += [_fmt(e["same_population_auc"].get(d)) for d in diseases]
        row += [f"{_fmt(e['ece_before'])} / {_fmt(e['ece_after'])}", f"{e['train_seconds']:.0f}"]
        rows.append(row)
    lines += markdown_table(header, rows)
    path.write_text("\n".join(lines) + "\n")


class TrainPlan(YamlConfig):
    """``configs/train-all.yaml``: the family configs to train, in order."""

    model_config = ConfigDict(extra="forbid")

    configs: list[Path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", type=Path, default=Path("configs/train-all.yaml"))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("reports/train-all"))
    parser.add_argument("--runs", type=Path, default=Path("runs/train-all"))
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the entries already in summary.json and train only the missing families")
    parser.add_argument("overrides", nargs="*", help="applied to every config, e.g. epochs=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plan = TrainPlan.from_yaml(args.plan).configs
    args.out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    if args.resume and (args.out / "summary.json").exists():
        entries = json.loads((args.out / "summary.json").read_text())
    done = {entry["family"] for entry in entries}
    for config_path in plan:
        config = TrainConfig.from_yaml(config_path, parse_overrides(args.overrides))
        if config.family in done:
            log.info("train-all: %s already in the summary, kept", config.family)
            continue
        log.info("train-all: %s", config.family)
        result = run_training(config, args.data_dir, args.runs, track=not args.no_mlflow,
                              extra_tags={"train_all": "true"})
        entries.append(summary_entry(result))
        (args.out / "summary.json").write_text(json.dumps(entries, indent=1) + "\n")  # progress survives a crash
        write_markdown(entries, args.out / "summary.md", args.data_dir)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
