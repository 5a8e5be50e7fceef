"""``make sweep``: Ray Tune over model families -> MLflow leaderboard -> registered champion.

    python -m training.sweep [--budget small|full] [--data-dir DIR] [--storage-path PATH] [key=value ...]

Every trial is a full training run (:func:`training.train.run_training`) tracked as an MLflow
run under one experiment and a parent sweep run, so the MLflow UI is the leaderboard. ASHA stops
neural trials whose validation macro-F1 lags at its rungs. The winner, by the clinical objective
(:mod:`training.objective`), already carries its test evaluation, temperature and policy
thresholds; it gets its drift reference profile and is registered as a new version of
``cxr-screen`` with alias ``champion`` (the old champion becomes ``previous``).

Locally Ray starts with ``num_cpus=2`` and no dashboard; with ``RAY_ADDRESS`` set the same code
runs on an existing cluster (KubeRay) and ``--storage-path`` should be shared storage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cxr_core.config import YamlConfig, deep_merge, parse_overrides
from training.config import TrainConfig
from training.data import default_data_dir
from training.objective import DEFAULT_OBJECTIVE_MODE, OBJECTIVE_MODES, ObjectiveMode
from training.provenance import git_commit
from training.tracking import tracking_uri
from cxr_core.reporting import markdown_table

log = logging.getLogger("training.sweep")
REPO_ROOT = Path(__file__).resolve().parents[1]


class FamilySpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    grid: dict[str, list[Any]] = {}
    overrides: dict[str, Any] = {}


class AshaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period: int = 2
    max_t: int = 12
    reduction_factor: int = 2


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    families: list[FamilySpace]
    overrides: dict[str, Any] = {}
    max_concurrent_trials: int = Field(1, ge=1)
    threads_per_trial: int = Field(2, ge=1)
    asha: AshaConfig = AshaConfig()
    objective_mode: ObjectiveMode = Field(DEFAULT_OBJECTIVE_MODE, description=(
        "validation: clinical objective on the validation split; worst_source: each trial also runs "
        "leave-one-source-out (training.robustness.loso, ~4 extra trainings) and is judged by its "
        "worst held-out source"))


class SweepConfig(YamlConfig):
    model_config = ConfigDict(extra="forbid")

    budgets: dict[str, BudgetConfig]


def expand_trials(budget: BudgetConfig, cli_overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """One trial spec per grid point: base config path + merged overrides (validated early)."""
    trials = []
    for family in budget.families:
        keys = list(family.grid)
        for values in itertools.product(*(family.grid[k] for k in keys)) if keys else [()]:
            point = parse_overrides([f"{k}={json.dumps(v)}" for k, v in zip(keys, values)])
            overrides = deep_merge(deep_merge(deep_merge(budget.overrides, family.overrides), point), cli_overrides)
            overrides["num_threads"] = budget.threads_per_trial
            base = str((REPO_ROOT / family.base).resolve())
            config = TrainConfig.from_yaml(base, overrides)  # fail before Ray starts
            label = ",".join(f"{k}={v}" for k, v in zip(keys, values))
            trials.append({"base": base, "overrides": overrides, "family": config.family,
                           "params": dict(zip(keys, values)), "label": f"{config.family}[{label}]"})
    return trials


def run_trial(spec: dict[str, Any]) -> None:
    """Ray Tune function trainable: one full training run, reporting to Tune and MLflow."""
    import mlflow
    from ray import tune

    from training.train import run_training

    config = TrainConfig.from_yaml(spec["trial"]["base"], spec["trial"]["overrides"])
    config = config.model_copy(update={"run_name": spec["trial"]["label"], "experiment": spec["experiment"]})

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch + 1 >= config.epochs:
            # The final report follows with the same number: an ASHA cut at the last epoch would
            # save nothing and throw away a trained, evaluated model.
            return
        run = mlflow.active_run()
        tune.report({"val_macro_f1": metrics["val_macro_f1"], "epoch": epoch + 1,
                     "mlflow_run_id": run.info.run_id if run else None, "final": False})

    result = run_training(config, Path(spec["data_dir"]), Path(spec["out_root"]), track=True,
                          parent_run_id=spec["parent_run_id"], extra_tags={"sweep": spec["sweep_name"]},
                          on_epoch=on_epoch if config.mode in ("scratch", "finetune") else None)
    objective = trial_objective(spec["objective_mode"], config, result, Path(spec["data_dir"]),
                                Path(spec["out_root"]) / "loso" / spec["trial"]["label"])
    mlflow.MlflowClient(tracking_uri()).log_batch(
        result.mlflow_run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                       for k, v in objective.items()])
    tune.report({**objective, "val_macro_f1": float(result.val_metrics["macro"]["argmax"]["f1"]),
                 "test_macro_auc": float(result.test_metrics.get("macro_auc") or 0.0),
                 "bundle_dir": str(result.bundle_dir), "mlflow_run_id": result.mlflow_run_id,
                 "train_seconds": result.train_seconds, "final": True})


def trial_objective(mode: str, config: TrainConfig, result, data_dir: Path, loso_dir: Path) -> dict[str, float]:
    """The number the sweep ranks a finished trial by (:func:`training.objective.select_objective`).

    ``worst_source`` retrains the trial's config once per configured held-out source; the
    validation objective, macro AUC and missed floors are kept beside it (``validation_objective``,
    ``val_macro_auc``, ``floors_missed``) for the leaderboard.
    """
    from training.objective import clinical_objective, select_objective

    validation = clinical_objective(result.policy, result.val_metrics.get("macro_auc"))
    if mode == "validation":
        return validation
    from training.robustness.loso import loso_heldout

    heldout = loso_heldout(config, data_dir, loso_dir)
    objective = select_objective(mode, result.policy, result.val_metrics.get("macro_auc"), heldout)
    return {**objective, "val_macro_auc": validation["val_macro_auc"], "validation_objective": validation["objective"],
            "floors_missed": validation["floors_missed"]}


def run_sweep(budget_name: str, data_dir: Path, storage_path: Path, sweep_config: Path,
              cli_overrides: dict[str, Any] | None = None, experiment: str = "cxr-screen",
              register: bool = True, report_dir: Path | None = None,
              objective_mode: str | None = None, promote: bool = True) -> dict[str, Any]:
    """Run the sweep, pick the winner, register it; returns the leaderboard document.

    ``objective_mode`` (default: the budget's) overrides how trials are ranked. ``promote=False``
    registers the winner as a challenger and leaves ``champion`` where it is (the retrain loop
    promotes after its own checks).
    """
    import mlflow
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from training.tracking import mlflow_run

    budget = SweepConfig.from_yaml(sweep_config).budgets[budget_name]
    trials = expand_trials(budget, cli_overrides or {})
    mode = objective_mode or budget.objective_mode
    if mode not in OBJECTIVE_MODES:
        raise ValueError(f"unknown objective_mode {mode!r}; use one of {', '.join(OBJECTIVE_MODES)}")
    data_dir, storage_path = data_dir.resolve(), storage_path.resolve()
    sweep_name = f"sweep-{budget_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cache_dir = os.environ.get("CXR_CACHE_DIR", str(REPO_ROOT / ".cache"))
    env = {"MLFLOW_TRACKING_URI": tracking_uri(), "RAY_CHDIR_TO_TRIAL_DIR": "0",
           "CXR_CACHE_DIR": str(Path(cache_dir).resolve())}
    os.environ.update(env)
    started = time.perf_counter()
    with mlflow_run(experiment, sweep_name, {"sweep": sweep_name, "budget": budget_name,
                                             "git_commit": git_commit()}) as parent:
        mlflow.log_params({"budget": budget_name, "trials": len(trials), "data_dir": str(data_dir), "objective_mode": mode,
                           "ray_address": os.environ.get("RAY_ADDRESS", "local")})
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(runtime_env={"env_vars": env})
            else:
                ray.init(num_cpus=os.cpu_count() and min(os.cpu_count(), 2) or 2, include_dashboard=False,
                         runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
        trainable = tune.with_resources(run_trial, {"cpu": budget.threads_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials), "data_dir": str(data_dir),
                         "out_root": str(storage_path / "runs"), "parent_run_id": parent.info.run_id,
                         "sweep_name": sweep_name, "experiment": experiment, "objective_mode": mode},
            tune_config=tune.TuneConfig(
                scheduler=ASHAScheduler(metric="val_macro_f1", mode="max", time_attr="training_iteration",
                                        grace_period=budget.asha.grace_period, max_t=budget.asha.max_t,
                                        reduction_factor=budget.asha.reduction_factor),
                max_concurrent_trials=budget.max_concurrent_trials,
                trial_dirname_creator=lambda trial: f"{trial.trial_id}-{trial.config['trial']['family']}",
                trial_name_creator=lambda trial: f"{trial.config['trial']['label']}",
            ),
            run_config=tune.RunConfig(name=sweep_name, storage_path=str(storage_path / "ray"), verbose=1),
        )
        grid = tuner.fit()
        rows = leaderboard_rows(grid)
        wall = time.perf_counter() - started
        finished = [r for r in rows if r["status"] == "completed"]
        if not finished:
            raise RuntimeError(f"no trial of {sweep_name} finished; see {storage_path / 'ray' / sweep_name}")
        winner = max(finished, key=lambda r: (r["objective"], r["val_macro_auc"]))
        mlflow.log_metrics({"best_objective": winner["objective"], "wall_seconds": wall})
        mlflow.set_tags({"winner_family": winner["family"], "winner_run_id": winner["mlflow_run_id"]})
        document = {"sweep": sweep_name, "budget": budget_name, "data_dir": str(data_dir),
                    "wall_seconds": round(wall, 1), "trials": rows, "winner": winner,
                    "mlflow_parent_run_id": parent.info.run_id, "objective_mode": mode,
                    "objective": OBJECTIVE_DOCS[mode]}
        document["winner_test"] = winner_test_summary(Path(winner["bundle_dir"]))
    if register:
        document["registered_version"] = register_winner(document, data_dir, promote=promote)
    if report_dir is not None:
        write_leaderboard(document, report_dir)
    return document


def register_winner(document: dict[str, Any], data_dir: Path, promote: bool = True) -> str:
    """Registration, its own step after the sweep has ended: reference profile, pyfunc model, new champion
    (or, with ``promote=False``, a challenger that ``training.registry promote`` makes champion later).

    The winner's bundle gets its drift reference profile, is logged to the finished sweep's parent
    run as the pyfunc model and registered as a new version of ``cxr-screen`` with alias ``champion``.
    """
    from training.registry import register_bundle

    winner = document["winner"]
    bundle_dir = Path(winner["bundle_dir"])
    _attach_reference_profile(bundle_dir, Path(data_dir).resolve())
    version = register_bundle(bundle_dir, document["mlflow_parent_run_id"],
                              registry_tags(winner, document["sweep"], bundle_dir), promote=promote)
    log.info("registered cxr-screen version %s (%s) as %s", version, winner["family"],
             "champion" if promote else "challenger")
    return version


OBJECTIVE_DOCS = {
    "validation": ("weighted validation specificity of the disease classes at their policy thresholds "
                   "(priority weights 1, 1/2, ...), minus 1 per sensitivity floor missed, + 0.001 x macro AUC"),
    "worst_source": ("worst held-out source under leave-one-source-out: per disease class Youden's J at the "
                     "policy thresholds minus the sensitivity shortfall below its floor, worst class, worst "
                     "source; + 0.001 x that source's mean AUC"),
}


def leaderboard_rows(grid) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        spec = (result.config or {}).get("trial", {})
        final = bool(metrics.get("final"))
        rows.append({
            "family": spec.get("family"),
            "params": spec.get("params"),
            "status": "completed" if final else ("error" if result.error else "stopped_by_asha"),
            "objective": metrics.get("objective") if final else None,
            "val_macro_auc": metrics.get("val_macro_auc") if final else None,
            "val_macro_f1": metrics.get("val_macro_f1"),
            "test_macro_auc": metrics.get("test_macro_auc") if final else None,
            "floors_missed": metrics.get("floors_missed"),
            "train_seconds": metrics.get("train_seconds"),
            "bundle_dir": metrics.get("bundle_dir"),
            "mlflow_run_id": metrics.get("mlflow_run_id"),
            "error": str(result.error)[:300] if result.error else None,
        })
    return sorted(rows, key=lambda r: (r["objective"] is None, -(r["objective"] or 0)))


def winner_test_summary(bundle_dir: Path) -> dict[str, Any]:
    """The winner's test evaluation, per source and same-population (written next to its bundle).

    The sweep ranks on validation; these are the numbers a reader needs before trusting the
    winner: a model that learned the hospital looks good overall and bad within a population.
    """
    path = bundle_dir.parent / "evaluation" / "test" / "metrics.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text())
    policy = metrics.get("per_class", {}).get("policy", {})
    return {
        "macro_auc": metrics.get("macro_auc"),
        "policy": {c: {"sensitivity": v.get("sensitivity"), "specificity": v.get("specificity")} for c, v in policy.items()},
        "per_source": {source: {"n": m["n"], "counts": m["counts"], "accuracy_policy": m["accuracy_policy"],
                                "policy": m["policy"], "auc": m["auc"]}
                       for source, m in metrics.get("per_source", {}).items()},
        "same_population": {c: {k: m.get(k) for k in ("sources", "n_disease", "n_reference", "auc",
                                                      "policy_sensitivity", "policy_specificity")}
                            for c, m in metrics.get("same_population", {}).items()},
    }


def best_per_family(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best completed trial of each family, best first (the leaderboard's headline)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] == "completed" and (row["family"] not in best or row["objective"] > best[row["family"]]["objective"]):
            best[row["family"]] = row
    return sorted(best.values(), key=lambda r: -r["objective"])


def registry_tags(winner: dict[str, Any], sweep_name: str, bundle_dir: Path) -> dict[str, str]:
    from cxr_core.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    test = manifest.metrics.get("test", {})
    tags = {
        "family": winner["family"], "objective": f"{winner['objective']:.4f}",
        "val_macro_auc": f"{winner['val_macro_auc']:.4f}", "test_macro_auc": f"{winner['test_macro_auc']:.4f}",
        "sweep": sweep_name, "trial_run_id": winner["mlflow_run_id"] or "",
        "git_commit": manifest.provenance.git_commit, "data_manifest_sha256": manifest.provenance.data_manifest_sha256 or "",
        "temperature": f"{manifest.temperature:.4f}",
        "thresholds": json.dumps({k: round(v, 4) for k, v in manifest.policy.thresholds.items()}),
    }
    for name, values in test.get("policy", {}).items():
        for metric, value in values.items():
            if value is not None:
                tags[f"test_policy_{metric}_{name}"] = f"{value:.4f}"
    return tags


def _attach_reference_profile(bundle_dir: Path, data_dir: Path) -> None:
    """Store the drift reference (validation + test features) in the bundle before registering."""
    try:
        from cxr_core.reference import write_reference_profile
    except ImportError:  # monitoring not installed in this build
        log.warning("cxr_core.reference missing: bundle registered without a drift reference profile")
        return
    write_reference_profile(bundle_dir, data_dir)


def write_leaderboard(document: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    lines = [
        f"# Sweep leaderboard ({document['budget']})",
        "",
        f"Sweep `{document['sweep']}` on `{document['data_dir']}`; wall time {document['wall_seconds']:.0f} s; "
        f"winner **{document['winner']['family']}** (registered version {document.get('registered_version', 'n/a')}).",
        "",
        f"Objective (`{document.get('objective_mode', 'validation')}`): {document['objective']}.",
        "",
    ]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines += markdown_table(
        ["rank", "family", "params", "status", "objective", "val macro AUC", "val macro-F1", "test macro AUC", "train s"],
        [[rank, row["family"], json.dumps(row["params"]), row["status"], fmt(row["objective"]),
          fmt(row["val_macro_auc"]), fmt(row["val_macro_f1"]), fmt(row["test_macro_auc"]), fmt(row["train_seconds"])]
         for rank, row in enumerate(document["trials"], 1)])
    lines += ["", "## Best trial per family", ""]
    lines += markdown_table(["family", "best params", "objective", "val macro AUC", "test macro AUC"],
                            [[r["family"], json.dumps(r["params"]), fmt(r["objective"]), fmt(r["val_macro_auc"]),
                              fmt(r["test_macro_auc"])] for r in best_per_family(document["trials"])])
    test = document.get("winner_test") or {}
    if test:
        lines += ["", f"## Winner on the test split ({document['winner']['family']})", "",
                  "At the policy thresholds fitted on validation. Per source, because in this data the source "
                  "(hospital, age group, resolution) predicts the label.", "",
                  f"All sources: macro AUC {fmt(test.get('macro_auc'))}; "
                  + "; ".join(f"{c} sensitivity {fmt(m['sensitivity'])} / specificity {fmt(m['specificity'])}"
                              for c, m in test.get("policy", {}).items() if c != "normal") + ".", "",
                  ]
        rows = []
        for source, m in test["per_source"].items():
            counts, pol, auc = m["counts"], m["policy"], m["auc"]
            sens_spec = lambda c: f"{fmt(pol.get(c, {}).get('sensitivity') if counts.get(c) else None)} / {fmt(pol.get(c, {}).get('specificity'))}"  # noqa: E731
            rows.append([source, f"{m['n']} ({counts.get('normal', 0)} / {counts.get('pneumonia', 0)} / "
                         f"{counts.get('tuberculosis', 0)})", fmt(m["accuracy_policy"]), sens_spec("tuberculosis"),
                         sens_spec("pneumonia"), fmt(auc.get("tuberculosis")), fmt(auc.get("pneumonia"))])
        lines += markdown_table(["source", "n (normal / pneumonia / TB)", "policy accuracy", "TB sens / spec",
                                 "pneumonia sens / spec", "AUC TB", "AUC pneumonia"], rows)
        for name, m in test["same_population"].items():
            lines.append(f"\nSame-population {name} vs normal (sources {', '.join(m['sources'] or [])}; "
                         f"{m['n_disease']} vs {m['n_reference']}): AUC {fmt(m['auc'])}, policy sensitivity "
                         f"{fmt(m['policy_sensitivity'])}, specificity {fmt(m['policy_specificity'])}.")
    (out / "leaderboard.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default=os.environ.get("SWEEP_BUDGET", "small"))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--storage-path", type=Path, default=Path(os.environ.get("SWEEP_STORAGE", "runs/sweep")))
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "sweep.yaml")
    parser.add_argument("--report-dir", type=Path, default=Path("reports/sweep"))
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--no-promote", action="store_true",
                        help="register the winner as a challenger; champion stays (training.registry promote)")
    parser.add_argument("--rerender", action="store_true",
                        help="rewrite leaderboard.md (and the winner's test summary) from <report-dir>/leaderboard.json; no training")
    parser.add_argument("--objective-mode", choices=OBJECTIVE_MODES, default=os.environ.get("SWEEP_OBJECTIVE") or None,
                        help="rank trials on validation (default) or by the worst held-out source (slow)")
    parser.add_argument("overrides", nargs="*", help="applied to every trial, e.g. subset.train=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.rerender:
        document = json.loads((args.report_dir / "leaderboard.json").read_text())
        document["winner_test"] = document.get("winner_test") or winner_test_summary(Path(document["winner"]["bundle_dir"]))
        write_leaderboard(document, args.report_dir)
        print((args.report_dir / "leaderboard.md").read_text())
        return 0
    document = run_sweep(args.budget, args.data_dir, args.storage_path, args.config, parse_overrides(args.overrides),
                         register=not args.no_register, report_dir=args.report_dir,
                         objective_mode=args.objective_mode, promote=not args.no_promote)
    print(Path(args.report_dir / "leaderboard.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
