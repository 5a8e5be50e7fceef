"""``reports/bench/bench.md`` from ``bench.json``: generated, never edited by hand."""

from __future__ import annotations

from typing import Any

from cxr_core.reporting import markdown_table

ROUTE_NAMES = {"torchserve": "TorchServe native", "front_v1": "KServe front v1", "front_v2": "KServe front v2 (JSON)",
               "front_v2_binary": "KServe front v2 (binary tensor extension)"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _knobs(knobs: dict[str, Any]) -> str:
    return (f"workers {knobs['workers']}, batchSize {knobs['batch_size']}, maxBatchDelay {knobs['max_batch_delay_ms']} ms, "
            f"threads/worker {knobs['torch_threads']}, netty threads {knobs['netty_threads']}")


def targets_table(report: dict[str, Any]) -> list[str]:
    names = {"served_v2_vs_raw_best": "served v2 images/s / best raw forward", "served_v2_images_per_s":
             "served v2 images/s", "p95_ms_single_v2": "p95 ms, one request at a time (v2 JSON)"}
    rows = [[names[key], target["target"], "-" if target["measured"] is None else target["measured"],
             "met" if target["met"] else "**not met**"] for key, target in report["targets"].items()]
    return markdown_table(["what", "target", "measured", ""], rows, align="llrl")


def summary_table(report: dict[str, Any]) -> list[str]:
    rows = []
    for phase, served_key in (("before", "served_before_tuning"), ("after", "served")):
        data = report[phase]
        for route, best in data["best"].items():
            figures = report[served_key].get(route)
            shown = f"{best['images_per_s']:.2f} (c={best['concurrency']})" if best else "-"
            latency = f"{_ms(best['p50_ms'])} / {_ms(best['p95_ms'])} / {_ms(best['p99_ms'])}" if best else "-"
            single = data["single"].get(route)
            rows.append([phase, _knobs(data["knobs"]), ROUTE_NAMES.get(route, route), shown, latency,
                         _ratio(figures["ratio_vs_raw_best"] if figures else None),
                         _ratio(figures["ratio_vs_pipeline_best"] if figures else None),
                         _ms(single["p95_ms"]) if single else "-"])
    return markdown_table(
        ["phase", "serving settings", "route", "best images/s (concurrency)", "p50 / p95 / p99 ms there",
         f"ratio vs best raw forward ({report['raw_best_images_per_s']:.2f}/s)",
         f"ratio vs best in-process pipeline ({report['pipeline_best']['images_per_s']:.2f}/s)",
         "p95 ms at c=1"], rows, align="lllrrrrr")


def raw_table(report: dict[str, Any]) -> list[str]:
    best = report["raw_best"]
    rows = [[row["runtime"], f"{row['processes']} x {row['threads']}", row["batch_size"], f"{row['images_per_s']:.2f}",
             "" if row["ms_per_image_per_process"] is None else f"{row['ms_per_image_per_process']:.1f}",
             "**best**" if row == best else ""] for row in report["raw"]]
    return markdown_table(["runtime", "processes x threads", "batch", "images/s (all processes)",
                           "ms per image in one process", ""], rows, align="lrrrrl")


def pipeline_table(report: dict[str, Any]) -> list[str]:
    rows = [[f"{row['processes']} x {row['threads']}", f"{row['images_per_s']:.2f}",
             f"{row['ms_per_image_per_process']:.1f}"] for row in report["pipeline"]]
    return markdown_table(["processes x threads", "images/s (all processes)", "ms per image in one process"], rows,
                          align="rrr")


def hops_table(report: dict[str, Any]) -> list[str]:
    names = {"model_in_process_ms": "the model's work in process (decode, lungs, forward, gate, policy; 1 thread)",
             "torchserve_http_jvm_worker_ms": "+ TorchServe: HTTP, its JVM front end, the worker's socket",
             "front_v2_binary_parse_and_forward_ms": "+ KServe front: v2 binary parse, API key, forward, re-encode",
             "v2_json_base64_over_binary_ms": "+ v2 as JSON with base64 instead of the binary extension"}
    return markdown_table(["hop (median latency at concurrency 1)", "ms"],
                          [[names[key], "-" if value is None else f"{value:.1f}"]
                           for key, value in report["hop_costs_ms"].items()], align="lr")


def end_to_end_table(report: dict[str, Any]) -> list[str]:
    """Before and after side by side: the two stacks were measured in alternation, level by level."""
    before, after = report["before"]["end_to_end"], report["after"]["end_to_end"]
    rows = [[ROUTE_NAMES.get(route, route), old["concurrency"], f"{old['images_per_s']:.2f}",
             f"{_ms(old['p50_ms'])} / {_ms(old['p95_ms'])} / {_ms(old['p99_ms'])}", f"{new['images_per_s']:.2f}",
             f"{_ms(new['p50_ms'])} / {_ms(new['p95_ms'])} / {_ms(new['p99_ms'])}",
             f"{old['failures']} / {new['failures']}", new.get("load_average_1m", "-")]
            for route, levels in before.items() for old, new in zip(levels, after[route])]
    return markdown_table(
        ["route", "concurrency", "before images/s", "before p50 / p95 / p99 ms", "after images/s",
         "after p50 / p95 / p99 ms", "failures before / after", "load avg"], rows, align="lrrrrrrr")


def tuning_table(tuning: dict[str, Any]) -> list[str]:
    rows = []
    for trial in tuning["trials"]:
        knobs = trial["knobs"]
        head = [trial["trial"], trial["varied"], knobs["workers"], knobs["batch_size"], knobs["max_batch_delay_ms"],
                knobs["torch_threads"], knobs["netty_threads"]]
        if trial.get("skipped") or trial.get("error"):
            why = "skipped: " + trial["skipped"] if trial.get("skipped") else "error: " + trial["error"][:80]
            rows.append([*head, why, "", "", "", ""])
            continue
        kept = "yes" if trial.get("accepted") else "no"
        if trial["varied"] == "max_batch_delay_ms" and knobs["batch_size"] == 1:
            kept += " (A/A: maxBatchDelay does nothing at batchSize 1, so this gain is the noise)"
        rows.append([*head, f"{trial['candidate_images_per_s']:.2f}", f"{trial['incumbent_images_per_s']:.2f}",
                     f"{trial['gain']:+.0%}", _ms(trial.get("candidate_p95_ms")), kept])
    return markdown_table(
        ["trial", "varied", "workers", "batch", "delay ms", "torch threads", "netty", "candidate images/s",
         "incumbent images/s", "gain", "candidate p95 ms", "kept"], rows, align="rlrrrrrrrrrl")


def quiet_line(load: dict[str, Any]) -> str:
    facts = (f"load average {load['load_1m_before']} before, at most {load['load_1m_during_max']} during (the "
             f"benchmark's own threads count there), {load['load_1m_after']} after; other processes used at most "
             f"{load['background_cores_max']} cores (mean {load['background_cores_mean']})")
    if load["quiet"]:
        return f"Measured on a quiet machine: {facts}."
    return (f"**NOT A QUIET RUN: {facts} (quiet: load before <= {load['load_limit_before']}, others <= "
            f"{load['background_limit_cores']} cores). Do not quote these numbers as the machine's.**")


def bench_markdown(report: dict[str, Any]) -> str:
    bundle, machine, pre = report["bundle"], report["machine"], report["preprocess"]
    best, single = report["raw_best"], report["raw_single_forward"]
    after_raw = report["raw_best_after_sweeps"]
    lines = [
        quiet_line(report["load"]),
        "",
        "# Benchmark: the model alone, every way it runs, vs served end to end",
        "",
        f"Generated by `make bench` (`python -m loadtest.bench`) at {report['measured_at']} in {report['wall_s']:.0f} s; "
        "do not edit by hand.",
        "",
        f"- Bundle: `{bundle['path']}` ({bundle['family']}, {bundle['training_mode']}, {bundle['image_size']} px, "
        f"{bundle['parameters'] or 'n/a'} parameters), served with runtime `{bundle['runtime']}`.",
        f"- Machine: {machine['cpus']} CPUs, {machine['accelerator']}; {machine['platform']}, torch {machine['torch']}.",
        f"- Load: one image per request (real test radiographs, {report['images']['count']} cycled), closed-loop callers, "
        "every answer checked (status, schema, decision); throughput counts good answers only.",
        "",
        f"**best_ratio = {report['best_ratio']}**: served v2 (KServe front, JSON, tuned) "
        f"{report['served_best_images_per_s']} images/s over the best raw forward of the whole matrix, "
        f"{best['images_per_s']:.2f} images/s ({best['runtime']}, {best['processes']} x {best['threads']}, batch "
        f"{best['batch_size']}; {after_raw['images_per_s']:.2f} when measured again after the sweeps). "
        f"**p95_ms_single = {_ms(report['p95_ms_single'])} ms** (v2 JSON, concurrency 1); the fastest single forward "
        f"is {report['raw_single_forward_ms']} ms ({single['runtime']}, {single['threads']} thread(s)).",
        "",
        *targets_table(report),
        "",
        "## Summary: served, before and after tuning",
        "",
        *summary_table(report),
        "",
        "## What each hop costs",
        "",
        *hops_table(report),
        "",
        "## The model alone: forward pass (prebuilt batch tensor, fresh processes per point)",
        "",
        *raw_table(report),
        "",
        "## The model alone: bytes -> Prediction in process (the bundle's runtime)",
        "",
        *pipeline_table(report),
        "",
        f"Preprocessing alone (decode, border crop, lung segmenter and crop, resize to {pre['image_size']} px, quality "
        f"flags, normalise) on one thread: **{pre['images_per_s']:.1f} images/s** ({pre['ms_per_image']:.1f} ms per "
        f"image, mean JPEG {pre['mean_jpeg_kb']} KB).",
        "",
    ]
    lines += ["## End to end, before and after tuning", "",
              f"Before: {_knobs(report['before']['knobs'])}. After: {_knobs(report['after']['knobs'])}. Both stacks "
              "were up at once and loaded in alternation, level by level, so both saw the same background load.", "",
              *end_to_end_table(report), ""]
    tuning = report.get("tuning")
    if tuning:
        lines += ["## Tuning trials", "",
                  "Coordinate descent from the defaults, one knob at a time. Each candidate gets a fresh TorchServe + "
                  "front next to the incumbent's, and the two are loaded in alternating windows "
                  f"({tuning['repeats']} each, {tuning['seconds_per_window']:.0f} s at concurrency {tuning['concurrency']}, "
                  f"{ROUTE_NAMES.get(tuning['route'], tuning['route'])}); the candidate is kept when its median images/s "
                  f"beats the incumbent's by more than {tuning['min_gain']:.0%} with no failures. Settings with more "
                  f"busy torch threads (workers x threads) than {tuning['max_compute_threads']} cores are skipped: on a "
                  "shared machine they would win by taking CPU from the neighbours, and lose on a dedicated pod."
                  + (" Stopped early at the time limit." if tuning["stopped_early"] else ""), "",
                  *tuning_table(tuning), "",
                  f"Tuned: {_knobs(tuning['best_knobs'])}.", ""]
    return "\n".join(lines)
