"""The run's host gate when many processes fetch: it lends each process a
*share* of a host's connections, and the process starts requests from its
share without asking again (:class:`~stages.common.hostshare_client.ShareClient`).

Why shares rather than a gate call per request. On Ray the gate is one
actor; asking it before every request and telling it after costs two actor
round trips a row, which on a 2-core machine took more than half of the
download throughput (``bench/download.py``: 620 images/s with a gate in each
process, 275 with one call per request). Distributed crawlers avoid the
same cost by giving a host to one fetcher at a time (Nutch, StormCrawler,
Heritrix's per-host queues); a share is the divisible form of that: the
host's ``connections`` are split among the processes that have rows for it,
max-min fair by what each could use, and a process holding a share needs
the gate again only when its demand changes, when a request fails or at a
pause. The bound still holds for the whole run: slots are lent, never
promised twice, and a process gives slots back before the gate lends them
to another (when a newcomer needs them, the gate lowers the holder's *cap*
and waits for the slots to come back).

What reaches the processes without them asking (:meth:`ShareGate.watch`, a
long poll each process keeps open): slots lent to it, and the state of the
hosts it holds or wants (paused until, down, interval, cap). A ``429`` seen
by one process pauses the host in every other one after one report and
one answer, a few milliseconds, rather than at their next request; requests
already started by then were started before the gate knew.

Figures (requests, answers, 429s) come in the same reports, run-length
encoded, so :meth:`HostGate.stats` reads the same as in process. A process
not heard from for ``lease_seconds`` (its watch renews every second) is
taken for dead and its slots go back to the book. If the gate itself is
restarted with an empty book, each process sees a new ``epoch`` and sends
its whole state again.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from pairforge.stages.common.hostgate import HostGate, Limits


@dataclass
class _Book:
    """One host's shares: slots lent, slots wanted, and the caps sent."""

    alloc: dict[str, int] = field(default_factory=dict)
    want: dict[str, int] = field(default_factory=dict)
    sent: dict[str, tuple] = field(default_factory=dict)  # the host state last sent to each client


@dataclass
class _Client:
    seen: float
    grants: dict[str, int] = field(default_factory=dict)
    hosts: dict[str, tuple] = field(default_factory=dict)


class ShareGate(HostGate):
    """A :class:`HostGate` that also lends shares (:meth:`exchange`,
    :meth:`watch`); its in-process calls keep working beside them."""

    def __init__(self, limits: Limits, seed: int | None = None):
        super().__init__(limits, seed)
        self.epoch = secrets.token_hex(8)
        self._books: dict[str, _Book] = {}
        self._clients: dict[str, _Client] = {}

    def exchange(self, client: str, report: dict) -> dict:
        """Apply one process's report and answer with its mail.

        ``report`` keys (each optional): ``reset`` (the whole state follows:
        ``held`` and ``want`` replace what the book had of this client),
        ``held`` {host: slots}, ``give`` {host: slots given back}, ``want``
        {host: slots it could use}, ``rows`` {host: rows}, ``requests``
        {host: requests started}, ``events`` [(host, outcome, retry_after,
        status, n)] in the order they happened, ``interval`` {host: s},
        ``last_start`` {host: time}. The mail: ``epoch``, ``grants`` {host:
        slots lent now}, ``hosts`` {host: (paused_until, down, next_start,
        interval, cap)}."""
        with self._cv:
            now = time.time()
            c = self._client(client, now)
            touched = set(self._expire(now))
            if report.get("reset"):
                touched.update(self._forget(client))
                for host, n in report.get("held", {}).items():
                    self._book(host).alloc[client] = int(n)
                    touched.add(host)
            for host, n in report.get("rows", {}).items():
                self._host(host).rows += int(n)
            for host, n in report.get("requests", {}).items():
                self._host(host).requests += int(n)
            for host, seconds in report.get("interval", {}).items():
                h = self._host(host)
                h.interval = max(self.limits.interval, float(seconds))
                touched.add(host)
            for host, t in report.get("last_start", {}).items():
                h = self._host(host)
                h.next_start = max(h.next_start, float(t) + h.interval)
            failed = set()
            for host, outcome, retry_after, status, n in report.get("events", ()):
                self._outcome(self._host(host), now, outcome, retry_after, status, n)
                touched.add(host)
                if outcome != "ok":
                    failed.add(host)
            for host, n in report.get("give", {}).items():
                b = self._book(host)
                b.alloc[client] = max(0, b.alloc.get(client, 0) - int(n))
                touched.add(host)
            for host, n in report.get("want", {}).items():
                self._book(host).want[client] = int(n)
                touched.add(host)
            for host in touched:
                self._rebalance(host, now)
            for host in failed:  # the client holds a failed host until it hears what the gate made of it
                c.hosts[host] = self._book(host).sent.get(client) or self._state(host, None)
            self._cv.notify_all()
            return self._mail(c)

    def watch(self, client: str, timeout: float = 1.0) -> dict:
        """Wait up to ``timeout`` seconds for mail for ``client``; return it
        (an empty mail when none came: the call also says the client lives)."""
        with self._cv:
            end = time.time() + timeout
            c = self._client(client, time.time())
            self._sweep(time.time())
            while not (c.grants or c.hosts):
                left = end - time.time()
                if left <= 0:
                    break
                self._cv.wait(left)
            c.seen = time.time()
            return self._mail(c)

    # ------------------------------------------------------------ the book

    def _rebalance(self, host: str, now: float) -> None:
        """Split the host's slots max-min fair over what its clients want,
        keeping current holders first (no churn); lend free slots to those
        below their share, cap those above it; mail each its host state."""
        b = self._book(host)
        cap_total = self._capacity(host)
        clients = sorted(c for c in {*b.alloc, *b.want} if c in self._clients and (b.alloc.get(c) or b.want.get(c)))
        caps: dict[str, int | None] = dict.fromkeys(clients)
        if cap_total is not None:
            target = dict.fromkeys(clients, 0)
            order = sorted(clients, key=lambda c: -b.alloc.get(c, 0))
            left, more = cap_total, True
            while left > 0 and more:
                more = False
                for c in order:
                    if left and target[c] < b.want.get(c, 0):
                        target[c] += 1
                        left -= 1
                        more = True
            free = cap_total - sum(b.alloc.values())
            for c in clients:
                have = b.alloc.get(c, 0)
                if have > target[c]:
                    caps[c] = target[c]
                elif have < target[c] and free > 0:
                    g = min(target[c] - have, free)
                    b.alloc[c] = have + g
                    free -= g
                    mail = self._clients[c].grants if c in self._clients else {}
                    mail[host] = mail.get(host, 0) + g
        for c in clients:
            state = self._state(host, caps[c])
            if b.sent.get(c) != state and c in self._clients:
                b.sent[c] = state
                self._clients[c].hosts[host] = state
        for c in [c for c in b.sent if c not in clients]:  # gone from the host: told afresh if it comes back
            del b.sent[c]
        for c in [c for c in b.alloc if not b.alloc[c]]:
            del b.alloc[c]
        for c in [c for c in b.want if not b.want[c]]:
            del b.want[c]

    def _state(self, host: str, cap: int | None) -> tuple:
        """What a client is told of a host: (paused_until, down, next_start, interval, cap)."""
        h = self._host(host)
        return (h.paused_until, h.failures >= self.limits.failures_down, h.next_start, h.interval, cap)

    def _sweep(self, now: float) -> None:
        touched = self._expire(now)
        for host in touched:
            self._rebalance(host, now)
        if touched:
            self._cv.notify_all()

    def _capacity(self, host: str) -> int | None:
        """Slots the host has now: ``connections``; one while it has an
        interval (its requests are spaced) or is down (one probe)."""
        h = self._host(host)
        if h.interval > 0 or h.failures >= self.limits.failures_down:
            return 1
        return self.limits.connections

    def _expire(self, now: float) -> list[str]:
        """Take back the slots of clients not heard from for ``lease_seconds``."""
        gone = [c for c, cl in self._clients.items() if cl.seen < now - self.limits.lease_seconds]
        touched = []
        for c in gone:
            del self._clients[c]
            touched += self._forget(c)
        return touched

    def _forget(self, client: str) -> list[str]:
        """Drop what the book holds of ``client``; the hosts it touched."""
        touched = []
        for host, b in self._books.items():
            had = b.alloc.pop(client, 0) + b.want.pop(client, 0)
            if b.sent.pop(client, None) is not None or had:
                touched.append(host)
        return touched

    def _mail(self, c: _Client) -> dict:
        mail = {"epoch": self.epoch, "grants": c.grants, "hosts": c.hosts}
        c.grants, c.hosts = {}, {}
        return mail

    def _client(self, client: str, now: float) -> _Client:
        c = self._clients.get(client)
        if c is None:
            c = self._clients[client] = _Client(seen=now)
        c.seen = now
        return c

    def _book(self, host: str) -> _Book:
        b = self._books.get(host)
        if b is None:
            b = self._books[host] = _Book()
        return b
