"""The worklist index: the audit log parsed once into small rows, sorted by triage, refreshed by growth.

Why an index: a page of the worklist must render in milliseconds on a log of 100,000 lines, and
a log grows while the app runs. Every line is parsed once through the shared core
(:func:`cxr_core.audit.parse_audit_line`, no second schema) into a slotted :class:`Row` that holds
only what the worklist shows; a case view reads its whole records again from disk by position
(:func:`cxr_core.audit.read_audit_line`). On a request the files are stat-ed (at most once per
``check_interval_s``): a file that grew is read from where the index stopped, a file that shrank
or changed inode (rotation) is read again, and the rows are re-sorted.

Order: urgent, review, routine, then refused requests (error lines); within a level, oldest first
(the queue a reviewer works through). Lines that are not records are counted, not shown.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cxr_core.audit import (AuditRecord, UnsupportedAuditVersion, audit_log_files, iter_audit_lines, parse_audit_line,
                            read_audit_line)
from cxr_core.features import QUALITY_FLAG_FEATURES

log = logging.getLogger(__name__)

TRIAGE_ORDER = ("urgent", "review", "routine", "refused")
TRIAGE_RANK = {name: rank for rank, name in enumerate(TRIAGE_ORDER)}
CASE_ID_FIELD = "case_id"  # a hospital-side case id, shown as given, only where a line carries one


@dataclass(frozen=True, slots=True)
class Row:
    """One audit line as the worklist shows it (no image data exists in the log to begin with)."""

    where: str
    request_id: str
    item: int | None
    time: str
    event: str
    triage: str
    decision: str | None
    fired_class: str | None
    gray_zone: tuple[str, ...]
    gradable: bool
    gate_code: str | None
    flags: tuple[str, ...]
    probabilities: tuple[tuple[str, float], ...]
    error_code: str | None
    status: int
    model_version: str
    case_id: str | None

    @property
    def ungradable(self) -> bool:
        return self.event == "prediction" and (not self.gradable or self.gate_code is not None)

    @property
    def sort_key(self) -> tuple[int, str, int]:
        return TRIAGE_RANK.get(self.triage, len(TRIAGE_ORDER)), self.time, self.item or 0


def row_of(record: AuditRecord, where: str) -> Row:
    """The worklist row of one record: the decision's fields from the shared feature columns."""
    features = record.features
    probabilities = tuple((name[2:], float(value)) for name, value in features.items()
                          if name.startswith("p_") and isinstance(value, (int, float)))
    gray = str(features.get("gray_zone") or "")
    case_id = features.get(CASE_ID_FIELD)
    if record.event == "error":
        triage = "refused"
    else:
        triage = str(features.get("triage") or "review")
    return Row(where=where, request_id=record.request_id, item=record.item, time=record.time, event=record.event,
               triage=triage, decision=features.get("decision"), fired_class=features.get("fired_class"),
               gray_zone=tuple(part for part in gray.split(",") if part),
               gradable=bool(features.get("gradable", True)), gate_code=features.get("gate_code"),
               flags=tuple(name for name in QUALITY_FLAG_FEATURES if features.get(name) is True),
               probabilities=probabilities, error_code=record.error_code, status=record.status,
               model_version=record.model_version, case_id=str(case_id) if case_id not in (None, "") else None)


@dataclass
class _FileState:
    identity: tuple[int, int]  # (device, inode)
    size: int
    mtime_ns: int
    lines: int  # non-empty lines consumed (iter_audit_lines' count)


@dataclass
class Page:
    rows: list[Row]
    page: int
    pages: int
    total: int


@dataclass
class WorklistIndex:
    """Rows of every line under ``path``, sorted; safe to share between the server's threads."""

    path: Path
    check_interval_s: float = 1.0
    rows: list[Row] = field(default_factory=list)
    malformed: int = 0
    unsupported: int = 0
    last_problem: str | None = None
    load_seconds: float = 0.0
    _files: dict[Path, _FileState] = field(default_factory=dict)
    _by_file: dict[Path, list[Row]] = field(default_factory=dict)
    _by_request: dict[str, list[Row]] = field(default_factory=dict)
    _checked_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # loading ---------------------------------------------------------------------------------
    def _parse(self, lines: Iterable[tuple[str, str]]) -> tuple[list[Row], int]:
        rows, count = [], 0
        for where, line in lines:
            count += 1
            try:
                record = parse_audit_line(line, where)
                if record.event == "request":  # metadata / health: no image, no decision, nothing to review
                    continue
                rows.append(row_of(record, where))
            except UnsupportedAuditVersion as error:
                self.unsupported += 1
                self.last_problem = str(error)
            except ValueError as error:
                self.malformed += 1
                self.last_problem = f"{where}: not an audit record ({type(error).__name__})"
        return rows, count

    def refresh(self, force: bool = False) -> bool:
        """Bring the index up to date with the files; True when rows changed."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval_s:
            return False
        with self._lock:
            self._checked_at = now
            started = time.perf_counter()
            try:
                files = audit_log_files(self.path)
            except FileNotFoundError:
                files = []
            changed = False
            for gone in set(self._files) - set(files):
                self._files.pop(gone)
                self._by_file.pop(gone, None)
                changed = True
            for file in files:
                stat = os.stat(file)
                identity = (stat.st_dev, stat.st_ino)
                state = self._files.get(file)
                if state and (state.identity, state.size, state.mtime_ns) == (identity, stat.st_size, stat.st_mtime_ns):
                    continue
                grown = (state is not None and state.identity == identity and stat.st_size >= state.size
                         and file.suffix != ".gz")
                skip = state.lines if grown and state else 0
                new_rows, count = self._parse(itertools.islice(iter_audit_lines(file), skip, None))
                self._by_file[file] = (self._by_file.get(file, []) if grown else []) + new_rows
                self._files[file] = _FileState(identity, stat.st_size, stat.st_mtime_ns, skip + count)
                changed = True
            if changed:
                rows = [row for file in sorted(self._by_file) for row in self._by_file[file]]
                rows.sort(key=lambda row: row.sort_key)
                by_request: dict[str, list[Row]] = {}
                for row in rows:
                    by_request.setdefault(row.request_id, []).append(row)
                self.rows, self._by_request = rows, by_request
                self.load_seconds = time.perf_counter() - started
                log.info("review index: %d rows from %d files in %.2f s", len(rows), len(files), self.load_seconds)
            return changed

    # queries ---------------------------------------------------------------------------------
    def classes(self) -> list[str]:
        """The model's classes, from the ``p_<class>`` columns of the lines (what the store checks labels against)."""
        for row in self.rows:
            if row.probabilities:
                return [name for name, _ in row.probabilities]
        return []

    def select(self, *, since: str | None = None, gray_zone: bool = False, ungradable: bool = False,
               triage: str | None = None) -> list[Row]:
        """Rows matching the filters, in worklist order (``since``: ISO date or time, UTC)."""
        self.refresh()
        rows = self.rows
        if not (since or gray_zone or ungradable or triage):
            return rows
        return [row for row in rows
                if (not since or row.time >= since) and (not gray_zone or row.gray_zone)
                and (not ungradable or row.ungradable) and (not triage or row.triage == triage)]

    def page(self, rows: list[Row], page: int, page_size: int) -> Page:
        pages = max(1, -(-len(rows) // page_size))
        page = min(max(1, page), pages)
        start = (page - 1) * page_size
        return Page(rows=rows[start:start + page_size], page=page, pages=pages, total=len(rows))

    def case(self, request_id: str) -> list[tuple[Row, AuditRecord]]:
        """Every line of one request (one per image, or its refusal), each with its whole record."""
        self.refresh()
        return [(row, read_audit_line(row.where)) for row in sorted(self._by_request.get(request_id, []),
                                                                   key=lambda r: (r.item or 0, r.time))]
