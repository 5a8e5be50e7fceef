"""Radiologists' confirmed labels, attached to served requests by request id, stored durably.

SQLite by default (``monitoring/feedback.db``; ``CXR_FEEDBACK_DB`` or ``--db`` elsewhere): one row
per request with its current label, and an append-only history of every label ever given, so a
re-labelled request keeps its audit trail. The drift job joins the labels with the audit log to
measure calibration (ECE) on confirmed cases; ``export`` writes the labelled requests for the next
sweep (and, given the archived images, a ``{split}/{class}/`` folder the training code reads).

    python -m monitoring.feedback add --request-id R123 --label tuberculosis --reviewer dr.a --bundle B
    python -m monitoring.feedback list [--json]
    python -m monitoring.feedback history --request-id R123
    python -m monitoring.feedback export --audit-log logs/ --out reports/feedback/labelled.csv

Labels are checked against the model's classes: ``--classes``, ``--bundle`` (its manifest) or
``--audit-log`` (its ``p_<class>`` columns); the store remembers the last class list it was given.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sqlite3
import sys
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    label      TEXT NOT NULL,
    reviewer   TEXT,
    note       TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    revision   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback_history (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT NOT NULL,
    label       TEXT NOT NULL,
    previous    TEXT,
    reviewer    TEXT,
    note        TEXT,
    recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_history_request ON feedback_history (request_id);
"""


class FeedbackError(ValueError):
    """A label or request the store refuses (unknown class, unknown request, no class list)."""


@dataclass(frozen=True)
class FeedbackEntry:
    request_id: str
    label: str
    reviewer: str | None
    note: str | None
    created_at: str
    updated_at: str
    revision: int
    previous_label: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class FeedbackStore:
    """The SQLite store. Every write is one transaction; WAL mode lets the drift job read meanwhile."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection, connection:
            connection.executescript(_SCHEMA)
            row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                connection.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise FeedbackError(f"{self.path} has feedback schema {row[0]}; this code understands {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    # classes -----------------------------------------------------------------------------------
    def classes(self) -> list[str] | None:
        with closing(self._connect()) as connection:
            row = connection.execute("SELECT value FROM meta WHERE key = 'classes'").fetchone()
        return json.loads(row[0]) if row else None

    def set_classes(self, classes: Sequence[str]) -> None:
        if not classes:
            raise FeedbackError("the class list is empty")
        with closing(self._connect()) as connection, connection:
            connection.execute("INSERT OR REPLACE INTO meta VALUES ('classes', ?)", (json.dumps(list(classes)),))

    # writes ------------------------------------------------------------------------------------
    def add(self, request_id: str, label: str, *, classes: Sequence[str] | None = None, reviewer: str | None = None,
            note: str | None = None) -> FeedbackEntry:
        """Attach (or change) the confirmed label of ``request_id``; the history keeps every version."""
        request_id = (request_id or "").strip()
        if not request_id:
            raise FeedbackError("request id is empty")
        allowed = list(classes) if classes else self.classes()
        if not allowed:
            raise FeedbackError("no class list to check the label against: pass the model's classes "
                                "(--classes, --bundle or --audit-log)")
        if label not in allowed:
            raise FeedbackError(f"label {label!r} is not one of the model's classes {allowed}")
        if classes:
            self.set_classes(classes)
        now = _now()
        with closing(self._connect()) as connection, connection:
            connection.execute("BEGIN IMMEDIATE")
            current = connection.execute(
                "SELECT label, created_at, revision FROM feedback WHERE request_id = ?", (request_id,)).fetchone()
            previous = current[0] if current else None
            created = current[1] if current else now
            revision = (current[2] + 1) if current else 1
            connection.execute(
                "INSERT INTO feedback_history (request_id, label, previous, reviewer, note, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (request_id, label, previous, reviewer, note, now))
            connection.execute(
                "INSERT OR REPLACE INTO feedback (request_id, label, reviewer, note, created_at, updated_at, revision) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (request_id, label, reviewer, note, created, now, revision))
        return FeedbackEntry(request_id, label, reviewer, note, created, now, revision, previous)

    # reads -------------------------------------------------------------------------------------
    def get(self, request_id: str) -> FeedbackEntry | None:
        with closing(self._connect()) as connection:
            row = connection.execute(
                "SELECT request_id, label, reviewer, note, created_at, updated_at, revision FROM feedback "
                "WHERE request_id = ?", (request_id,)).fetchone()
        return FeedbackEntry(*row) if row else None

    def history(self, request_id: str) -> list[dict]:
        with closing(self._connect()) as connection:
            rows = connection.execute(
                "SELECT label, previous, reviewer, note, recorded_at FROM feedback_history WHERE request_id = ? "
                "ORDER BY id", (request_id,)).fetchall()
        return [dict(zip(("label", "previous", "reviewer", "note", "recorded_at"), row)) for row in rows]

    def labels(self) -> pd.DataFrame:
        """Current label per request: request_id, label, reviewer, labelled_at, revision."""
        with closing(self._connect()) as connection:
            rows = connection.execute(
                "SELECT request_id, label, reviewer, updated_at, revision FROM feedback ORDER BY updated_at").fetchall()
        frame = pd.DataFrame(rows, columns=["request_id", "label", "reviewer", "labelled_at", "revision"])
        return frame.astype({"request_id": "string", "label": "string"})

    def __len__(self) -> int:
        with closing(self._connect()) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])


def join_labels(frame: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """The feature rows with a ``label`` column: the store's label where a request has one.

    A label already in ``frame`` (e.g. a replayed log of known images) is kept where the store has
    none; the store wins where both have one.
    """
    if "request_id" not in frame:
        raise ValueError("the feature table has no request_id column to join labels on")
    mapping = dict(zip(labels["request_id"].astype(str), labels["label"].astype(str)))
    joined = frame.copy()
    from_store = joined["request_id"].astype(str).map(mapping)
    existing = joined["label"] if "label" in joined else pd.Series(pd.NA, index=joined.index)
    joined["label"] = from_store.where(from_store.notna(), existing).astype("string")
    return joined


def labelled_rows(frame: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """The requests of ``frame`` that have a confirmed label, with reviewer and label time."""
    merged = frame.drop(columns=[c for c in ("label",) if c in frame]).merge(
        labels, on="request_id", how="inner", validate="many_to_one")
    front = ["request_id", "label", "reviewer", "labelled_at", "revision"]
    return merged[front + [c for c in merged.columns if c not in front]]


def export_labelled(store: FeedbackStore, audit_log: Path | str, out_csv: Path | str,
                    images_dir: Path | str | None = None, dataset_out: Path | str | None = None,
                    split: str = "train") -> dict:
    """Write the labelled requests (features + label) as CSV for the next sweep.

    With ``images_dir`` (request images archived as ``<request_id>.<ext>``) and ``dataset_out``,
    also copy each labelled image to ``dataset_out/<split>/<label>/``: the layout
    ``training.data.discover_dataset`` reads.
    """
    from monitoring.features import load_features

    table = load_features(audit_log)
    labels = store.labels()
    rows = labelled_rows(table.frame, labels) if len(table.frame) else labels.iloc[0:0]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out_csv, index=False)
    result = {"csv": str(out_csv), "rows": int(len(rows)), "labels": int(len(labels)),
              "labels_without_request": int(len(set(labels["request_id"]) - set(rows["request_id"]))),
              "per_class": {str(k): int(v) for k, v in rows["label"].value_counts().items()}}
    if images_dir is not None and dataset_out is not None:
        images_dir, dataset_out = Path(images_dir), Path(dataset_out)
        copied, missing = 0, []
        for request_id, label in zip(rows["request_id"], rows["label"]):
            found = sorted(images_dir.glob(f"{request_id}.*"))
            if not found:
                missing.append(str(request_id))
                continue
            target = dataset_out / split / str(label)
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found[0], target / found[0].name)
            copied += 1
        result.update({"dataset": str(dataset_out), "images_copied": copied, "images_missing": len(missing)})
    return result


# --- CLI -------------------------------------------------------------------------------------------


def _resolve_classes(args: argparse.Namespace) -> list[str] | None:
    if getattr(args, "classes", None):
        return list(args.classes)
    if getattr(args, "bundle", None):
        from cxr_core.bundle import read_manifest

        return read_manifest(args.bundle).classes
    if getattr(args, "audit_log", None):
        from monitoring.features import load_features

        classes = load_features(args.audit_log).classes
        return classes or None
    return None


def _default_db() -> Path:
    from monitoring.config import load_config

    return load_config().feedback_db_path()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.feedback",
        description="Radiologists' confirmed labels for served requests (SQLite; used for ECE in the drift "
                    "job and as labelled data for the next sweep).",
    )
    parser.add_argument("--db", type=Path, default=None,
                        help="SQLite file (default: $CXR_FEEDBACK_DB, else feedback_db in configs/drift.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)

    add = commands.add_parser("add", help="attach or change the confirmed label of a request id")
    add.add_argument("--request-id", required=True)
    add.add_argument("--label", required=True, help="one of the model's classes")
    add.add_argument("--reviewer", default=None)
    add.add_argument("--note", default=None)
    add.add_argument("--classes", nargs="+", default=None, help="the model's classes")
    add.add_argument("--bundle", type=Path, default=None, help="take the classes from this bundle")
    add.add_argument("--audit-log", type=Path, default=None,
                     help="take the classes from this log and refuse request ids it does not hold")
    add.add_argument("--allow-unknown-request", action="store_true",
                     help="with --audit-log: accept a request id the log does not (yet) hold")

    listing = commands.add_parser("list", help="current label per request")
    listing.add_argument("--json", action="store_true")

    history = commands.add_parser("history", help="every label a request was given")
    history.add_argument("--request-id", required=True)

    export = commands.add_parser("export", help="labelled requests (audit-log features + label) for the next sweep")
    export.add_argument("--audit-log", type=Path, required=True, help="audit log file or folder (or a feature CSV)")
    export.add_argument("--out", type=Path, required=True, help="CSV to write")
    export.add_argument("--images", type=Path, default=None, help="archived request images (<request_id>.<ext>)")
    export.add_argument("--dataset-out", type=Path, default=None, help="with --images: write {split}/{label}/ here")
    export.add_argument("--split", default="train")

    args = parser.parse_args(argv)
    store = FeedbackStore(args.db or _default_db())
    try:
        if args.command == "add":
            if args.audit_log and not args.allow_unknown_request:
                from monitoring.features import load_features

                known = set(load_features(args.audit_log).frame.get("request_id", pd.Series(dtype=str)).astype(str))
                if args.request_id not in known:
                    raise FeedbackError(f"request id {args.request_id!r} is not in {args.audit_log} "
                                        "(--allow-unknown-request to record it anyway)")
            entry = store.add(args.request_id, args.label, classes=_resolve_classes(args),
                              reviewer=args.reviewer or None, note=args.note or None)
            change = f" (was {entry.previous_label})" if entry.previous_label else ""
            print(f"{entry.request_id}: {entry.label}{change}, revision {entry.revision}, stored in {store.path}")
        elif args.command == "list":
            labels = store.labels()
            if args.json:
                print(labels.to_json(orient="records", indent=1))
            else:
                print(labels.to_string(index=False) if len(labels) else f"no feedback in {store.path}")
        elif args.command == "history":
            rows = store.history(args.request_id)
            if not rows:
                raise FeedbackError(f"no feedback for request id {args.request_id!r}")
            writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        elif args.command == "export":
            result = export_labelled(store, args.audit_log, args.out, args.images, args.dataset_out, args.split)
            print(json.dumps(result, indent=1))
    except FeedbackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
