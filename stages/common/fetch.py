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

Where the parts are: :mod:`stages.common.fetch_address` (which addresses
may be connected to), :mod:`stages.common.fetch_connection` (the vetted
connections and the deadline on every socket wait),
:mod:`stages.common.fetch_body` (the opt-out header, the byte cap, the
content codings), :mod:`stages.common.fetch_errors` (a failure named as a
reason); this module is the client that drives them, one attempt and one
redirect hop at a time. The names callers use are all importable from here.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin

import urllib3
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import LocationValueError

# what callers import from here (this module's names before the split) is re-exported
from pairforge.stages.common.fetch_address import METADATA_ADDRESSES, AddressPolicy, BlockedAddress, IPAddress  # noqa: F401
from pairforge.stages.common.fetch_body import _discard, read_body, robots_disallowed  # noqa: F401
from pairforge.stages.common.fetch_connection import (  # noqa: F401
    _ATTEMPT,
    DeadlineExceeded,
    Resolver,
    _deadline_message,
    _VettedHTTPConnection,
    _VettedHTTPSConnection,
)
from pairforge.stages.common.fetch_errors import _classify, _deadline_hit, _Failure, error_text  # noqa: F401
from pairforge.stages.common.inflate import _CHUNK, MAX_CONTENT_CODINGS, ContentDecoder, TooManyCodings  # noqa: F401

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE = frozenset({"timeout", "connection_error", "truncated"})
#: the product token robots.txt groups and ``X-Robots-Tag`` directives are matched against
PRODUCT_TOKEN = "pairforge"


def transient(reason: str) -> bool:
    """Whether a failure may pass if tried later: a timeout, a broken
    connection, a truncated body, a 5xx or a 429 answer."""
    return reason in _RETRYABLE or reason.startswith("http_5") or reason == "http_429"


def default_user_agent(contact: str | None = None, version: str | None = None) -> str:
    """pairforge's own User-Agent: its product token and version, and where a
    site owner can learn who crawls (``contact``: a URL or an e-mail
    address). Not a browser string: it would hide who we are from the robots.txt
    groups written for us, and CDNs answer stale browser strings with 403."""
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("pairforge")
        except metadata.PackageNotFoundError:
            version = "0"
    agent = f"{PRODUCT_TOKEN}/{version}"
    return f"{agent} (+{contact.strip()})" if contact and contact.strip() else agent


def product_token(agent: str) -> str:
    """The product token of a User-Agent string (its first ``name/version``
    word's name, lower-case), RFC 9309's way of naming a crawler."""
    first = agent.strip().split()[0] if agent.strip() else PRODUCT_TOKEN
    return first.split("/")[0].lower() or PRODUCT_TOKEN


def _bind(policy: AddressPolicy, resolver: Resolver) -> dict[str, type]:
    """urllib3's pool classes for one fetcher, their connections bound to its
    ``policy`` and ``resolver``. Made here, so the classes' module (which a
    connection's ``repr`` may show in an error text) stays
    ``stages.common.fetch``."""
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
        user_agent: str | None = None,
        user_agent_token: str | None = None,
        disallowed_header_directives: Sequence[str] = ("noai", "noimageai", "noindex", "noimageindex"),
        tdm_reservation: bool = True,
        pool_size: int = 32,
        resolver: Resolver = socket.getaddrinfo,
    ):
        self.policy = AddressPolicy(allow_networks)
        self.timeout, self.deadline = timeout, deadline
        self.retries, self.max_redirects, self.max_bytes = retries, max_redirects, max_bytes
        agent = user_agent or default_user_agent()
        self.agent = agent
        self.token = (user_agent_token or product_token(agent)).strip().lower()
        self.directives = {d.strip().lower() for d in disallowed_header_directives} or None
        self.tdm = tdm_reservation
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

    def refused_host(self, host: str) -> tuple[str, dict] | None:
        """``("blocked_address", detail)`` when ``host`` (a URL's host, as
        :func:`~stages.common.frontier.host_and_origin` gives it) is an IP
        literal the policy refuses (the detail a fetch would give), else
        ``None``: its rows can end before any request, robots.txt's
        included. Names are left to the fetch, which checks every address
        they resolve to."""
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None
        why = self.policy.refusal(ip)
        if not why:
            return None
        e = BlockedAddress(host, [(str(ip), why)])
        return "blocked_address", {"error": str(e), "host": e.host, "refused": e.refused}

    def fetch(self, url, max_bytes: int | None = None, truncate: bool = False) -> Fetched:
        """Download ``url``, at most ``max_bytes`` (default the fetcher's; with
        ``truncate`` the first ``max_bytes`` of a longer body rather than a
        failure). One free extra try is given to a connection that broke
        before any answer (a keep-alive connection the server closed). The
        fetcher's own ``retries`` are immediate; the download stage spaces
        its retries per host instead (``stages/common/frontier.py``) and
        builds its fetcher with none."""
        tries, free = 0, 1
        while True:
            got = self._attempt(url, max_bytes or self.max_bytes, truncate)
            if not got.reason or not transient(got.reason):
                return got
            if got.detail.pop("stale", False) and free:
                free -= 1
                continue
            if tries >= self.retries:
                if tries:
                    got.detail["attempts"] = tries + 1
                return got
            tries += 1

    def _attempt(self, url, max_bytes: int, truncate: bool) -> Fetched:
        out = Fetched(url=url if isinstance(url, str) else repr(url))
        started = time.monotonic()
        _ATTEMPT.deadline = (started + self.deadline, self.deadline)
        try:
            return self._attempt_within_deadline(url, out, started, max_bytes, truncate)
        finally:
            _ATTEMPT.deadline = None

    def _attempt_within_deadline(self, url, out: Fetched, started: float, max_bytes: int, truncate: bool) -> Fetched:
        try:
            out.final_url = _checked_url(url)
            for _ in range(self.max_redirects + 1):
                resp = self._get(out.final_url, started)
                out.http_status = resp.status
                if resp.status not in REDIRECT_CODES:
                    out.body = read_body(
                        resp,
                        started,
                        deadline=self.deadline,
                        max_bytes=max_bytes,
                        directives=self.directives,
                        token=self.token,
                        truncate=truncate,
                        tdm=self.tdm,
                    )
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
