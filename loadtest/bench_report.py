"""``reports/bench/bench.md`` from ``bench.json``: generated, never edited by hand."""

from __future__ import annotations

from typing import Any

from cxr_core.reporting import markdown_table

ROUTE_NAMES = {"torchserve": "TorchServe native", "front_v1": "KServe front v1", "front_v2": "KServe front v2"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _knobs(knobs: dict[str, Any]) -> str:
    return (f"workers {knobs['workers']}, batchSize {knobs['batch_size']}, maxBatchDelay {knobs['max_batch_delay_ms']} ms, "
            f"torch threads/worker {knobs['torch_threads']}, netty threads {knobs['netty_threads']}")


def summary_table(report: dict[str, Any]) -> list[str]:
    raw, best_any = report["raw_batched_best"], report["raw_best_any_batch"]
    rows = []
    for phase in ("before", "after"):
        data = report[phase]
        for route, best in data["best"].items():
            shown = f"{best['images_per_s']:.2f} (c={best['concurrency']})" if best else "-"
            latency = f"{_ms(best['p50_ms'])} / {_ms(best['p95_ms'])} / {_ms(best['p99_ms'])}" if best else "-"
            rows.append([phase, _knobs(data["knobs"]), ROUTE_NAMES.get(route, route), shown, latency,
                         _ratio(data["ratio"][route]), _ratio(data["ratio_vs_raw_best_any_batch"][route]),
                         _ms(data["p95_ms_single"]) if route == "front_v2" else ""])
    return markdown_table(
        ["phase", "serving settings", "route", "best images/s (concurrency)", "p50 / p95 / p99 ms there",
         f"ratio vs raw batched ({raw['images_per_s']:.2f}/s)",
         f"ratio vs raw best, any batch ({best_any['images_per_s']:.2f}/s)", "p95 ms single (v2, c=1)"],
        rows, align="lllrrrrr")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def raw_table(report: dict[str, Any]) -> list[str]:
    return markdown_table(
        ["torch threads", "batch", "images/s (median of passes)", "passes (before, between, after the sweeps)"],
        [[row["threads"], row["batch_size"], f"{row['images_per_s']:.2f}",
          ", ".join(f"{value:.2f}" for value in row["passes"])] for row in report["raw"]],
        align="rrrl")


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


def reading(report: dict[str, Any]) -> list[str]:
    """What the ratio's denominator means on this machine, in numbers from this run."""
    batched, best_any = report["raw_batched_best"], report["raw_best_any_batch"]
    if best_any["batch_size"] == batched["batch_size"] and best_any["threads"] == batched["threads"]:
        return []
    return [f"On this machine the model alone is fastest at batch {best_any['batch_size']} with {best_any['threads']} "
            f"torch thread(s) ({best_any['images_per_s']:.2f} images/s), faster than its best batched point "
            f"(batch {batched['batch_size']}, {batched['threads']} thread(s), {batched['images_per_s']:.2f} images/s): "
            "batching buys nothing on this CPU, so a ratio above 1 against the batched denominator means serving "
            "runs the model unbatched; the column against the best raw point of any batch size is the share of the "
            "model's capacity that reaches callers.", ""]


def bench_markdown(report: dict[str, Any]) -> str:
    bundle, machine, pre = report["bundle"], report["machine"], report["preprocess"]
    lines = [
        "# Benchmark: raw model vs served end to end",
        "",
        f"Generated by `make bench` (`python -m loadtest.bench`) at {report['measured_at']} in {report['wall_s']:.0f} s; "
        "do not edit by hand.",
        "",
        f"- Bundle: `{bundle['path']}` ({bundle['family']}, {bundle['training_mode']}, {bundle['image_size']} px, "
        f"{bundle['parameters'] or 'n/a'} parameters).",
        f"- Machine: {machine['cpus']} CPUs, {machine['accelerator']}; {machine['platform']}, torch {machine['torch']}. "
        "The CPUs are shared with other jobs: compare numbers within this report only.",
        f"- Load: one image per request (real test radiographs, {report['images']['count']} cycled), closed-loop callers, "
        "every answer checked (status, schema, decision); throughput counts good answers only.",
        "",
        f"**best_ratio = {report['best_ratio']}** (KServe front v2, tuned; end-to-end images/s at the best concurrency / "
        f"raw batched images/s of the same model); **p95_ms_single = {_ms(report['p95_ms_single'])} ms** "
        "(front v2, concurrency 1). Before tuning: "
        f"{report.get('best_ratio_before')} and {_ms(report.get('p95_ms_single_before'))} ms.",
        "",
        "## Summary: before and after tuning",
        "",
        *summary_table(report),
        "",
        *reading(report),
        "## Raw model forward (in process, prebuilt batch tensor)",
        "",
        *raw_table(report),
        "",
        f"Preprocessing (bytes -> tensor: decode, border crop, resize to {pre['image_size']} px, quality flags, "
        f"normalise) on one thread: **{pre['images_per_s']:.1f} images/s** ({pre['ms_per_image']:.1f} ms per image, "
        f"mean JPEG {pre['mean_jpeg_kb']} KB).",
        "",
    ]
    lines += ["## End to end, before and after tuning", "",
              f"Before: {_knobs(report['before']['knobs'])}. After: {_knobs(report['after']['knobs'])}. Both stacks "
              "were up at once and loaded in alternation, level by level, so both saw the same background load "
              f"(load average {report['load_average_1m'][0]} -> {report['load_average_1m'][1]}).", "",
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
