"""How the safe HTTP client (:mod:`stages.common.fetch`) turns what went
wrong into a reason and a detail, never an exception.

Why on its own: every failure, raised anywhere under urllib3 (the
connection, the TLS handshake, a read, an address refused), ends up here to
be named (``invalid_url``, ``blocked_address``, ``timeout``,
``connection_error``, ``truncated``) in words that read the same in every
run, since rejects files are compared byte for byte. The client's own
decisions (an HTTP status, a cap reached) are a :class:`_Failure` that
carries its reason and detail as they are.
"""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Iterable

from urllib3.exceptions import (
    ConnectTimeoutError,
    IncompleteRead,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from pairforge.stages.common.fetch_address import BlockedAddress
from pairforge.stages.common.fetch_connection import DeadlineExceeded


class _Failure(Exception):
    """A reason the client names itself (an HTTP status, a cap reached), with
    the values behind it; caught in the attempt, never raised out of it."""

    def __init__(self, reason: str, http_status: int = 0, **detail):
        super().__init__(reason)
        self.reason, self.http_status, self.detail = reason, http_status, detail


_OBJECT_AT = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def error_text(e: BaseException, limit: int = 500) -> str:
    """``Type: message`` without memory addresses, so the same failure reads
    the same in every run (rejects files are compared byte for byte)."""
    return _OBJECT_AT.sub(r"<\1>", f"{type(e).__name__}: {e}")[:limit]


def _causes(e: BaseException) -> Iterable[BaseException]:
    """``e`` and what it wraps (urllib3 wraps errors in args or ``__cause__``)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]


def _deadline_hit(e: BaseException) -> bool:
    return any(isinstance(x, DeadlineExceeded) for x in _causes(e))


def _classify(e: Exception) -> tuple[str, dict]:
    chain = list(_causes(e))
    detail: dict = {"error": error_text(e)}
    for x in chain:
        if isinstance(x, BlockedAddress):
            return "blocked_address", {"error": str(x), "host": x.host, "refused": x.refused}
    kinds = [
        ("invalid_url", (LocationValueError, http.client.InvalidURL, UnicodeError)),
        ("truncated", (IncompleteRead, http.client.IncompleteRead)),
        ("connection_error", (NameResolutionError, NewConnectionError, SSLError)),
        ("timeout", (ReadTimeoutError, ConnectTimeoutError, socket.timeout, TimeoutError)),
    ]
    for reason, types in kinds:
        if any(isinstance(x, types) for x in chain):
            return reason, detail
    # the connection broke before any answer: often a keep-alive connection
    # the server had closed, worth one free retry
    if isinstance(e, ProtocolError) and "aborted" in str(e):
        detail["stale"] = True
    return "connection_error", detail
