"""The one Markdown table writer (cxr_core.reporting.markdown_table) and the reports it renders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cxr_core.reporting import json_ready, markdown_table

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def test_markdown_table_lines_and_alignment():
    assert markdown_table(["a", "b"], [[1, None], ["x", 2.5]]) == ["| a | b |", "|---|---|", "| 1 | None |",
                                                                   "| x | 2.5 |"]
    assert markdown_table(["k", "n", "m"], [], align="lrc")[1] == "|---|---:|:---:|"
    assert markdown_table(["k", "n"], [], align=["l", "r"])[1] == "|---|---:|"
    with pytest.raises(ValueError, match="one of l/r/c for each of the 2 columns"):
        markdown_table(["k", "n"], [], align="r")
    with pytest.raises(ValueError, match="one of l/r/c"):
        markdown_table(["k", "n"], [], align="lx")


def test_chart_table_right_aligns_the_counts():
    from charts.validate import ValuesReport, format_table

    reports = [ValuesReport("ci/a-values.yaml", Counter({"Deployment": 2, "Service": 1})),
               ValuesReport("ci/b-values.yaml", Counter({"Service": 3}))]
    assert format_table(reports).splitlines() == ["| kind | a | b |", "|---|---:|---:|", "| Deployment | 2 | 0 |",
                                                  "| Service | 1 | 3 |", "| **total** | 3 | 3 |"]


@pytest.mark.parametrize("module, stem", [
    ("training.robustness.perturb", "robustness/perturb"), ("training.robustness.loso", "robustness/loso"),
    ("training.robustness.loso", "robustness/loso-efficientnet_lite0-lungs"), ("training.model_report", "model/champion"),
    ("training.robustness.shortcuts", "robustness/shortcuts"), ("training.train_lungs", "lungs/segmenter"),
    ("training.lungs_check", "lungs/cxr3-check")])
def test_committed_reports_are_what_their_writer_renders(tmp_path, module, stem):
    import importlib

    write_markdown = importlib.import_module(module).write_markdown
    out = tmp_path / "report.md"
    write_markdown(json.loads((REPORTS / f"{stem}.json").read_text()), out)
    assert out.read_text() == (REPORTS / f"{stem}.md").read_text()


def test_committed_locust_summary_is_what_its_writer_renders():
    from loadtest.run import summary_markdown

    summary = json.loads((REPORTS / "loadtest" / "locust_summary.json").read_text())
    assert summary_markdown(summary) == (REPORTS / "loadtest" / "locust_summary.md").read_text()


def test_json_ready_makes_strict_json():
    import numpy as np

    value = {1: (np.float32(0.5), np.int64(3), np.bool_(True)), "a": [float("nan"), float("inf"), np.float64(-np.inf)],
             "m": np.array([[1, 2]]), "x": "s", "n": None}
    ready = json_ready(value)
    assert ready == {"1": [0.5, 3, True], "a": [None, None, None], "m": [[1, 2]], "x": "s", "n": None}
    assert type(ready["1"][1]) is int and type(ready["1"][2]) is bool
    json.dumps(ready, allow_nan=False)
    assert json_ready({"p": 0.123456789, "q": np.float64(2 / 3)}, digits=6) == {"p": 0.123457, "q": 0.666667}
