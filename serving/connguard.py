"""Connection limits of the front that the ASGI app cannot see: slow headers and too many sockets.

uvicorn hands a request to the app only once its headers are complete, and it has no header read
timeout: 200 sockets sending one header byte a second stay open as long as the client likes, and
nothing caps the sockets one client holds. This wraps uvicorn's HTTP protocol class:

- a **header timeout**: a connection whose request headers are not complete ``header_timeout_s``
  after it opened (or after the first byte of its next request) gets ``408`` and is closed; an idle
  kept-alive connection between requests is closed silently by uvicorn's keep-alive timeout;
- a **per-client connection cap**: a client address with ``max_connections_per_client`` open
  sockets has its next one answered ``429`` and closed.

The body read timeout lives in :class:`serving.front.FrontGuard` (the app reads the body).
Installed by :func:`install` before uvicorn loads its config (``python -m serving.front`` does it).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import uvicorn.config


@dataclass
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections_per_client: int = 32


LIMITS = ConnectionLimits()
OPEN: Counter = Counter()
ON_REFUSAL: list[Callable[[int, str], None]] = []  # (status, code) -> audit line, set by the front


def _refusal(status: int, code: str, reason: str) -> bytes:
    body = json.dumps({"error": reason, "code": code}).encode()
    phrase = {408: "Request Timeout", 429: "Too Many Requests"}[status]
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded(base: type) -> type:
    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's protocol plus a header timeout and a per-client connection cap."""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._peer = self.client[0] if self.client else "unknown"
            OPEN[self._peer] += 1
            self._header_timer = None
            if OPEN[self._peer] > LIMITS.max_connections_per_client:
                self._refuse(429, "too_many_connections",
                             f"this client already holds {LIMITS.max_connections_per_client} connections")
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(LIMITS.header_timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle.response_complete:  # no request whose headers arrived in time
                self._refuse(408, "header_timeout", f"the request headers did not arrive within "
                                                    f"{LIMITS.header_timeout_s:g} s")

        def _refuse(self, status: int, code: str, reason: str) -> None:
            for callback in ON_REFUSAL:
                callback(status, code)
            if not self.transport.is_closing():
                self.transport.write(_refusal(status, code, reason))
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            # the first bytes of a new request on a kept-alive connection start its header clock;
            # an idle kept-alive connection is uvicorn's keep-alive timeout's business, not a refusal
            cycle = getattr(self, "cycle", None)
            if self._header_timer is None and (cycle is None or cycle.response_complete):
                self._arm()
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc) -> None:  # type: ignore[override]
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            OPEN[self._peer] -= 1
            if OPEN[self._peer] <= 0:
                del OPEN[self._peer]
            super().connection_lost(exc)

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def install(limits: ConnectionLimits) -> None:
    """Make uvicorn's ``auto`` HTTP protocol the guarded one (kserve builds uvicorn's config itself)."""
    LIMITS.header_timeout_s = limits.header_timeout_s
    LIMITS.max_connections_per_client = limits.max_connections_per_client
    base = uvicorn.config.import_from_string(uvicorn.config.HTTP_PROTOCOLS["auto"])
    if getattr(base, "__name__", "") == "AutoHTTPProtocol" or not isinstance(base, type):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base  # noqa: N813
        except ImportError:
            from uvicorn.protocols.http.h11_impl import H11Protocol as base  # noqa: N813
    globals()["GuardedHttpProtocol"] = guarded(base)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = "serving.connguard:GuardedHttpProtocol"
