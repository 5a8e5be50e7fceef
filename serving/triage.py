"""Batch triage: a folder of radiographs (JPEG/PNG/DICOM...) -> a worklist CSV, most urgent first.

    python -m serving.triage DIR --url http://127.0.0.1:8080 --api-key KEY   # through the endpoint
    python -m serving.triage DIR --offline --bundle runs/.../bundle          # the bundle, no server

Every regular, non-hidden file under DIR is read (DICOM often has no extension). Rows are sorted by
triage level (urgent, review, routine), then by the highest calibrated probability of a ranked
(disease) class, highest first. Files that could not be read or were refused are listed at the end
with their error code and reason, never skipped.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.client import CxrScreenClient, EndpointError, api_key_from_file
from serving.schemas import PredictionResponse

TRIAGE_ORDER = {"urgent": 0, "review": 1, "routine": 2}
CHUNK = 16


@dataclass
class TriageRow:
    path: str
    answer: PredictionResponse | None = None
    error_code: str = ""
    error: str = ""

    def risk(self, ranked: list[str]) -> float:
        if self.answer is None:
            return 0.0
        probabilities = self.answer.probabilities
        if not probabilities:  # ungradable: no finding to rank by
            return 0.0
        return max((probabilities[c] for c in ranked if c in probabilities), default=max(probabilities.values()))


def list_images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _read(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as error:
        return error


def triage_offline(paths: list[Path], bundle: Path, root: Path) -> tuple[list[TriageRow], list[str]]:
    """Predict with the bundle in-process (same shared core as the server)."""
    from cxr_core.bundle import load_bundle
    from serving.envelopes import prediction_response, ranked_thresholds
    from serving.mar import bundle_version

    predictor = load_bundle(bundle)
    version = bundle_version(Path(bundle))
    thresholds = ranked_thresholds(predictor.manifest.policy)
    rows = []
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start:start + CHUNK]
        contents = [_read(path) for path in chunk]
        readable = [content for content in contents if isinstance(content, bytes)]
        results = iter(predictor.predict_many(readable))
        for path, content in zip(chunk, contents):
            row = TriageRow(path=str(path.relative_to(root)))
            if isinstance(content, OSError):
                row.error_code, row.error = "unreadable", f"the file could not be read ({content.strerror})"
            else:
                result = next(results)
                if isinstance(result, Exception):
                    row.error_code, row.error = getattr(result, "code", "bad_input"), str(result)
                else:
                    row.answer = prediction_response(result, request_id=f"offline-{start}", item=0,
                                                     model_name="cxr-screen", model_version=version, latency_ms=0.0,
                                                     thresholds=thresholds)
            rows.append(row)
    return rows, list(thresholds)


def triage_endpoint(paths: list[Path], url: str, api_key: str | None, root: Path, protocol: str = "v1",
                    workers: int = 2, request_id_prefix: str = "triage-") -> tuple[list[TriageRow], list[str]]:
    """One request per image through the served endpoint (KServe front or TorchServe)."""
    with CxrScreenClient(url, api_key=api_key, request_id_prefix=request_id_prefix) as client:
        def one(path: Path) -> TriageRow:
            row = TriageRow(path=str(path.relative_to(root)))
            content = _read(path)
            if isinstance(content, OSError):
                row.error_code, row.error = "unreadable", f"the file could not be read ({content.strerror})"
                return row
            try:
                row.answer = client.predict(content, protocol=protocol)  # type: ignore[arg-type]
            except EndpointError as error:
                row.error_code, row.error = error.code, error.reason
            except Exception as error:  # network trouble is a failure of this file, listed like the others
                row.error_code, row.error = "request_failed", f"{type(error).__name__}: {error}"
            return row

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            rows = list(pool.map(one, paths))
    ranked = next((list(row.answer.thresholds) for row in rows if row.answer is not None), [])
    return rows, ranked


def sort_rows(rows: list[TriageRow], ranked: list[str]) -> list[TriageRow]:
    done = [row for row in rows if row.answer is not None]
    failed = [row for row in rows if row.answer is None]
    done.sort(key=lambda row: (TRIAGE_ORDER.get(row.answer.decision.triage, 3), -row.risk(ranked), row.path))
    return done + sorted(failed, key=lambda row: row.path)


def write_worklist(rows: list[TriageRow], ranked: list[str], out: Path) -> None:
    classes: list[str] = next((row.answer.classes for row in rows if row.answer), [])
    fields = (["rank", "file", "status", "triage", "decision", "fired_class", "threshold", "risk"]
              + [f"p_{c}" for c in classes]
              + ["gray_zone", "underexposed", "overexposed", "low_contrast", "has_border", "model_version",
                 "error_code", "error"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for rank, row in enumerate(rows, start=1):
            record: dict[str, Any] = {"rank": rank, "file": row.path}
            if row.answer is None:
                record.update(status="failed", triage="", error_code=row.error_code, error=row.error)
            else:
                answer, decision, quality = row.answer, row.answer.decision, row.answer.quality
                gate = answer.gate
                if gate is not None and not gate.gradable:  # human review, with the gate's reason
                    record.update(error_code=f"ungradable:{gate.code}", error=gate.reason or "")
                record.update(status="ok" if answer.probabilities else "ungradable", triage=decision.triage,
                              decision=decision.label,
                              fired_class=decision.fired_class or "", threshold=decision.threshold or "",
                              risk=round(row.risk(ranked), 6), gray_zone=",".join(decision.gray_zone),
                              underexposed=quality.underexposed, overexposed=quality.overexposed,
                              low_contrast=quality.low_contrast, has_border=quality.has_border,
                              model_version=answer.model_version)
                record.update({f"p_{c}": round(answer.probabilities[c], 6) for c in classes if c in answer.probabilities})
            writer.writerow(record)


def local_stack_key() -> str | None:
    """The API key the local stack (``python -m serving.stack start``) generated, if there is one."""
    from serving.config import ServingConfig
    from serving.stack import REPO_ROOT

    config = ServingConfig.load()
    path = Path(config.front.api_keys_file) if config.front.api_keys_file else (
        REPO_ROOT / config.local.state_dir / "api_keys.json")
    return api_key_from_file(path) if path.exists() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.triage", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of images or DICOM files (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="worklist CSV (default reports/serving/worklist.csv)")
    parser.add_argument("--offline", action="store_true", help="predict with --bundle in-process, no server")
    parser.add_argument("--bundle", type=Path, help="bundle directory (with --offline)")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="KServe front (or TorchServe) base URL")
    parser.add_argument("--api-key", default=None, help="front API key (or --api-key-file)")
    parser.add_argument("--api-key-file", type=Path, default=None,
                        help='JSON {"caller": "key"}; default $CXR_API_KEY, else the key `make serve` generated')
    parser.add_argument("--protocol", choices=("v1", "v2"), default="v1")
    parser.add_argument("--workers", type=int, default=2, help="concurrent requests to the endpoint")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    paths = list_images(args.folder)
    if not paths:
        parser.error(f"no files under {args.folder}")
    if args.offline:
        if not args.bundle:
            parser.error("--offline needs --bundle DIR")
        rows, ranked = triage_offline(paths, args.bundle, args.folder)
    else:
        key = args.api_key or os.environ.get("CXR_API_KEY") or (
            api_key_from_file(args.api_key_file) if args.api_key_file else local_stack_key())
        rows, ranked = triage_endpoint(paths, args.url, key, args.folder, args.protocol, args.workers)
    rows = sort_rows(rows, ranked)
    out = args.out or Path("reports/serving/worklist.csv")
    write_worklist(rows, ranked, out)
    counts = Counter(row.answer.decision.triage if row.answer else "failed" for row in rows)
    print(f"worklist {out}: {len(rows)} files: " + ", ".join(
        f"{counts[level]} {level}" for level in ("urgent", "review", "routine", "failed") if counts[level]))
    for row in rows:
        if row.answer is None:
            print(f"  failed: {row.path}: {row.error_code}: {row.error}", file=sys.stderr)


if __name__ == "__main__":
    main()
