"""The Markdown report of one evaluation, rendered from its ``metrics.json`` dict (never hand-edited)."""

from __future__ import annotations

from pathlib import Path

from cxr_core.reporting import fmt, fmt_interval, fmt_signed, markdown_table


def write_evaluation_markdown(metrics: dict, path: Path) -> None:
    """Render the metrics dict as a Markdown report (generated, never hand-edited)."""
    classes = metrics["classes"]
    per_class = metrics["per_class"]
    calibration = metrics["calibration"]
    lines = [
        "# Evaluation",
        "",
        f"{metrics['n']} images; classes {', '.join(classes)}; reference class "
        f"{metrics.get('reference_class') or 'n/a'}; temperature {calibration['temperature']:.3f}. "
        f"Intervals: {metrics['bootstrap']['interval']} bootstrap, {metrics['bootstrap']['n']} resamples "
        f"(seed {metrics['bootstrap']['seed']}).",
        "",
        "## Per class: argmax vs policy",
        "",
    ]
    rows = []
    for name in classes:
        a, p = per_class["argmax"][name], per_class["policy"][name]
        rows.append([
            name, a["support"], fmt(a["auc"]),
            fmt(a["sensitivity"]) + fmt_interval(a["sensitivity_ci"]), fmt(p["sensitivity"]) + fmt_interval(p["sensitivity_ci"]),
            fmt(a["specificity"]) + fmt_interval(a["specificity_ci"]), fmt(p["specificity"]) + fmt_interval(p["specificity_ci"]),
            f"{fmt(a['precision'])} / {fmt(p['precision'])}", f"{fmt(a['f1'])} / {fmt(p['f1'])}",
        ])
    lines += markdown_table(
        ["class", "n", "AUC", "sensitivity argmax", "sensitivity policy", "specificity argmax",
         "specificity policy", "precision argmax / policy", "F1 argmax / policy"],
        rows,
    )
    lines += ["", f"Macro AUC {fmt(metrics['macro_auc'])}.", ""]
    avg_rows = []
    for kind in ("macro", "weighted"):
        for rule in ("argmax", "policy"):
            values = metrics[kind][rule]
            cells = [fmt(values.get(key)) for key in ("precision", "sensitivity", "specificity", "f1")]
            avg_rows.append([kind, rule, *cells])
    lines += markdown_table(["average", "decision", "precision", "sensitivity", "specificity", "F1"], avg_rows)

    lines += ["", "## Policy vs argmax", ""]
    rows = []
    for name, gain in metrics["policy_vs_argmax"].items():
        holds = metrics["floor_holds_bootstrap"].get(name, {})
        rows.append([
            name, fmt(metrics["floors"].get(name)), fmt(metrics["thresholds"].get(name)),
            f"{fmt(gain['sensitivity_argmax'])} -> {fmt(gain['sensitivity_policy'])}",
            fmt_signed(gain["sensitivity_gained"]),
            f"{fmt(gain['specificity_argmax'])} -> {fmt(gain['specificity_policy'])}",
            fmt_signed(gain["specificity_given_up"]),
            gain["missed_cases_avoided"], fmt(holds.get("share")),
        ])
    lines += markdown_table(
        ["class", "floor", "threshold", "sensitivity", "gained", "specificity", "given up", "missed cases avoided",
         "floor holds (share of resamples)"],
        rows,
    ) if rows else ["No disease classes with a floor."]

    lines += ["", "## Calibration", ""]
    lines += markdown_table(
        ["", f"ECE ({calibration['n_bins']} equal-width bins)", "ECE (adaptive bins)", "NLL"],
        [
            ["before (T=1)", fmt(calibration["ece_before"], 4), fmt(calibration["adaptive_ece_before"], 4),
             fmt(calibration["nll_before"], 4)],
            [f"after (T={calibration['temperature']:.3f})", fmt(calibration["ece_after"], 4),
             fmt(calibration["adaptive_ece_after"], 4), fmt(calibration["nll_after"], 4)],
        ],
    )

    lines += ["", "## Per source dataset", ""]
    rows = []
    for source, entry in metrics["per_source"].items():
        for name in classes:
            rows.append([
                source, name, entry["counts"][name],
                fmt(entry["argmax"][name]["sensitivity"]), fmt(entry["policy"][name]["sensitivity"]),
                fmt(entry["argmax"][name]["specificity"]), fmt(entry["policy"][name]["specificity"]),
                fmt(entry["auc"].get(name)),
            ])
    lines += markdown_table(
        ["source", "class", "n", "sensitivity argmax", "sensitivity policy", "specificity argmax",
         "specificity policy", "AUC"],
        rows,
    )

    lines += ["", "## Same population (disease vs reference within sources holding both)", ""]
    same = metrics.get("same_population") or {}
    if same:
        rows = [
            [disease, entry["reference"], ", ".join(entry["sources"]) or "none",
             f"{entry['n_disease']} / {entry['n_reference']}", fmt(entry["auc"]),
             fmt(entry["policy_sensitivity"]), fmt(entry["policy_specificity"])]
            for disease, entry in same.items()
        ]
        lines += markdown_table(["disease", "vs", "sources", "n disease / reference", "AUC", "policy sensitivity",
                         "policy specificity"], rows)
    else:
        lines += ["No reference class: same-population view not computed."]

    worklists = metrics["worklists"]
    lines += [
        "",
        "## Worklists",
        "",
        f"- missed (false negatives under the policy): {worklists['missed']} ("
        + (", ".join(f"{k} {v}" for k, v in worklists["missed_per_class"].items()) or "no disease classes")
        + ")",
        f"- gray zone (within {worklists['gray_zone_margin']:g} of a threshold): {worklists['gray_zone']}",
        f"- confident wrong (p > {worklists['confident_wrong_above']:g} and wrong): {worklists['confident_wrong']}",
        "",
    ]
    Path(path).write_text("\n".join(lines))
