"""How fast the worklist is on a large audit log: index time and page-1 render time over HTTP.

    python -m review.bench [--bundle models/champion] [--lines 100000] [--images 24] [--out reports/review/bench.json]

The log is real: ``--images`` test images through the bundle's Predictor, their records written by
the shared core's writer (``prediction_record``, what serving writes) under distinct request ids
and times until it holds ``--lines`` lines, plus refused-request lines. Then the app is built on it
and page 1 (and a filtered page, and a case view) are fetched through the ASGI stack.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cxr_core.audit import error_record, prediction_record, utc_timestamp

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_log(predictions: list, path: Path, lines: int, start: datetime | None = None) -> Path:
    """``lines`` real records (one refusal in 50) with distinct request ids, one second apart."""
    start = start or datetime(2026, 11, 1, tzinfo=timezone.utc)
    with open(path, "w", encoding="utf-8") as handle:
        for number in range(lines):
            when = utc_timestamp(start + timedelta(seconds=number))
            if number % 50 == 49:
                record = error_record(request_id=f"bench-{number:06d}", time=when, model_name="cxr-screen",
                                      model_version="1", caller_id="bench", latency_ms=1.0, protocol="v2",
                                      status=415, code="not_an_image", stage="front")
            else:
                record = prediction_record(predictions[number % len(predictions)], request_id=f"bench-{number:06d}",
                                           time=when, model_name="cxr-screen", model_version="1", caller_id="bench",
                                           latency_ms=20.0, protocol="v2", item=0, n_items=1)
            handle.write(record.to_line())
    return path


def real_predictions(bundle: Path, data_dir: Path, count: int) -> list:
    from cxr_core.bundle import load_bundle

    predictor = load_bundle(bundle)
    per_class = max(1, count // len(predictor.manifest.classes))
    paths = [path for label in predictor.manifest.classes
             for path in sorted((data_dir / "test" / label).glob("*.jpg"))[:per_class]]
    return predictor.predict_many([path.read_bytes() for path in paths])


def measure(audit_log: Path, work: Path, repeats: int = 5) -> dict:
    from fastapi.testclient import TestClient

    from review.app import create_app
    from review.config import ReviewConfig

    config = ReviewConfig(audit_log=str(audit_log), feedback_db=str(work / "feedback.db"),
                          review_audit_log=str(work / "review-audit.log"), reviewers_file=str(work / "none.json"))
    started = time.perf_counter()
    app = create_app(config, {"bench": "bench-key"}, secret="bench")
    index_s = time.perf_counter() - started
    timings: dict[str, list[float]] = {"page_1": [], "page_1000": [], "gray_zone_page_1": [], "case": []}
    with TestClient(app) as client:
        client.post("/login", data={"reviewer": "bench", "key": "bench-key"})
        urls = {"page_1": "/", "page_1000": "/?page=1000", "gray_zone_page_1": "/?gray=1&since=2026-11-01",
                "case": f"/case/bench-{len(app.state.index.rows) // 2:06d}"}
        for _ in range(repeats):
            for name, url in urls.items():
                begin = time.perf_counter()
                response = client.get(url)
                timings[name].append((time.perf_counter() - begin) * 1000)
                assert response.status_code == 200, (url, response.status_code)
    return {"lines": len(app.state.index.rows), "index_s": round(index_s, 3),
            **{f"{name}_ms_median": round(statistics.median(values), 1) for name, values in timings.items()},
            **{f"{name}_ms_max": round(max(values), 1) for name, values in timings.items()},
            "load_average": list(os.getloadavg())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m review.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "champion")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", REPO_ROOT.parent / "shared"
                                                                              / "data" / "cxr3")))
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers here (JSON)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="review-bench-") as tmp:
        work = Path(tmp)
        audit_log = write_log(real_predictions(args.bundle, args.data_dir, args.images), work / "audit.jsonl",
                              args.lines)
        bundle = args.bundle.resolve()
        named = bundle.relative_to(Path.cwd()) if bundle.is_relative_to(Path.cwd()) else bundle
        result = {"bundle": str(named), **measure(audit_log, work)}  # no machine-specific path in a report
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
