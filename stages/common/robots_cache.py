"""One robots.txt fetch per origin per process, shared by a download
worker's threads, and one per run when the pipeline gives it a store.

Why a lock per origin: the first thread to ask about an origin fetches its
robots.txt; the others asking about that origin wait for that fetch, not
for a second one. A single lock held while fetching would make every thread
of the worker wait on the slowest robots.txt (a deadline's worth of
seconds); the global lock here only guards the table of origins, never a
fetch.

Why a store: a resumed run, and every node of a cluster, should read the
robots.txt a run already fetched rather than ask the site again (and all
agree on what it said). The store is the pipeline's (files in the run's
work dir): ``read(name) -> bytes | None`` and ``write(name, data)``, names
from :func:`store_name`. What it holds is JSON, checked when read; a file
that does not read, names another origin or is older than ``max_age``
(RFC 9309 2.4: a cached robots.txt should not be used for more than 24
hours) is fetched again. Two nodes that meet the same origin at the same
time may both fetch it; the later write wins, both are equally valid.

Why a bound on the origins held: a worker of a web-scale run meets millions
of origins, and a parsed robots.txt of 1 KB takes about 22 KB of memory; the
least recently used are dropped past ``max_origins`` (10,000 by default,
about 220 MB for such files) and read again from the store when there is
one, fetched again when not.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

from pairforge.stages.base import require
from pairforge.stages.common.robots import (
    ALLOWED,
    DEFAULT_TOKEN,
    RobotsFile,
    RobotsPolicy,
    Verdict,
    check_token,
    origin_of,
)

log = logging.getLogger(__name__)

#: RFC 9309 2.4: a cached robots.txt should not be used for more than 24 hours
MAX_AGE = 24 * 3600.0


class Store(Protocol):
    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None: ...


def store_name(origin: str) -> str:
    """A safe file name for ``origin``'s stored :class:`RobotsFile`: the
    origin's SHA-1 in hex, so nothing a URL holds reaches a path."""
    return hashlib.sha1(origin.encode("utf-8")).hexdigest() + ".json"


class _Slot:
    __slots__ = ("lock", "policy")

    def __init__(self):
        self.lock = threading.Lock()
        self.policy: RobotsPolicy | None = None


class RobotsCache:
    """Each origin's :class:`RobotsPolicy`, its robots.txt fetched by
    ``fetch_file(origin)`` (e.g. ``functools.partial(fetch_robots, get)``)
    at most once per process. Thread-safe.

    ``counts`` says how the files came: ``robots_fetched``,
    ``robots_from_store``, ``robots_fetch_raised`` (``fetch_file`` raised:
    the origin is disallowed for this process and nothing is stored)."""

    def __init__(
        self,
        fetch_file: Callable[[str], RobotsFile],
        store: Store | None = None,
        *,
        token: str = DEFAULT_TOKEN,
        ai_tokens: tuple[str, ...] = (),
        max_crawl_delay: float = 10.0,
        max_age: float = MAX_AGE,
        max_origins: int = 10_000,
    ):
        check_token(token)
        for t in ai_tokens:
            check_token(t, "ai_tokens")
        require(max_crawl_delay >= 0, "max_crawl_delay", max_crawl_delay, ">= 0")
        require(max_age > 0, "max_age", max_age, "> 0")
        require(isinstance(max_origins, int) and max_origins > 0, "max_origins", max_origins, "a positive int")
        self.fetch_file, self.store = fetch_file, store
        self.token, self.ai_tokens = token, tuple(ai_tokens)
        self.max_crawl_delay, self.max_age, self.max_origins = max_crawl_delay, max_age, max_origins
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # guards _slots and counts; never held while fetching
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def check(self, url) -> Verdict:
        """Whether ``url`` may be fetched. A URL that is not http(s) is let
        through: the fetcher rejects it as ``invalid_url`` itself."""
        origin = origin_of(url)
        if origin is None:
            return ALLOWED
        return self.policy(origin).decide(url)

    def crawl_delay(self, origin: str) -> float | None:
        """The seconds ``origin`` asks between our requests, at most
        ``max_crawl_delay``; ``None`` when it asks nothing."""
        return self.policy(origin).bounded_crawl_delay

    def policy(self, origin: str) -> RobotsPolicy:
        """``origin``'s policy (an :func:`origin_of` string), fetched or read
        from the store on first use; threads asking meanwhile wait for it."""
        with self._lock:
            slot = self._slots.get(origin)
            if slot is None:
                slot = self._slots[origin] = _Slot()
                self._evict()
            else:
                self._slots.move_to_end(origin)
        policy = slot.policy
        if policy is not None:
            return policy
        with slot.lock:
            if slot.policy is None:
                file = self._load(origin)
                slot.policy = RobotsPolicy(file, self.token, self.ai_tokens, self.max_crawl_delay)
            return slot.policy

    def _evict(self) -> None:
        """Drop the least recently used finished origins past ``max_origins``
        (an origin being fetched stays: its waiters hold its slot)."""
        excess = len(self._slots) - self.max_origins
        if excess <= 0:
            return
        victims = []
        for origin, slot in self._slots.items():  # oldest first; usually the first one will do
            if slot.policy is not None:
                victims.append(origin)
                if len(victims) == excess:
                    break
        for origin in victims:
            del self._slots[origin]

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _load(self, origin: str) -> RobotsFile:
        name = store_name(origin)
        stored = self._read(name, origin)
        if stored is not None:
            self._count("robots_from_store")
            return stored
        try:
            file = self.fetch_file(origin)
        except Exception as e:  # noqa: BLE001 - one origin's failure, not the job's
            log.warning("robots.txt of %s: fetch_file raised %r; disallowed for this process", origin, e)
            self._count("robots_fetch_raised")
            return RobotsFile(origin, "disallow_all", 0, "", f"fetch raised {type(e).__name__}: {e}"[:500], time.time())
        self._count("robots_fetched")
        if self.store is not None:
            try:
                self.store.write(name, file.to_json())
            except OSError as e:
                log.warning("robots.txt of %s: not stored (%s)", origin, e)
        return file

    def _read(self, name: str, origin: str) -> RobotsFile | None:
        if self.store is None:
            return None
        try:
            data = self.store.read(name)
            if data is None:
                return None
            file = RobotsFile.from_json(data)
        except (OSError, ValueError) as e:
            log.warning("robots.txt of %s: stored copy %s unreadable (%s); fetched again", origin, name, e)
            return None
        if file.origin != origin or abs(time.time() - file.fetched_at) > self.max_age:
            return None
        return file
