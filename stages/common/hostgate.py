"""Per-host politeness for a whole run: who may send the next request to a host.

Why one book for the run. A URL list of the real web is skewed: a few CDNs
and hosts hold a large share of the rows, and every download task of every
node has rows for them. Limits kept per task multiply by the number of
tasks in flight; a host that asks us to slow down (``429`` with
``Retry-After``) must be left alone by all of them. So every request start
is granted by one :class:`HostGate`: at most ``connections`` requests in
flight to a host, at least ``interval`` seconds between two starts, and no
start while the host is paused (its ``Retry-After``, or the exponential
back-off after consecutive transient failures, with jitter). The local
runner uses one in its process; on Ray one actor serves a
:class:`~stages.common.hostshare.ShareGate`, which lends each worker
process a share of a host's connections (no actor call a request), so
the bound holds across the cluster. Crawlers that partition their
frontier by host (Nutch, StormCrawler) get the same bound by giving a host
to one task at a time; a gate keeps pairforge's task-per-input-shard plan and makes the bound a
property of the run rather than of how rows were grouped.

What a client does (``stages/common/frontier.py``): it asks for leases for
the hosts it has rows waiting for (:meth:`HostGate.acquire`; the answer
says how many it got per host, which hosts are paused until when and which
are down), starts one request per lease, and gives each lease back with
the request's outcome (:meth:`HostGate.release`), which is how a pause
reaches every task. A lease not given back (a worker that died) expires
after ``lease_seconds``. robots.txt is read once per origin for the whole
run: the first client to :meth:`HostGate.claim_robots` an origin fetches
it, the others wait for :meth:`HostGate.robots_done`.

A host is *down* after ``failures_down`` consecutive transient failures
(timeouts, refused connections, 5xx): until its back-off ends, clients are
told so and end its waiting rows at once (they get the run's deferred
retry later) rather than holding a task for minutes on a dead host; after
it, one request probes the host (a circuit breaker).

Time is ``time.time()`` (comparable across the nodes of a cluster);
everything here is in-memory and O(hosts seen).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

#: robots.txt claim states
ROBOTS_FETCH, ROBOTS_WAIT, ROBOTS_READY = "fetch", "wait", "ready"


def grant_or_wait(cv: threading.Condition, grant, asks, budget: int, deadline: float) -> dict:
    """``grant(asks, budget, now)`` under ``cv`` (held by the caller) until
    it grants a lease or ``deadline`` passes, waking at each notify (a
    release) and when the soonest pause it reported ends."""
    while True:
        out = grant(asks, budget, time.time())
        left = deadline - time.time()
        if out["grants"] or left <= 0:
            return out
        soonest = min([*out["paused"].values(), *out["down"].values()], default=deadline)
        cv.wait(max(0.001, min(left, soonest - time.time())))


def grant_over(asks, budget: int, now: float, look, take) -> dict:
    """The grant rule both gates share: for each ``(host, want)`` in order,
    while ``budget`` lasts, ``look(host, want, now)`` gives ``(paused_until,
    down, next_start, free, spaced)`` (``None``: skip the host for now) and
    ``take(host, n, now)`` records the ``n`` leases granted (one at a time
    for a ``spaced`` host). Returns what :meth:`HostGate.acquire` does."""
    grants: dict[str, int] = {}
    paused: dict[str, float] = {}
    down: dict[str, float] = {}
    for host, want in asks:
        if budget <= 0:
            break
        seen = look(host, want, now)
        if seen is None:
            continue
        paused_until, is_down, next_start, free, spaced = seen
        if paused_until > now:
            (down if is_down else paused)[host] = paused_until
            continue
        if next_start > now:
            paused[host] = next_start
            continue
        n = min(want, budget, free, 1 if spaced else want)
        if n <= 0:
            continue
        take(host, n, now)
        grants[host] = grants.get(host, 0) + n
        budget -= n
    return {"grants": grants, "paused": paused, "down": down}


@dataclass(frozen=True)
class Limits:
    """The per-host rules (the download stage's options of the same meaning)."""

    #: requests in flight to one host from the whole run (``None``: no bound)
    connections: int | None = 8
    #: seconds between two request starts to one host
    interval: float = 0.0
    #: the longest pause a ``Retry-After`` or a back-off may impose
    max_pause: float = 300.0
    #: first back-off after two consecutive transient failures; doubles after each further one
    backoff: float = 1.0
    #: consecutive transient failures after which a host is down until its back-off ends
    failures_down: int = 5
    #: a lease not given back by then is taken back (its worker died)
    lease_seconds: float = 120.0
    #: a robots.txt claim not completed by then goes to the next client
    robots_claim_seconds: float = 120.0


@dataclass
class _Host:
    leases: list[float] = field(default_factory=list)  # expiry times of the leases out
    next_start: float = 0.0
    paused_until: float = 0.0
    interval: float = 0.0
    failures: int = 0
    # figures for the manifest
    rows: int = 0
    requests: int = 0
    ok: int = 0
    transient: int = 0
    http_429: int = 0
    pauses: int = 0
    paused_seconds: float = 0.0
    down: int = 0
    robots: str = ""

    def in_flight(self, now: float) -> int:
        if self.leases and self.leases[0] <= now:
            self.leases = [t for t in self.leases if t > now]
        return len(self.leases)


class HostGate:
    """Thread-safe; one per run (see the module docstring)."""

    def __init__(self, limits: Limits = Limits(), seed: int | None = None):
        self.limits = limits
        self._hosts: dict[str, _Host] = {}
        self._robots: dict[str, tuple[str, float]] = {}  # origin -> (state, claim expiry)
        self._cv = threading.Condition()
        self._rng = random.Random(seed)
        self.clients = 0

    # ------------------------------------------------------------ leases

    def acquire(self, asks: list[tuple[str, int]], budget: int, wait: float = 0.0, rows: dict | None = None) -> dict:
        """Leases for up to ``budget`` requests over ``asks`` (host, rows
        waiting), granted in the order given. Waits up to ``wait`` seconds
        for one when none can be granted at once. ``rows``: rows per host
        the caller is about to fetch (counted for the figures, once).

        Returns ``{"grants": {host: n}, "paused": {host: until},
        "down": {host: until}}``: hosts paused or down until a time, leaving
        out hosts at their connection bound (free again at a release)."""
        deadline = time.time() + max(0.0, wait)
        with self._cv:
            if rows:
                for h, n in rows.items():
                    self._host(h).rows += int(n)
            return grant_or_wait(self._cv, self._grant, asks, budget, deadline)

    def _grant(self, asks, budget: int, now: float) -> dict:
        return grant_over(asks, budget, now, self._look, self._take)

    def _look(self, host: str, want: int, now: float):
        lim, h = self.limits, self._host(host)
        free = want if lim.connections is None else lim.connections - h.in_flight(now)
        if h.failures >= lim.failures_down:  # a down host: one probe at a time
            free = min(free, 1 - h.in_flight(now))
        return h.paused_until, h.failures >= lim.failures_down, h.next_start, free, h.interval > 0

    def _take(self, host: str, n: int, now: float) -> None:
        h = self._host(host)
        h.leases.extend([now + self.limits.lease_seconds] * n)
        h.leases.sort()
        h.requests += n
        if h.interval > 0:
            h.next_start = now + h.interval

    def release(
        self, host: str, outcome: str = "ok", retry_after: float | None = None, status: int = 0, again: bool = False
    ) -> bool:
        """Give one lease of ``host`` back with the request's outcome:
        ``ok`` (any answer that is not a transient failure), ``transient``
        (timeout, broken connection, 5xx, 429) or ``none`` (no request was
        made after all). ``retry_after``: the seconds the host asked for.
        ``again``: take the host's next lease in the same call, under the
        same rules as :meth:`acquire`; returns whether it was granted."""
        with self._cv:
            now = time.time()
            h = self._host(host)
            if h.leases:
                h.leases.pop(0)
            if outcome == "none":
                h.requests -= 1
            else:
                self._outcome(h, now, outcome, retry_after, status)
            granted = again and bool(self._grant([(host, 1)], 1, now)["grants"])
            self._cv.notify_all()
            return granted

    def _outcome(self, h: _Host, now: float, outcome: str, retry_after=None, status: int = 0, n: int = 1) -> None:
        """Count ``n`` answers of one outcome; a transient one may pause the host."""
        if outcome == "ok":
            h.ok += n
            h.failures = 0
            return
        h.transient += n
        h.http_429 += n * (status == 429)
        # a failure while the host is paused answers a request sent
        # before the pause (the same wave): it does not count again
        pause = 0.0
        if now >= h.paused_until:
            h.failures += 1
            if h.failures >= 2:  # back-off doubles from the second failure in a row, full jitter
                pause = self.limits.backoff * 2 ** (h.failures - 2) * self._rng.uniform(0.5, 1.5)
            h.down += h.failures == self.limits.failures_down
        if retry_after is not None:
            pause = max(pause, retry_after)
        self._pause(h, now, min(pause, self.limits.max_pause))

    def open(self, threads: int = 0) -> None:
        """A client starts using the gate (nothing to do in process; see
        :class:`~stages.common.hostshare.ShareClient`)."""

    def close(self, threads: int = 0) -> None:
        """A client is done with the gate (see :meth:`open`)."""

    def set_interval(self, host: str, seconds: float) -> None:
        """At least ``seconds`` between this host's request starts (its
        robots.txt ``Crawl-delay``, bounded by the caller), on top of the
        run's interval."""
        with self._cv:
            h = self._host(host)
            h.interval = max(self.limits.interval, float(seconds))

    def _pause(self, h: _Host, now: float, seconds: float) -> None:
        if seconds <= 0:
            return
        until = now + seconds
        if until > h.paused_until:
            h.pauses += 1
            h.paused_seconds += until - max(now, h.paused_until)
            h.paused_until = until

    def _host(self, host: str) -> _Host:
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host(interval=self.limits.interval)
        return h

    # ------------------------------------------------------------ robots.txt

    def claim_robots(self, origins: list[str]) -> dict[str, str]:
        """For each origin: ``fetch`` (the caller fetches its robots.txt and
        calls :meth:`robots_done`), ``wait`` (another client is fetching it)
        or ``ready`` (stored; read it)."""
        now = time.time()
        out = {}
        with self._cv:
            for o in origins:
                state, until = self._robots.get(o, ("", 0.0))
                if state == ROBOTS_READY:
                    out[o] = ROBOTS_READY
                elif state == ROBOTS_FETCH and until > now:
                    out[o] = ROBOTS_WAIT
                else:
                    self._robots[o] = (ROBOTS_FETCH, now + self.limits.robots_claim_seconds)
                    out[o] = ROBOTS_FETCH
        return out

    def robots_done(self, origin: str, host: str, outcome: str) -> None:
        """The robots.txt of ``origin`` is stored; ``outcome`` (``rules``,
        ``allow_all``, ``disallow_all`` ...) is kept for the figures."""
        with self._cv:
            self._robots[origin] = (ROBOTS_READY, 0.0)
            h = self._host(host)
            h.robots = outcome if not h.robots or h.robots == outcome else "mixed"
            self._cv.notify_all()

    # ------------------------------------------------------------ figures

    def stats(self, top: int = 20) -> dict:
        """Totals over every host and the ``top`` hosts by rows."""
        with self._cv:
            hosts = dict(self._hosts)
            fields = ("rows", "requests", "ok", "transient", "http_429", "pauses", "down")
            total = {f: sum(getattr(h, f) for h in hosts.values()) for f in fields}
            total["paused_seconds"] = round(sum(h.paused_seconds for h in hosts.values()), 3)
            robots: dict[str, int] = {}
            for h in hosts.values():
                if h.robots:
                    robots[h.robots] = robots.get(h.robots, 0) + 1
            order = sorted(hosts.items(), key=lambda kv: (-kv[1].rows, -kv[1].requests, kv[0]))[:top]
            return {
                "hosts": len(hosts),
                **total,
                "robots": dict(sorted(robots.items())),
                "top": [
                    {"host": k, **{f: getattr(h, f) for f in fields}, "robots": h.robots or None} for k, h in order
                ],
            }
