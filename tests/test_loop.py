"""The MLOps loop, closed, in one test: served traffic -> drift -> retrain -> promote -> served -> rollback.

Real MLflow (the session's server), real TorchServe with a real MAR and the KServe front, real Ray in
the retrain sweep, real Evidently in the drift job, on real images (small subset, 64 px HOG models).
``monitoring.loop_demo.run_loop`` is what ``make loop-demo`` runs; this test asserts its numbers and
checks the served versions itself. Run with ``-s`` to see each step.
"""

from __future__ import annotations

import pytest

from monitoring.config import load_config
from monitoring.loop_demo import LABELLED, SUBSET, run_loop
from training import registry

pytestmark = pytest.mark.slow


def test_the_loop_closes_and_rolls_back(data_dir, mlflow_server, tmp_path):
    thresholds = load_config().thresholds
    steps = run_loop(data_dir, tmp_path / "loop", say=lambda line: print(line, flush=True))
    n_stream = SUBSET["test"] * 3

    champion = steps["1_champion"]["version"]
    assert steps["1_champion"]["aliases"]["champion"] == champion
    assert steps["1_champion"]["reference_rows"] == (SUBSET["val"] + SUBSET["test"]) * 3

    # 2. every answer, over v1 and v2, names the champion
    assert steps["2_served"]["versions"] == {champion: n_stream}
    assert steps["2_served"]["protocols"] == {"v1": n_stream // 2, "v2": n_stream // 2}

    # 3-4. labels attached; the drift job reads serving's audit log and decides ok
    assert steps["3_feedback"]["labels"] == LABELLED
    same = steps["4_drift_same"]
    assert same["decision"] == "ok" and same["reasons"] == []
    assert same["rows"] == n_stream and same["labelled"] == LABELLED
    assert {"mean_intensity", "dark_fraction", "p_tuberculosis"} <= set(same["psi"])
    assert same["max_key_psi"] < thresholds.psi

    # 5. the darkened stream: retrain, for the intensity features
    dark = steps["5_drift_shifted"]
    assert steps["5_served_shifted"]["versions"] == {champion: n_stream}
    assert dark["decision"] == "retrain" and dark["rows"] == n_stream
    assert dark["psi"]["mean_intensity"] > thresholds.psi and dark["psi"]["dark_fraction"] > thresholds.psi
    assert any("key feature mean_intensity " in reason for reason in dark["reasons"]), dark["reasons"]

    # 6-7. the trigger's sweep registered a challenger without touching champion; promotion moved it
    challenger = steps["6_retrain"]["challenger"]
    assert steps["6_retrain"]["ok"] and challenger != champion and int(challenger) > int(champion)
    assert steps["6_retrain"]["champion_after_sweep"] == champion
    assert steps["7_promote"] == {"champion": challenger, "previous": champion}

    # 8. the running TorchServe serves the challenger: same process, new worker, old version unloaded
    rolled = steps["8_rollout"]
    assert rolled["served_before"] == {"v1": champion, "v2": champion, "v2_envelope": champion,
                                      "torchserve_default": champion}
    assert rolled["served_after"] == {"v1": challenger, "v2": challenger, "v2_envelope": challenger,
                                     "torchserve_default": challenger}
    assert rolled["torchserve_running"] and rolled["registered"] and rolled["unregistered"] == [champion]
    assert rolled["worker_pids_before"] and set(rolled["worker_pids_after"]).isdisjoint(rolled["worker_pids_before"])

    # 9. rollback: champion alias and the served version are the old ones again
    back = steps["9_rollback"]
    assert back["aliases"] == {"champion": champion, "previous": challenger}
    assert back["served_after"] == {"v1": champion, "v2": champion, "v2_envelope": champion,
                                      "torchserve_default": champion}
    assert back["unregistered"] == [challenger]
    assert registry.alias_version(registry.CHAMPION) == champion

    # the audit log holds every request with the version that answered it (2 probes + 2 after rollback)
    assert steps["audit_log"]["by_model_version"] == {champion: 2 * n_stream + 4, challenger: 2}
    # and the front's own answers (metadata, readiness) have their request lines beside them
    assert steps["audit_log"]["by_event"]["prediction"] == 2 * n_stream + 6
    assert steps["audit_log"]["records"] == sum(steps["audit_log"]["by_event"].values())
