"""How many connections a front-end process keeps open (in all, and per client address), and how
requests that are not HTTP are logged.

aiohttp accepts every connection and keeps one that has not finished its request headers until its
keep-alive timer (75 s) fires, so a few hundred sockets from one client that each send half a
request line (slowloris) held every descriptor of the process: accept() failed with EMFILE, no
other client got in, and bundles, the job store and outputs could no longer be opened. A connection
past either limit is answered 503 (Esri error JSON) and closed on the loop's next turn, before
any request of it is handled.

aiohttp logged every request it could not parse (a NUL in the path, a header past its limit, a
negative Content-Length) with a full traceback: some 560 bytes of log for a 19-byte request, so a
client could fill the operator's disk through the log. Such requests are logged in one line, at
most BAD_REQUESTS_LOGGED a minute, with a count of the rest.
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import Counter
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

BAD_REQUESTS_LOGGED = 10         # a minute, per process
_RESERVE = 256                  # descriptors kept for bundles, LMDB, outputs, threads when derived
_BURST = 5 * 128                # asyncio accepts up to a backlog (128) of connections per turn of its
                                # loop, and a refused one's descriptor is freed some four turns later
                                # (accept task, connection_made, the refusal, connection_lost)


DESCRIPTORS_WANTED = 65536      # `serve` raises its soft descriptor limit to this (or the hard limit)


def raise_descriptor_limit(want: int = DESCRIPTORS_WANTED) -> int:
    """Raise this process's soft descriptor limit towards its hard limit (at most `want`), as servers do;
    the soft limit now. The usual soft default of 1024 would leave a front end some 128 connections
    (`default_max_connections`); nothing here uses select(), which such descriptors would break."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass            # refused (a container's policy): the default limits follow what is
    return soft


def default_max_connections() -> int:
    """Half the process's descriptor limit (the other half for files and accept bursts), at least 64."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 16384
    return max(64, min(soft // 2, soft - _RESERVE - _BURST))


def _refusal(why: str) -> bytes:
    body = json.dumps({"error": {"code": 503, "message": "Service Unavailable", "details": [why]}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n"
            "Access-Control-Allow-Origin: *\r\n\r\n")
    return head.encode() + body


class ConnectionGuard:
    """Counts the open connections of an aiohttp server, and closes those past the limits."""

    def __init__(self, total: int, per_client: int):
        self.total = total
        self.per_client = per_client
        self.open = 0
        self.by_client: Counter[str] = Counter()
        self._client_of: dict[Any, str] = {}
        self.refused = 0

    def install(self, server: Any) -> None:
        """Wrap an aiohttp web_server.Server's connection_made/connection_lost (its per-connection hooks)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: Any) -> None:
            made(handler, transport)
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
            self._client_of[handler] = client
            self.open += 1
            self.by_client[client] += 1
            why = None
            if self.open > self.total:
                why = (f"this server has {self.total} connections open, its limit ([limits] max_connections); "
                       "try again in a few seconds")
            elif self.by_client[client] > self.per_client:
                why = (f"this client has {self.per_client} connections open, the limit per client "
                       "([limits] max_connections_per_client); reuse them")
            if why is not None:
                # on the next turn of the loop, after the handler's task has begun (before Python 3.12
                # it starts later; closed first, it found its server gone and failed an assertion)
                asyncio.get_running_loop().call_soon(self._refuse, transport, why)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            client = self._client_of.pop(handler, None)
            if client is not None:
                self.open -= 1
                self.by_client[client] -= 1
                if self.by_client[client] <= 0:
                    del self.by_client[client]
            lost(handler, exc)

        server.connection_made = connection_made
        server.connection_lost = connection_lost

    def _refuse(self, transport: Any, why: str) -> None:
        self.refused += 1
        try:
            transport.write(_refusal(why))
        finally:
            transport.close()       # flushes what was written, then frees the descriptor


class _BadRequests(logging.Filter):
    """One line, at most BAD_REQUESTS_LOGGED a minute, for a request aiohttp could not parse; other
    records (a handler's own exceptions) pass unchanged, traceback and all."""

    def __init__(self) -> None:
        super().__init__()
        self._window = 0.0
        self._logged = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._window >= 60:
            self._window, self._logged, dropped, self._dropped = now, 0, self._dropped, 0
        else:
            dropped = 0
        if self._logged >= BAD_REQUESTS_LOGGED:
            self._dropped += 1
            return False
        self._logged += 1
        who = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        what = " ".join(str(getattr(exc, "message", "") or type(exc).__name__).split())[:200]
        more = f" ({dropped} more in the minute before were not logged)" if dropped else ""
        record.msg, record.args = "request from %s is not valid HTTP, answered 400: %s%s", (who, what, more)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


HTTP_LOG = logging.getLogger("tilecrate.server.http")
HTTP_LOG.addFilter(_BadRequests())
