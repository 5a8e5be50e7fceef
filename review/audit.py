"""The review app's own audit trail: who looked at what, and who labelled what, as JSON lines.

Separate from the serving log (a reviewer is not a request) but written the same way: the shared
core's :class:`~cxr_core.audit.AuditLogWriter` (one ``O_APPEND`` write per line). A line holds the
reviewer id, the action, the request id it concerns, the label given and the filters of a
worklist view; never image data, never what a failed login typed as a key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cxr_core.audit import AuditLogWriter, utc_timestamp

REVIEW_AUDIT_SCHEMA_VERSION = 1
Action = Literal["login", "login_refused", "logout", "view_worklist", "view_case", "view_overlay", "label"]


class ReviewEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = REVIEW_AUDIT_SCHEMA_VERSION
    time: str
    reviewer: str | None
    action: Action
    request_id: str | None = None
    item: int | None = None
    label: str | None = None
    previous_label: str | None = None
    filters: dict[str, str] | None = None
    client: str | None = None  # the connecting address (a workstation, not a patient)

    def to_line(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), separators=(",", ":")) + "\n"


class ReviewAudit:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._writer = AuditLogWriter(self.path)

    def record(self, action: Action, reviewer: str | None, **fields) -> ReviewEvent:
        event = ReviewEvent(time=utc_timestamp(), reviewer=reviewer, action=action, **fields)
        self._writer.write(event)  # type: ignore[arg-type]  # duck-typed: anything with to_line()
        return event


def read_review_events(path: Path | str) -> list[ReviewEvent]:
    path = Path(path)
    if not path.exists():
        return []
    return [ReviewEvent.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
