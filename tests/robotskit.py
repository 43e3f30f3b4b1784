"""Helpers for the robots.txt tests (tests/stages/test_robots_rules.py,
test_robots_fetch.py): loopback servers posing as many hosts (each its own
127.0.23.x address and listening socket), the fetch that
:func:`stages.common.robots.fetch_robots` takes, built on the project's
SafeFetcher, a directory store like the one the pipeline keeps in a run's
work dir, and the rules file both read."""

from __future__ import annotations

import itertools
import os
import socket
import threading
from pathlib import Path

import pytest

from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.stages.common.fetch import SafeFetcher
from pairforge.stages.common.robots import RobotsFile, fetch_robots

#: every trickle in these tests is cut by this deadline, never by the timeout
DEADLINE, TIMEOUT = 1.5, 5.0

RULES = """\
# a site that lets only pairforge in, and not everywhere
User-agent: *
Disallow: /

User-agent: PairForge
Disallow: /private/
Allow: /private/public/
Disallow: /*.gif$
Disallow: /tmp*/cache
Allow: /tie
Disallow: /tie
Disallow: /fish$
Disallow: /%7Ejoe/
Disallow: /caf\u00e9/
Disallow: /a%2Fb
Crawl-delay: 2.5

User-agent: pair
Disallow: /pair-only/
"""

_addresses = (f"127.0.23.{n}" for n in itertools.count(1))
_lock = threading.Lock()


def next_address() -> str:
    with _lock:
        return next(_addresses)


@pytest.fixture
def site():
    """``site(routes) -> LocalHTTPServer`` on a fresh loopback address: one
    host of the web, with its own ``hits``."""
    started: list[LocalHTTPServer] = []

    def make(routes: dict[str, Route]) -> LocalHTTPServer:
        server = LocalHTTPServer(routes, host=next_address()).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def get():
    """A :class:`SafeGet`, closed after the test."""
    g = SafeGet()
    yield g
    g.close()


def fetched(site, get, routes) -> tuple[RobotsFile, LocalHTTPServer]:
    """robots.txt of a new host serving ``routes``, and the host."""
    server = site(routes)
    return fetch_robots(get, origin(server)), server


def closed_port_origin() -> str:
    """An origin nothing listens on: a port bound and released."""
    with socket.socket() as s:
        s.bind((next_address(), 0))
        host, port = s.getsockname()[:2]
    return f"http://{host}:{port}"


def origin(server: LocalHTTPServer) -> str:
    return f"http://{server.host}:{server.port}"


class SafeGet:
    """``get(url, max_bytes=...)`` over SafeFetcher, one fetcher per cap (its
    ``fetch`` takes no cap yet). Built as the download stage should build
    its robots.txt fetch: loopback allowed, 5 redirects, and no
    X-Robots-Tag check (``header_directives=()``)."""

    def __init__(self, header_directives: tuple[str, ...] = (), deadline: float = DEADLINE):
        self._kw = dict(
            allow_networks=("127.0.0.0/8",),
            max_redirects=5,
            timeout=TIMEOUT,
            deadline=deadline,
            disallowed_header_directives=header_directives,
            user_agent_token="pairforge",
        )
        self._fetchers: dict[int, SafeFetcher] = {}
        self._lock = threading.Lock()
        self.caps: list[int] = []  # the cap of every call, in order

    def __call__(self, url: str, *, max_bytes: int):
        with self._lock:
            self.caps.append(max_bytes)
            fetcher = self._fetchers.get(max_bytes)
            if fetcher is None:
                fetcher = self._fetchers[max_bytes] = SafeFetcher(max_bytes=max_bytes, **self._kw)
        return fetcher.fetch(url)

    def close(self) -> None:
        for fetcher in self._fetchers.values():
            fetcher.close()


class DirStore:
    """The store a RobotsCache reads and writes: files in a folder, written
    to a temporary name and renamed."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.writes = 0

    def read(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None

    def write(self, name: str, data: bytes) -> None:
        tmp = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)
        self.writes += 1


def text(body: str, **kw) -> Route:
    return Route(body.encode("utf-8"), "text/plain", **kw)
