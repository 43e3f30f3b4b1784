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
from pairforge.stages.common.fetch import transient
from pairforge.stages.common.robots import (
    ALLOWED,
    DEFAULT_TOKEN,
    RobotsFile,
    RobotsPolicy,
    Verdict,
    check_token,
    fetch_robots,
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


def unreadable_reason(file: RobotsFile) -> str:
    """The reason a robots.txt that disallows everything could not be read
    for (``timeout``, ``connection_error``, ``http_503``, ``blocked_address``
    ...), else ``""``."""
    if file.outcome != "disallow_all" or not file.error:
        return ""
    return file.error.split(":", 1)[0].strip()


class SharedRobots:
    """The download frontier's view of robots.txt (``stages/common/frontier.py``):
    lookups that never block, and a fetch made by whichever client the run's
    host gate names, under a lease of the host like any request, so that a
    robots.txt is read once per run across the cluster and counts against
    the host's bounds. Policies are kept per process (least recently used
    dropped past ``max_origins``); the store shares them with the run."""

    def __init__(
        self,
        get: Callable,
        store: Store | None = None,
        *,
        token: str = DEFAULT_TOKEN,
        ai_tokens: tuple[str, ...] = (),
        max_crawl_delay: float = 10.0,
        max_age: float = MAX_AGE,
        max_origins: int = 10_000,
        refetch_failed: bool = False,
    ):
        check_token(token)
        self.refetch_failed = refetch_failed
        self.get, self.store = get, store
        self.token, self.ai_tokens, self.max_crawl_delay = token, tuple(ai_tokens), max_crawl_delay
        self.max_age, self.max_origins = max_age, max_origins
        self._lock = threading.Lock()
        self._policies: OrderedDict[str, RobotsPolicy] = OrderedDict()

    def cached(self, origin: str) -> RobotsPolicy | None:
        with self._lock:
            policy = self._policies.get(origin)
            if policy is not None:
                self._policies.move_to_end(origin)
        return None if policy is None or self._stale(policy.file) else policy

    def check(self, policy: RobotsPolicy, url: str) -> tuple[str, dict]:
        """``(reason, detail)`` for ``url`` under ``policy``; ``reason`` is
        ``""`` when allowed. A robots.txt that could not be read for a
        transient reason (unreachable, 5xx, 429) disallows the origin (RFC
        9309 2.3.1.4), and its rows end with that reason (``timeout``,
        ``http_503`` ...), so that the run's deferred retry tries them again;
        one refused for its address ends ``blocked_address``, as its image would."""
        verdict = policy.decide(url)
        if verdict.allowed:
            return "", {}
        failed = unreadable_reason(policy.file)
        if failed:
            detail = {**policy.file.detail, **verdict.detail, "error": f"robots.txt not read: {policy.file.error}"}
            return failed, detail
        return verdict.reason, verdict.detail

    def _stale(self, file: RobotsFile) -> bool:
        """With ``refetch_failed`` (the deferred retry pass), a file that
        failed transiently is read again."""
        return self.refetch_failed and transient(unreadable_reason(file))

    def stored(self, origin: str) -> RobotsPolicy | None:
        """The policy from the run's store, or ``None`` (absent, stale, unreadable)."""
        if self.store is None:
            return None
        try:
            data = self.store.read(store_name(origin))
            file = RobotsFile.from_json(data) if data is not None else None
        except (OSError, ValueError) as e:
            log.warning("robots.txt of %s: stored copy unreadable (%s); fetched again", origin, e)
            return None
        if file is None or file.origin != origin or abs(time.time() - file.fetched_at) > self.max_age:
            return None
        return None if self._stale(file) else self._keep(origin, file)

    def fetch(self, origin: str) -> tuple[RobotsPolicy, str, bool]:
        """Fetch, store and keep ``origin``'s robots.txt. Returns the policy,
        the file's outcome and whether the host failed transiently (5xx,
        429, unreachable: the host gate backs off as for any request)."""
        file = fetch_robots(self.get, origin)
        if self.store is not None:
            try:
                self.store.write(store_name(origin), file.to_json())
            except OSError as e:
                log.warning("robots.txt of %s: not stored (%s)", origin, e)
        return self._keep(origin, file), file.outcome, transient(unreadable_reason(file))

    def _keep(self, origin: str, file: RobotsFile) -> RobotsPolicy:
        policy = RobotsPolicy(file, self.token, self.ai_tokens, self.max_crawl_delay)
        with self._lock:
            self._policies[origin] = policy
            while len(self._policies) > self.max_origins:
                self._policies.popitem(last=False)
        return policy
