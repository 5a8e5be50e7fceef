"""The MLOps loop, closed, on real components: served traffic -> drift -> retrain -> promote -> served.

    python -m monitoring.loop_demo [--data-dir DIR] [--work runs/loop] [--out reports/loop/loop.json]

Every step runs the project's own command or function, against real servers started here (a private
MLflow unless ``MLFLOW_TRACKING_URI`` is set, TorchServe with the KServe front, Ray in the sweep, Evidently
in the drift job), on a small copy of the data (64 px HOG + logistic regression, so a person watches it in
a few minutes on 2 cores):

1. champion: a bundle trained and registered in MLflow (``register_bundle``) with its drift reference profile;
2. serve ``models:/cxr-screen@champion`` (``serving.mar`` + TorchServe + KServe front); real test images
   go through v1 and v2;
3. radiologist labels through ``python -m monitoring.feedback add``;
4. the drift job (``monitoring.drift``) reads the audit log serving wrote: ``ok``;
5. a darkened stream (``monitoring.shifts.darken``): ``retrain``, with the reason;
6. the trigger (``monitoring.trigger``, local) runs a small sweep that registers a challenger;
7. ``training.registry.promote_version`` moves ``champion``;
8. ``serving.rollout`` swaps the new version into the RUNNING TorchServe; the next answer names it;
9. ``training.registry.rollback`` + the same rollout serve the old version again.

``run_loop`` returns the numbers of every step (``tests/test_loop.py`` asserts them);
``make loop-demo`` prints them and writes ``reports/loop/loop.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "pneumonia", "tuberculosis")
# Images per class: train/val build the models, test is the served stream (and, with val, the reference).
SUBSET = {"train": 20, "val": 20, "test": 40}
FAST = {"preprocess": {"image_size": 64}, "n_bootstrap": 20, "figures": False, "exclusions": None}
CALLER = "loop-demo"
# Radiologist labels attached: fewer than min_labelled (30, configs/drift.yaml), so ECE is reported as not
# measured rather than decided on. A 60-image HOG model's ECE on ~40 labels is ~0.18 (measured): noise and
# the tiny model, not drift; the drift job's ECE path has its own tests (tests/test_drift.py).
LABELLED = 20


def copy_subset(data_dir: Path, target: Path, per_class: dict[str, int] = SUBSET) -> Path:
    """The first N images of each split/class (a real, small dataset; outside the repository)."""
    for split, count in per_class.items():
        for label in CLASSES:
            destination = target / split / label
            destination.mkdir(parents=True, exist_ok=True)
            for path in sorted((data_dir / split / label).glob("*.jpg"))[:count]:
                shutil.copy(path, destination / path.name)
    shutil.copy(data_dir / "manifest.csv", target / "manifest.csv")
    return target


def sweep_config(path: Path) -> Path:
    """A one-trial ``small`` budget (HOG + logistic regression, another C) for the retrain sweep."""
    budget = {"overrides": FAST, "max_concurrent_trials": 1, "threads_per_trial": 1,
              "families": [{"base": "configs/train/hog_logreg.yaml", "grid": {"classical.c": [0.2]}}]}
    path.write_text(yaml.safe_dump({"budgets": {"small": budget}}))
    return path


class Served:
    """The running stack: TorchServe + front, and the requests the loop sends through it."""

    def __init__(self, torchserve, front, front_url: str, api_key: str, audit_log: Path):
        import httpx

        self.torchserve, self.front, self.front_url = torchserve, front, front_url
        self.api_key, self.audit_log = api_key, audit_log
        self.http = httpx.Client(timeout=120)
        self.last_payload: dict[str, Any] = {}

    def predict(self, image: bytes, protocol: str, request_id: str):
        """One image through the front over v1 or v2; the parsed answer."""
        from serving.client import read_answers, v1_request, v2_request
        from serving.schemas import MODEL_NAME

        path, body = ((f"/v1/models/{MODEL_NAME}:predict", v1_request([image])) if protocol == "v1"
                      else (f"/v2/models/{MODEL_NAME}/infer", v2_request([image])))
        response = self.http.post(f"{self.front_url}{path}", json=body,
                                  headers={"X-API-Key": self.api_key, "X-Request-Id": request_id})
        if response.status_code != 200:
            raise RuntimeError(f"{protocol} {request_id}: {response.status_code} {response.text[:300]}")
        payload = response.json()
        (answer,) = read_answers(protocol, payload)
        self.last_payload = payload
        return answer

    def stream(self, items: list[tuple[bytes, str]], prefix: str) -> dict[str, Any]:
        """Send every image, alternating v1 and v2; returns request ids, versions and protocols seen."""
        ids, versions, protocols = [], {}, {"v1": 0, "v2": 0}
        for k, (image, _) in enumerate(items):
            protocol = "v1" if k % 2 == 0 else "v2"
            request_id = f"{prefix}-{k:04d}-{uuid.uuid4().hex[:8]}"
            answer = self.predict(image, protocol, request_id)
            ids.append(request_id)
            versions[answer.model_version] = versions.get(answer.model_version, 0) + 1
            protocols[protocol] += 1
        return {"request_ids": ids, "versions": versions, "protocols": protocols, "n": len(ids)}

    def served_version(self, image: bytes) -> dict[str, str]:
        """The version the next v1 and v2 answers name, and TorchServe's default version."""
        v1 = self.predict(image, "v1", f"probe-{uuid.uuid4().hex[:12]}").model_version
        v2 = self.predict(image, "v2", f"probe-{uuid.uuid4().hex[:12]}").model_version
        default = str(self.torchserve.describe()["modelVersion"])
        return {"v1": v1, "v2": v2, "v2_envelope": str(self.last_payload.get("model_version")),
                "torchserve_default": default}

    def close(self) -> None:
        from serving.torchserve_process import stop_process_group

        self.http.close()
        if self.front is not None:
            stop_process_group(self.front.pid)
        self.torchserve.stop()


def start_serving(model_uri: str, work: Path) -> Served:
    """``serving.mar`` from the registry, TorchServe (token auth) and the KServe front on free ports."""
    from serving.config import PackageConfig, ServingConfig
    from serving.mar import build_package, fetch_registered_bundle
    from serving.stack import start_front
    from serving.torchserve_process import TorchServe, free_port

    bundle_dir, version = fetch_registered_bundle(model_uri, work / "served-bundle")
    package = build_package(bundle_dir, work / "model-package", version,
                            PackageConfig(workers=1, batch_size=1, max_batch_delay_ms=20))
    audit_log = work / "audit.jsonl"
    api_key = uuid.uuid4().hex
    keys_file = work / "api_keys.json"
    keys_file.write_text(json.dumps({CALLER: api_key}))
    torchserve = TorchServe(package.root, work / "state", audit_log=audit_log, torch_threads=1)
    torchserve.start()
    try:
        port = free_port()
        front = start_front(torchserve, port, work / "state", keys_file, ServingConfig(), audit_log)
    except BaseException:
        torchserve.stop()
        raise
    return Served(torchserve, front, f"http://127.0.0.1:{port}", api_key, audit_log)


def drift_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    """The parts of a drift summary the loop reports: decision, reasons, key PSI values, ECE."""
    key = summary.get("key_features") or []
    return {"decision": summary["decision"], "reasons": summary.get("reasons", []),
            "psi": {name: round(float(summary["psi"][name]), 4) for name in key if name in summary["psi"]},
            "max_key_psi": round(max(float(summary["psi"][n]) for n in key if n in summary["psi"]), 4),
            "psi_threshold": summary["thresholds"]["psi"], "rows": summary["current"]["window"].get("rows"),
            "labelled": summary["current"]["window"].get("labelled"),
            "ece_current": summary.get("ece", {}).get("current")}


def run_loop(data_dir: Path, work: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the nine steps (module docstring); returns their numbers. Needs ``MLFLOW_TRACKING_URI``."""
    from monitoring import feedback
    from monitoring.config import TriggerConfig, load_config
    from monitoring.drift import run_drift
    from monitoring.features import WindowSpec
    from monitoring.shifts import darken
    from monitoring.trigger import trigger_retrain
    from serving.rollout import rollout
    from training import registry
    from training.config import TrainConfig
    from training.train import run_training
    from cxr_core.audit import read_audit_records
    from cxr_core.reference import write_reference_profile

    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, Any] = {}
    subset = copy_subset(data_dir, work / "data")
    uri = f"models:/{registry.REGISTERED_MODEL}@{registry.CHAMPION}"

    # 1. the champion, registered with its reference profile
    config = TrainConfig.from_yaml(REPO_ROOT / "configs" / "train" / "hog_logreg.yaml",
                                   {**FAST, "run_name": "loop-champion", "experiment": "cxr-loop"})
    result = run_training(config, subset, work / "runs", track=True)
    profile = write_reference_profile(result.bundle_dir, subset)
    champion = registry.register_bundle(result.bundle_dir, result.mlflow_run_id,
                                        {"family": config.family, "loop": "initial champion"}, promote=True)
    steps["1_champion"] = {"version": champion, "family": config.family, "reference_rows": profile["n"],
                           "aliases": {"champion": registry.alias_version(registry.CHAMPION)}}
    say(f"1. champion: cxr-screen version {champion} ({config.family}), reference profile {profile['n']} rows")

    served = start_serving(uri, work / "serving")
    try:
        test_items = [(path.read_bytes(), label) for label in CLASSES
                      for path in sorted((subset / "test" / label).glob("*.jpg"))]
        order = sorted(range(len(test_items)), key=lambda k: (k * 7919) % len(test_items))  # classes mixed
        test_items = [test_items[k] for k in order]
        probe = test_items[0][0]

        # 2. real test images through v1 and v2
        same = served.stream(test_items, "same")
        steps["2_served"] = {k: same[k] for k in ("n", "versions", "protocols")}
        say(f"2. served {same['n']} test images ({same['protocols']}) -> answers name version(s) {same['versions']}")

        # 3. radiologist labels through the feedback command
        db = work / "feedback.db"
        for request_id, (_, label) in list(zip(same["request_ids"], test_items))[:LABELLED]:
            code = feedback.main(["--db", str(db), "add", "--request-id", request_id, "--label", label,
                                  "--reviewer", "dr.loop", "--audit-log", str(served.audit_log)])
            if code != 0:
                raise RuntimeError(f"feedback add {request_id} exited {code}")
        labels = feedback.FeedbackStore(db).labels()
        steps["3_feedback"] = {"labels": int(len(labels))}
        say(f"3. feedback: {len(labels)} confirmed labels attached to served request ids")

        # 4. the drift job on the audit log serving wrote: ok
        drift_config = load_config()
        reference_uri = f"models:/{registry.REGISTERED_MODEL}/{champion}"
        ok = run_drift(served.audit_log, reference_uri, work / "drift" / "same", config=drift_config,
                       window=WindowSpec(last_n=same["n"]), feedback_db=db, model_version=champion)
        steps["4_drift_same"] = drift_numbers(ok)
        say(f"4. drift on the served stream: {ok['decision']} (max key PSI {steps['4_drift_same']['max_key_psi']}, "
            f"threshold {drift_config.thresholds.psi}; {steps['4_drift_same']['labelled']} labelled, ECE decides from "
            f"{drift_config.thresholds.min_labelled})")

        # 5. a darkened stream: retrain, with the reason
        shifted = served.stream([(darken(image), label) for image, label in test_items], "dark")
        steps["5_served_shifted"] = {k: shifted[k] for k in ("n", "versions", "protocols")}
        drifted = run_drift(served.audit_log, reference_uri, work / "drift" / "dark", config=drift_config,
                            window=WindowSpec(last_n=shifted["n"]), feedback_db=db, model_version=champion)
        steps["5_drift_shifted"] = drift_numbers(drifted)
        say(f"5. drift on {shifted['n']} darkened images: {drifted['decision']}: " + "; ".join(drifted["reasons"][:3]))

        # 6. the trigger runs a small sweep that registers a challenger
        trigger = TriggerConfig(budget="small", data_dir=str(subset), sweep_args=[
            "--config", str(sweep_config(work / "sweep.yaml")), "--storage-path", str(work / "sweep"),
            "--report-dir", str(work / "sweep-report"), "--no-promote"])
        retrain = trigger_retrain(drifted, target="local", config=trigger, log_dir=work / "drift" / "dark")
        if not retrain.get("ok"):
            log_tail = Path(retrain["log"]).read_text()[-3000:] if retrain.get("log") else ""
            raise RuntimeError(f"the retrain sweep failed: {retrain}\n{log_tail}")
        board = json.loads((work / "sweep-report" / "leaderboard.json").read_text())
        challenger = str(board["registered_version"])
        steps["6_retrain"] = {"ok": retrain["ok"], "seconds": retrain["seconds"], "challenger": challenger,
                              "winner_family": board["winner"]["family"], "trials": len(board["trials"]),
                              "champion_after_sweep": registry.alias_version(registry.CHAMPION)}
        say(f"6. trigger: sweep ran in {retrain['seconds']} s, registered challenger version {challenger}; "
            f"champion still {steps['6_retrain']['champion_after_sweep']}")

        # 7. promotion moves champion
        promoted = registry.promote_version(challenger)
        steps["7_promote"] = promoted
        say(f"7. promote: champion -> {promoted['champion']}, previous -> {promoted['previous']}")

        # 8. the running server picks it up through the management API
        management = {"management_url": served.torchserve.management_url, "key_file": served.torchserve.key_file,
                      "model_store": served.torchserve.package / "model-store"}
        served_before = served.served_version(probe)  # after the drift windows: probes are not traffic
        before = served.torchserve.worker_pids()
        swapped = rollout(uri, **management)
        steps["8_rollout"] = {"served_before": served_before,
                              "served_after": served.served_version(probe),
                              "registered": swapped.registered, "unregistered": swapped.unregistered,
                              "previous_default": swapped.previous_default, "seconds": swapped.seconds,
                              "torchserve_pid": served.torchserve.process.pid,
                              "torchserve_running": served.torchserve.process.poll() is None,
                              "worker_pids_before": before, "worker_pids_after": served.torchserve.worker_pids()}
        say(f"8. rollout ({swapped.seconds} s, no restart: TorchServe pid {served.torchserve.process.pid}): "
            f"served {served_before} -> {steps['8_rollout']['served_after']}")

        # 9. rollback
        rolled = registry.rollback()
        back = rollout(uri, **management)
        steps["9_rollback"] = {"aliases": rolled, "served_after": served.served_version(probe),
                               "registered": back.registered, "unregistered": back.unregistered,
                               "seconds": back.seconds}
        say(f"9. rollback: champion -> {rolled['champion']}; served {steps['9_rollback']['served_after']}")
        versions, events = {}, {}
        records = read_audit_records(served.audit_log)
        for record in records:
            events[record.event] = events.get(record.event, 0) + 1
            if record.event != "request":  # metadata / readiness lines name no answering model run
                versions[record.model_version] = versions.get(record.model_version, 0) + 1
        steps["audit_log"] = {"records": len(records), "by_event": events, "by_model_version": versions}
        say(f"   audit log: {len(records)} records {events}; answers and refusals by model version {versions}")
    finally:
        served.close()
    steps["seconds"] = round(time.perf_counter() - started, 1)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.loop_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "cxr3")))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "loop" / "loop.json")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="cxr-loop-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        server = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            from training.mlflow_server import start_server
            from serving.torchserve_process import free_port

            server = start_server(work / "mlflow", free_port())  # a private registry: the user's stays as it is
            os.environ["MLFLOW_TRACKING_URI"] = server.url
            print(f"MLflow (private, for this demo): {server.url}")
        try:
            steps = run_loop(args.data_dir.resolve(), work)
        finally:
            if server is not None:
                server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(steps, indent=1, default=str) + "\n")
    print(f"loop closed in {steps['seconds']} s; numbers in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
