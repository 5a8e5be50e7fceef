"""Monitoring: is the served model still seeing the data it was validated on, and is it calibrated?

- ``features``: the serving audit log -> per-request feature table; time windows.
- ``feedback``: radiologists' confirmed labels by request id (SQLite), for ECE and the next sweep.
- ``metrics``: Evidently metrics for decided-class shares and ECE.
- ``drift``: the drift job (Evidently report, summary.json, exit status 0 ok / 3 retrain).
- ``decision``: the retrain rule, a pure function of the snapshot's numbers and the thresholds.
- ``trigger``: a ``retrain`` starts the sweep locally or creates the chart's RayJob.
- ``replay``, ``shifts``, ``drift_demo``: offline traffic for the demo and the tests.

The reference profile a bundle carries is computed by ``cxr_core.reference`` with the same
feature code the audit log uses (``cxr_core.features``).
"""
