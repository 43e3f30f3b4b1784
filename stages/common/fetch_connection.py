"""The connections of the safe HTTP client (:mod:`stages.common.fetch`):
where a connection may go, and how long any of its socket waits may last.

Why on its own: this is the part that hooks into urllib3's internals (its
``_new_conn`` and its ``response_class``), so it is kept apart from the
client's own logic, small enough to re-read whenever urllib3 changes:

* :class:`_VettedConnectionMixin` resolves the host once, drops the
  addresses the :class:`~stages.common.fetch_address.AddressPolicy` refuses,
  connects to a vetted address literal and checks the socket's peer: what
  was checked is what is connected to, so DNS rebinding has no window;
* :class:`_DeadlineHTTPResponse` makes every read of the status line, the
  headers and the body wait at most ``min(timeout, deadline left)``, where
  the deadline is the running attempt's (:data:`_ATTEMPT`, set per download
  thread by :class:`~stages.common.fetch.SafeFetcher`).

The classes here are bound to a fetcher's policy and resolver by
``stages.common.fetch._bind``.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import threading
import time
from collections.abc import Callable

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from pairforge.stages.common.fetch_address import AddressPolicy, BlockedAddress

Resolver = Callable[..., list]

# ------------------------------------------------------------ the deadline

#: the running attempt's deadline, per download thread: (monotonic time, seconds)
_ATTEMPT = threading.local()


class DeadlineExceeded(TimeoutError):
    """A socket wait reached the attempt's deadline. A ``TimeoutError`` (so
    ``socket.timeout``): urllib3 wraps it as it wraps any read timeout."""


def _deadline_message(seconds: float) -> str:
    return f"deadline of {seconds}s exceeded"


class _DeadlineReader(io.RawIOBase):
    """The raw reader under an ``http.client`` response: before each
    ``recv`` the socket's timeout becomes ``min(timeout, deadline left)``, so
    no byte of the status line, the headers or the body is waited for past
    the deadline, however slowly the bytes come."""

    def __init__(self, raw: io.RawIOBase, sock, deadline_at: float, seconds: float, timeout: float | None):
        super().__init__()
        self._raw, self._sock = raw, sock
        self._deadline_at, self._seconds, self._timeout = deadline_at, seconds, timeout

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buf) -> int | None:
        left = self._deadline_at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(_deadline_message(self._seconds))
        capped = self._timeout is None or left < self._timeout
        self._sock.settimeout(left if capped else self._timeout)
        try:
            return self._raw.readinto(buf)
        except TimeoutError as e:
            if capped or time.monotonic() >= self._deadline_at:
                raise DeadlineExceeded(_deadline_message(self._seconds)) from e
            raise

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                super().close()


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` is given in place of the socket: it
    only calls ``makefile``. The socket's own ``makefile`` keeps its reference
    count, so a connection closed while its response is read stays open
    until the response is done, as with a plain socket."""

    def __init__(self, sock, deadline_at: float, seconds: float):
        self._sock, self._deadline_at, self._seconds = sock, deadline_at, seconds

    def makefile(self, mode: str = "rb", *args, **kwargs):
        raw = self._sock.makefile(mode, buffering=0)
        reader = _DeadlineReader(raw, self._sock, self._deadline_at, self._seconds, self._sock.gettimeout())
        return io.BufferedReader(reader)


class _DeadlineHTTPResponse(http.client.HTTPResponse):
    """urllib3 reads the status line, the headers and the body through this
    (``HTTPConnection.response_class``); in a :class:`SafeFetcher` attempt
    its reads obey the attempt's deadline."""

    def __init__(self, sock, *args, **kwargs):
        deadline = getattr(_ATTEMPT, "deadline", None)
        if deadline is not None:
            sock = _DeadlineSocket(sock, *deadline)
        super().__init__(sock, *args, **kwargs)


# ------------------------------------------------------------ the vetted connection


class _VettedConnectionMixin:
    """Replaces urllib3's ``_new_conn``: resolve once, vet, connect to the
    vetted literal, verify the peer; and reads responses through
    :class:`_DeadlineHTTPResponse`. ``policy`` and ``resolver`` are bound by
    ``stages.common.fetch._bind`` per fetcher."""

    policy: AddressPolicy
    resolver: Resolver
    response_class = _DeadlineHTTPResponse

    def _new_conn(self) -> socket.socket:
        host = self._dns_host.strip("[]")
        try:
            infos = self.resolver(host, self.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e
        allowed, refused = [], []
        for family, _, _, _, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            why = self.policy.refusal(ip)
            if why:
                refused.append((str(ip), why))
            elif family in (socket.AF_INET, socket.AF_INET6):
                allowed.append((family, sockaddr, ip))
        if not allowed:
            raise BlockedAddress(self.host, refused)
        last: OSError | None = None
        deadline = getattr(_ATTEMPT, "deadline", None)
        for family, sockaddr, ip in allowed:
            timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
            if deadline is not None:
                # several addresses are tried in turn: all within the deadline
                left = deadline[0] - time.monotonic()
                if left <= 0:
                    raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from DeadlineExceeded(
                        _deadline_message(deadline[1])
                    )
                timeout = left if timeout is None else min(timeout, left)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for opt in self.socket_options or ():
                    sock.setsockopt(*opt)
                if timeout is not None:
                    sock.settimeout(timeout)
                sock.connect(sockaddr)
                peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
            except OSError as e:
                sock.close()
                last = e
                continue
            if peer != ip or self.policy.refusal(peer):
                sock.close()
                raise BlockedAddress(self.host, [(str(peer), "peer_changed")])
            return sock
        if isinstance(last, (socket.timeout, TimeoutError)):
            raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from last
        raise NewConnectionError(self, f"failed to connect to {self.host}: {last}") from last


class _VettedHTTPConnection(_VettedConnectionMixin, HTTPConnection):
    pass


class _VettedHTTPSConnection(_VettedConnectionMixin, HTTPSConnection):
    pass
