"""An HTTP client that is safe to point at an untrusted URL list.

img2dataset's ``download_image`` (``urllib.request.urlopen``) follows
redirects by itself and connects wherever DNS says, so a URL list, or any
server it names, can make it fetch from loopback, the private network or a
cloud metadata service. We keep urllib3 for the HTTP (a well-kept library:
pooling, keep-alive, TLS with certificate and hostname checks) and replace
only how a connection picks its address:

* each new connection resolves the host once, drops the addresses the
  :class:`AddressPolicy` refuses, connects to a vetted address literal and
  checks the socket's peer address: what was checked is what is connected
  to, so DNS rebinding has no window;
* redirects are followed here, one hop at a time through the same checked
  connections, up to ``max_redirects``; environment proxies are never used;
* bodies are streamed and cut at ``max_bytes`` decoded bytes; ``gzip`` and
  ``deflate`` content codings (nested too, at most
  :data:`MAX_CONTENT_CODINGS`) are inflated here, from the raw bytes, in steps
  of at most 64 KiB, so a compression bomb costs neither memory nor trust in
  the installed urllib3's decoders;
* an attempt has a ``deadline`` that every socket wait obeys (connect, the
  TLS handshake, the status line, each header byte, the body, every redirect
  hop): each read on the socket waits at most ``min(timeout, deadline
  left)``, so a server that drips its status line, its headers or its body
  cannot hold a thread past the deadline. (DNS resolution, done by the
  system resolver, has its own timeouts and is not covered.)

The ``X-Robots-Tag`` opt-out test is img2dataset's own ``is_disallowed``.
:meth:`SafeFetcher.fetch` never raises for anything a URL or a server does;
its :class:`Fetched` has ``reason`` ``""`` or one of ``invalid_url``,
``blocked_address``, ``timeout``, ``connection_error``, ``truncated``,
``http_<status>``, ``too_many_redirects``, ``too_many_bytes``, ``opted_out``,
``decode_error`` (a ``gzip``/``deflate`` body that does not inflate, or
more than :data:`MAX_CONTENT_CODINGS` codings).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
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

from stages.common.inflate import _CHUNK, MAX_CONTENT_CODINGS, ContentDecoder, TooManyCodings  # noqa: F401

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]

#: Cloud metadata services, named for clear reasons (all are also non-global).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE = frozenset({"timeout", "connection_error", "truncated"})
_DRAIN_LIMIT = 1 << 16
DEFAULT_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


class AddressPolicy:
    """Which IP addresses may be connected to: global unicast only, unless an
    ``allow_networks`` CIDR (e.g. ``"127.0.0.1/32"``) names them.

    An allowed IPv4 network also admits that host written as IPv6 where the
    packets do reach it: IPv4-mapped (``::ffff:a.b.c.d``, the same socket)
    and NAT64 (``64:ff9b::/96``, translated to it). It does not admit the
    6to4 (``2002::/16``) or Teredo (``2001::/32``) addresses that embed it:
    those packets go to a relay and on to some IPv6 host, not to the allowed
    one, so they pass only where the IPv6 address itself is allowed."""

    def __init__(self, allow_networks: Iterable[str] = ()):
        self.allow = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)

    def _allows(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.allow if net.version == ip.version)

    def refusal(self, ip: IPAddress) -> str:
        """``""`` when ``ip`` may be connected to, else why not."""
        if self._allows(ip):
            return ""
        same_host = _same_host_ipv4(ip)
        if same_host is not None and self._allows(same_host):
            return ""
        for candidate in _embedded(ip):
            why = _why_not_global(candidate)
            if why:
                return why
        return ""


def _same_host_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 host an IPv6 address reaches as itself (mapped, NAT64)."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """``ip`` and any IPv4 address it carries (mapped, 6to4, Teredo, NAT64):
    each must be global, since the packets go there (to the host, or to the
    relay in front of it)."""
    out: list[IPAddress] = [ip]
    if ip.version == 6:
        inner = _same_host_ipv4(ip) or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            out.insert(0, inner)
    return out


def _why_not_global(ip: IPAddress) -> str:
    if ip in METADATA_ADDRESSES:
        return "metadata"
    for name in ("loopback", "link_local", "multicast", "private", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return name
    if not ip.is_global:
        return "not_global"
    return ""


class BlockedAddress(Exception):
    """Every address of a host is refused by the policy. Deliberately not an
    ``OSError``: urllib3 lets it through unwrapped and never retries it."""

    def __init__(self, host: str, refused: list[tuple[str, str]]):
        super().__init__(f"{host}: no allowed address ({', '.join(f'{a} {w}' for a, w in refused)})")
        self.host = host
        self.refused = refused


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


def _deadline_hit(e: BaseException) -> bool:
    return any(isinstance(x, DeadlineExceeded) for x in _causes(e))


class _VettedConnectionMixin:
    """Replaces urllib3's ``_new_conn``: resolve once, vet, connect to the
    vetted literal, verify the peer; and reads responses through
    :class:`_DeadlineHTTPResponse`. ``policy`` and ``resolver`` are bound by
    :func:`_bind` per fetcher."""

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


def _bind(policy: AddressPolicy, resolver: Resolver) -> dict[str, type]:
    attrs = {"policy": policy, "resolver": staticmethod(resolver)}
    http_conn = type("VettedHTTPConnection", (_VettedHTTPConnection,), attrs)
    https_conn = type("VettedHTTPSConnection", (_VettedHTTPSConnection,), attrs)
    return {
        "http": type("VettedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("VettedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }


@dataclass
class Fetched:
    """The outcome of one URL. ``reason`` is ``""`` when ``body`` holds the
    image bytes; else ``detail`` holds the values behind the reason."""

    url: str
    reason: str = ""
    body: bytes | None = None
    http_status: int = 0
    final_url: str = ""
    detail: dict = field(default_factory=dict)


class _Failure(Exception):
    def __init__(self, reason: str, http_status: int = 0, **detail):
        super().__init__(reason)
        self.reason, self.http_status, self.detail = reason, http_status, detail


#: X-Robots-Tag directives that take a value after a colon (not user agents)
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


def robots_disallowed(values: Sequence[str], token: str | None, directives: set[str]) -> bool:
    """Whether ``X-Robots-Tag`` header ``values`` forbid us. Each header is a
    comma-separated directive list, optionally led by ``<agent>:``, which
    makes it apply to that agent only (Google's X-Robots-Tag syntax, the
    convention img2dataset follows). Applies to us: lists with no agent, and
    lists for ``token``. (Our own parser: ``img2dataset.downloader`` would
    import the whole img2dataset package, seconds in every fresh worker.)"""
    for value in values:
        agent, sep, rest = value.partition(":")
        agent = agent.strip().lower()
        if sep and "," not in agent and agent not in _VALUED_DIRECTIVES:
            if agent != token:
                continue
            value = rest
        if {d.strip().lower() for d in value.split(",")} & directives:
            return True
    return False


class SafeFetcher:
    """Thread-safe; one per worker, shared by its download threads so
    connections are pooled and reused per host."""

    def __init__(
        self,
        *,
        allow_networks: Sequence[str] = (),
        timeout: float = 10.0,
        deadline: float = 60.0,
        retries: int = 0,
        max_redirects: int = 5,
        max_bytes: int = 20_000_000,
        user_agent_token: str | None = None,
        disallowed_header_directives: Sequence[str] = ("noai", "noimageai", "noindex", "noimageindex"),
        pool_size: int = 32,
        resolver: Resolver = socket.getaddrinfo,
    ):
        self.policy = AddressPolicy(allow_networks)
        self.timeout, self.deadline = timeout, deadline
        self.retries, self.max_redirects, self.max_bytes = retries, max_redirects, max_bytes
        self.token = user_agent_token.strip().lower() if user_agent_token else None
        self.directives = {d.strip().lower() for d in disallowed_header_directives} or None
        agent = DEFAULT_USER_AGENT
        if user_agent_token:
            agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
        # maxsize = threads: no connection is ever discarded for a full pool
        self._pm = urllib3.PoolManager(
            num_pools=max(64, 4 * pool_size),
            maxsize=pool_size,
            block=False,
            retries=False,
            headers={"User-Agent": agent},
        )
        self._pm.pool_classes_by_scheme = _bind(self.policy, resolver)

    def close(self) -> None:
        self._pm.clear()

    def fetch(self, url) -> Fetched:
        """Download ``url`` with retries on timeouts, broken connections and
        5xx/429 answers. One free extra try is given to a connection that
        broke before any answer (a keep-alive connection the server closed)."""
        tries, free = 0, 1
        while True:
            got = self._attempt(url)
            retryable = got.reason in _RETRYABLE or got.reason.startswith("http_5") or got.reason == "http_429"
            if not got.reason or not retryable:
                return got
            if got.detail.pop("stale", False) and free:
                free -= 1
                continue
            if tries >= self.retries:
                if tries:
                    got.detail["attempts"] = tries + 1
                return got
            tries += 1

    def _attempt(self, url) -> Fetched:
        out = Fetched(url=url if isinstance(url, str) else repr(url))
        started = time.monotonic()
        _ATTEMPT.deadline = (started + self.deadline, self.deadline)
        try:
            return self._attempt_within_deadline(url, out, started)
        finally:
            _ATTEMPT.deadline = None

    def _attempt_within_deadline(self, url, out: Fetched, started: float) -> Fetched:
        try:
            out.final_url = _checked_url(url)
            for _ in range(self.max_redirects + 1):
                resp = self._get(out.final_url, started)
                out.http_status = resp.status
                if resp.status not in REDIRECT_CODES:
                    out.body = self._read_body(resp, started)
                    return out
                location = resp.headers.get("Location")
                _discard(resp)
                if not location:
                    raise _Failure(f"http_{resp.status}", resp.status, error="redirect without Location")
                out.final_url = _checked_url(urljoin(out.final_url, location.strip()), redirect_from=out.final_url)
            raise _Failure("too_many_redirects", out.http_status, max_redirects=self.max_redirects)
        except _Failure as f:
            out.reason, out.detail = f.reason, dict(f.detail)
            out.http_status = f.http_status or out.http_status
        except Exception as e:  # noqa: BLE001 - classified into a reason, never raised
            out.reason, out.detail = _classify(e)
            # a socket wait cut short by the deadline (a read, or a connect or
            # TLS handshake given only what was left): said so, in the same
            # words every run (the timeout urllib3 quotes varies)
            late = time.monotonic() - started >= self.deadline - 0.005
            if _deadline_hit(e) or (out.reason == "timeout" and late):
                out.reason, out.detail = "timeout", {"error": _deadline_message(self.deadline)}
        out.body = None
        out.detail["url"] = url_value(url)
        if not isinstance(url, str) and url is not None:
            out.detail["url_type"] = type(url).__name__
        if out.http_status:
            out.detail["http_status"] = out.http_status
        if out.final_url and out.final_url != out.url:
            out.detail["final_url"] = out.final_url
        return out

    def _get(self, url: str, started: float):
        left = self.deadline - (time.monotonic() - started)
        if left <= 0:
            raise _Failure("timeout", error=f"deadline of {self.deadline}s exceeded")
        t = min(self.timeout, left)
        return self._pm.urlopen(
            "GET",
            url,
            redirect=False,
            retries=False,
            preload_content=False,
            timeout=urllib3.Timeout(connect=t, read=t),
        )

    def _read_body(self, resp, started: float) -> bytes:
        status = resp.status
        if not 200 <= status < 300:
            _discard(resp)
            raise _Failure(f"http_{status}", status)
        if self.directives and robots_disallowed(resp.headers.getlist("X-Robots-Tag"), self.token, self.directives):
            _discard(resp)
            raise _Failure("opted_out", status, x_robots_tag=resp.headers.getlist("X-Robots-Tag"))
        length = resp.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > self.max_bytes:
            _close(resp)
            raise _Failure("too_many_bytes", status, content_length=int(length), max_bytes=self.max_bytes)
        encoding = resp.headers.get("Content-Encoding")
        try:
            decoder = ContentDecoder.for_header(encoding)
        except TooManyCodings as e:
            _close(resp)
            raise _Failure("decode_error", status, error=str(e), content_encoding=encoding[:200]) from None
        coded = {"content_encoding": encoding} if decoder else {}
        chunks, total, raw_total = [], 0, 0
        try:
            while True:
                if time.monotonic() - started > self.deadline:
                    raise DeadlineExceeded(_deadline_message(self.deadline))
                # raw bytes, decoded here: urllib3's decoders are not relied on
                raw = resp.read1(min(_CHUNK, self.max_bytes + 1 - raw_total), decode_content=False)
                raw_total += len(raw)
                if raw_total > self.max_bytes:
                    raise _Failure("too_many_bytes", status, bytes_read=raw_total, max_bytes=self.max_bytes, **coded)
                for piece in decoder.feed(raw, final=not raw) if decoder else (raw,):
                    total += len(piece)
                    if total > self.max_bytes:
                        # reported as one past the cap: the size of the last
                        # piece depends on how the bytes arrived
                        raise _Failure(
                            "too_many_bytes", status, bytes_read=self.max_bytes + 1, max_bytes=self.max_bytes, **coded
                        )
                    if piece:
                        chunks.append(piece)
                if not raw:
                    break
        except _Failure:
            _close(resp)
            raise
        except zlib.error as e:
            _close(resp)
            raise _Failure("decode_error", status, error=f"content-encoding {encoding}: {e}", **coded) from None
        except Exception as e:
            _close(resp)
            if _deadline_hit(e):
                raise _Failure("timeout", status, error=_deadline_message(self.deadline), bytes_read=total) from None
            raise
        resp.release_conn()
        return b"".join(chunks)


def url_value(url):
    """``url`` as a detail holds it: a string as it is, ``None`` as ``null``
    and anything else as its text (a NaN as ``"nan"``), so a null URL and a
    NaN URL, one null in parquet, read apart in the rejects."""
    if url is None or isinstance(url, str):
        return url
    return str(url)


def _checked_url(url, redirect_from: str | None = None) -> str:
    where = {"redirect_from": redirect_from} if redirect_from else {}
    if url is None:
        raise _Failure("invalid_url", error="no url (null)", **where)
    if not isinstance(url, str):
        raise _Failure("invalid_url", error=f"not a string: {type(url).__name__} {url_value(url)}", **where)
    if not url.strip():
        raise _Failure("invalid_url", error="empty url", **where)
    url = url.strip()
    try:
        parsed = urllib3.util.parse_url(url)
    except LocationValueError as e:
        raise _Failure("invalid_url", error=str(e), **where) from None
    if (parsed.scheme or "").lower() not in ("http", "https"):
        raise _Failure("invalid_url", error=f"unsupported scheme {parsed.scheme!r}", target=url, **where)
    if not parsed.host:
        raise _Failure("invalid_url", error="no host", target=url, **where)
    return url


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


def _discard(resp) -> None:
    """Finish a response we do not want; keep the connection when that is
    cheap. Read raw, never decoded (urllib3 before 2.6.3 inflated a
    redirect's body in full to drain it), within the attempt's deadline."""
    length = resp.headers.get("Content-Length")
    if length and length.strip().isdigit() and int(length) <= _DRAIN_LIMIT:
        try:
            for _ in range(int(length) + 1):  # at least one byte a read, or the end
                if not resp.read1(_CHUNK, decode_content=False):
                    break
        except Exception:  # noqa: BLE001 - the connection is dropped instead
            _close(resp)
            return
        resp.release_conn()
    else:
        _close(resp)


def _close(resp) -> None:
    resp.close()
    resp.release_conn()
