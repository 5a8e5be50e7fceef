"""``make champion`` on a fresh machine registers the bundle that ships in models/champion.

Real MLflow server (the session's), a real bundle; a registered-model name of its own so the
champion other tests serve is untouched whatever the order.
"""

from __future__ import annotations

import hashlib
import json
import shutil

from training.registry import CHAMPION, alias_version, client, fetch_bundle, register_shipped

NAME = "cxr-screen-shipped-test"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_shipped_makes_the_committed_bundle_champion(mlflow_server, monitoring_bundle, tmp_path):
    shipped = shutil.copytree(monitoring_bundle, tmp_path / "models" / "champion")
    report = tmp_path / "champion.json"
    report.write_text(json.dumps({"test": {"macro_auc": 0.5, "tb_sensitivity": 0.9}, "loso": {}, "shortcuts": {}}))
    first = register_shipped(shipped, report, experiment="shipped-test", name=NAME)
    assert alias_version(CHAMPION, NAME) == first
    version = client().get_model_version(NAME, first)
    assert version.tags["origin"] == "shipped"
    assert json.loads(version.tags["files_sha256"])["bundle.json"] == _sha(shipped / "bundle.json")
    run = client().get_run(version.run_id)
    assert run.data.metrics["test.macro_auc"] == 0.5
    fetched, fetched_version = fetch_bundle(f"models:/{NAME}@{CHAMPION}", tmp_path / "fetched")
    assert fetched_version == first and _sha(fetched / "bundle.json") == _sha(shipped / "bundle.json")
    # a second registration (a newer shipped model, or a sweep) moves champion; the old one is previous
    second = register_shipped(shipped, None, experiment="shipped-test", name=NAME)
    assert int(second) == int(first) + 1 and alias_version(CHAMPION, NAME) == second
    assert alias_version("previous", NAME) == first
