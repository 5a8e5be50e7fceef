"""Log redaction: no caller data in a log line, whatever a library chooses to log.

Exception messages are where request bytes leak (kserve logged a DICOM's bytes repr inside a
UnicodeDecodeError's message). This filter, installed on every handler of the front and the
TorchServe worker, keeps a logged exception's type and stack frames (enough to debug) and drops
its message; bytes arguments become their length.
"""

from __future__ import annotations

import logging
import re
import traceback

WITHHELD = "(exception message withheld: it may quote request data)"


_ROUTE_WORDS = frozenset({"v1", "v2", "models", "health", "live", "ready", "infer", "metrics", "versions",
                          "predictions", "explanations", "ping", ""})
_NAME = re.compile(r"^[a-z][a-z-]{0,40}(:predict|:explain)?$")  # model names: no digits, so no dates or ids


def safe_path(path: str) -> str:
    """A request path for a log line: the route's shape; versions and unknown segments withheld
    (a caller can put anything into a URL)."""
    segments = path.split("?", 1)[0].split("/")
    shown = []
    for index, segment in enumerate(segments):
        if index > 0 and segments[index - 1] == "versions":
            shown.append("{version}")
        elif segment in _ROUTE_WORDS or _NAME.match(segment):
            shown.append(segment)
        else:
            shown.append("{withheld}")
    return "/".join(shown)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) >= 3:
            args = list(record.args)
            args[2] = safe_path(str(args[2]))
            record.args = tuple(args)
        if record.exc_info and record.exc_info[0] is not None:
            kind, _, tb = record.exc_info
            frames = "".join(traceback.format_tb(tb)) if tb is not None else ""
            record.exc_info = None
            record.exc_text = f"Traceback (most recent call last):\n{frames}{kind.__name__}: {WITHHELD}"
        if isinstance(record.args, tuple):
            record.args = tuple(f"<{len(arg)} bytes>" if isinstance(arg, (bytes, bytearray, memoryview)) else arg
                                for arg in record.args)
        if isinstance(record.msg, (bytes, bytearray)):
            record.msg = f"<{len(record.msg)} bytes>"
        return True


_FILTER = RedactingFilter()


def install_redaction() -> None:
    """Add the filter to every handler of the root logger and of every logger created so far."""
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
