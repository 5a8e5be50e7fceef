"""TorchServe's worker count set at pod start, from the CPUs the pod asked for.

The model package's ``config.properties`` (``serving.mar``) carries ``minWorkers``/``maxWorkers``
in its ``model_snapshot``, fixed when the package was built; the pod that serves it may have more
or fewer cores. The serving image's entry point rewrites a copy of the file with the worker count
the Helm chart renders per CPU request (``CXR_TORCHSERVE_WORKERS`` = CPU request / threads per
worker, ``charts/cxr-screen``), so workers x threads fill the pod's cores without oversubscribing
them (``make bench``: two single-threaded workers beat one worker with two threads on 2 cores).

    python -m serving.ts_config --workers 2 /mnt/models/config/config.properties ./config.properties
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SNAPSHOT_KEY = "model_snapshot="


def with_workers(properties: str, workers: int) -> str:
    """``properties`` with every model version's minWorkers and maxWorkers set to ``workers``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    lines = []
    for line in properties.splitlines():
        if line.startswith(SNAPSHOT_KEY):
            snapshot = json.loads(line[len(SNAPSHOT_KEY):])
            for versions in snapshot.get("models", {}).values():
                for entry in versions.values():
                    entry["minWorkers"] = entry["maxWorkers"] = workers
            line = SNAPSHOT_KEY + json.dumps(snapshot, separators=(",", ":"))
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.ts_config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    args.target.write_text(with_workers(args.source.read_text(), args.workers))


if __name__ == "__main__":
    main()
