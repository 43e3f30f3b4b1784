"""One process's end of the run's host gate: the :class:`HostGate` calls a
frontier makes (``acquire``, ``release``, ...) answered from the slots the
:class:`~stages.common.hostshare.ShareGate` lent this process.

Why answer here. A frontier asks for a lease before each request and gives
it back after (``stages/common/frontier.py``); in process that is a lock
and a few dict lookups, and this class keeps it so: a request starts when
this process holds a free slot of the host and the host is not paused or
spacing its requests, with no call to the gate. What the gate must know
goes to it in batches from one thread (:meth:`_sync_loop`): at once when a
request failed (it may pause the host for everyone), when this process
wants slots of a host it holds none of, or gives slots back that the gate
asked for; otherwise every ``FLUSH`` seconds (answers counted, demand that
fell, slots no longer needed). A second thread keeps a long poll open at
the gate (:meth:`_watch_loop`) for what the gate sends unasked: slots, and
pauses that other processes caused.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from pairforge.stages.common.hostgate import Limits, grant_or_wait, grant_over

#: the longest the gate goes without hearing of answers, rows and slots not needed
FLUSH = 0.1
#: the gate's long poll; also how often a quiet process says it lives
WATCH = 1.0


@dataclass
class _Local:
    held: int = 0  # slots lent to this process
    busy: int = 0  # requests in flight from it
    want: int = 0  # slots it could use (rows waiting + busy, bounded by threads)
    sent_want: int = 0
    cap: int | None = None  # the gate asked to keep no more than this
    paused_until: float = 0.0
    down: bool = False
    next_start: float = 0.0
    interval: float = 0.0
    unanswered: int = 0  # failures reported whose answer (a pause?) has not come back
    fresh: bool = True  # the gate has not told us of this host yet (a pause another process met?)


class ShareClient:
    """Thread-safe; one per process and gate. ``remote`` has the gate's
    ``exchange``, ``watch``, ``claim_robots``, ``robots_done`` and
    ``stats`` (the :class:`ShareGate` itself in tests, a Ray actor's
    client in a run)."""

    def __init__(self, remote, limits: Limits):
        self.remote, self.limits = remote, limits
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._cv = threading.Condition()
        self._hosts: dict[str, _Local] = {}
        self._asked: set[str] = set()  # the hosts of the last ask: only they can want more than they run
        self._users = 0
        self._threads = 0
        self._epoch: str | None = None
        self._reset = False
        self._stop = True
        self._sync: threading.Thread | None = None
        self._life = threading.Lock()  # open and close, one at a time
        self._kick = threading.Event()  # something the gate must hear of at once
        self._clear()

    def _clear(self) -> None:
        self._give: dict[str, int] = {}
        self._want: dict[str, int] = {}
        self._rows: dict[str, int] = {}
        self._requests: dict[str, int] = {}
        self._events: list[list] = []
        self._interval: dict[str, float] = {}
        self._last_start: dict[str, float] = {}

    # ------------------------------------------------------------ life

    def open(self, threads: int = 0) -> None:
        """A frontier with ``threads`` threads starts (threads bound what a
        host's demand can be); the first one starts the sync threads."""
        with self._life, self._cv:
            self._users += 1
            self._threads += threads
            if self._stop:
                self._stop = False
                self._sync = threading.Thread(target=self._sync_loop, name="hostshare-sync", daemon=True)
                self._sync.start()
                threading.Thread(target=self._watch_loop, name="hostshare-watch", daemon=True).start()

    def close(self, threads: int = 0) -> None:
        """A frontier is done; the last one gives every slot back and sends
        what is left to tell, before it returns (the run's figures are
        read once its tasks have ended)."""
        with self._life:
            with self._cv:
                self._users -= 1
                self._threads -= threads
                if self._users > 0:
                    return
                for host, h in self._hosts.items():
                    h.want = 0
                    self._note_want(host, h)
                    self._trim(host, h)
                self._stop = True
                self._kick.set()
                self._cv.notify_all()
                sync = self._sync
            if sync is not None:
                sync.join()
            with self._cv:  # forget idle hosts (the gate mails their state again when they come back)
                now = time.time()
                for host in [k for k, h in self._hosts.items() if not self._keep(h, now)]:
                    del self._hosts[host]
                self._asked = set()

    @staticmethod
    def _keep(h: _Local, now: float) -> bool:
        return bool(h.held or h.busy or h.unanswered or h.paused_until > now or h.next_start > now)

    # ------------------------------------------------------------ HostGate's calls

    def acquire(self, asks, budget: int, wait: float = 0.0, rows: dict | None = None) -> dict:
        """As :meth:`HostGate.acquire`, from this process's slots."""
        deadline = time.time() + max(0.0, wait)
        with self._cv:
            for host, n in (rows or {}).items():
                self._rows[host] = self._rows.get(host, 0) + int(n)
            cap = max(1, self._threads)
            asked = set()
            for host, waiting in asks:
                h = self._local(host)
                asked.add(host)
                h.want = min(cap, int(waiting) + h.busy)
                self._note_want(host, h)
            if self._users == 1:  # rows of hosts not asked for are paused or waiting for robots.txt
                for host in self._asked - asked:
                    h = self._local(host)
                    if h.want != h.busy:
                        h.want = h.busy
                        self._note_want(host, h)
                        self._trim(host, h)
            self._asked = asked
            return grant_or_wait(self._cv, self._grant, asks, budget, deadline)

    def release(self, host: str, outcome: str = "ok", retry_after=None, status: int = 0, again: bool = False) -> bool:
        """As :meth:`HostGate.release`: the slot is this process's again."""
        with self._cv:
            now = time.time()
            h = self._local(host)
            h.busy = max(0, h.busy - 1)
            h.want = max(0, h.want - 1)  # rows waiting + busy: one row fewer (the next ask says more)
            self._note_want(host, h)
            if outcome == "none":
                self._requests[host] = self._requests.get(host, 0) - 1
            else:
                last = self._events[-1] if self._events else None
                if outcome == "ok" and last and last[0] == host and last[1] == "ok":
                    last[4] += 1
                else:
                    self._events.append([host, outcome, retry_after, status, 1])
                if outcome != "ok":
                    h.unanswered += 1  # no new request until the gate has counted it
                    if retry_after is not None:  # here at once; the gate tells the others
                        h.paused_until = max(h.paused_until, now + min(retry_after, self.limits.max_pause))
                    self._kick.set()
            granted = again and bool(self._grant([(host, 1)], 1, now)["grants"])
            self._trim(host, h)
            self._cv.notify_all()
            return granted

    def set_interval(self, host: str, seconds: float) -> None:
        with self._cv:
            h = self._local(host)
            h.interval = max(self.limits.interval, float(seconds))
            self._interval[host] = h.interval
            self._kick.set()
            self._cv.notify_all()

    def claim_robots(self, origins):
        return self.remote.claim_robots(origins)

    def robots_done(self, origin, host, outcome):
        return self.remote.robots_done(origin, host, outcome)

    def stats(self, top: int = 20):
        return self.remote.stats(top)

    # ------------------------------------------------------------ slots

    def _bounded(self, h: _Local) -> bool:
        return self.limits.connections is not None or h.interval > 0 or h.down

    def _grant(self, asks, budget: int, now: float) -> dict:
        return grant_over(asks, budget, now, self._look, self._take)

    def _look(self, host: str, want: int, now: float):
        h = self._local(host)
        if h.unanswered or (h.fresh and not self._bounded(h)):  # the gate's answer wakes the ask
            return None
        free = h.held - h.busy if self._bounded(h) else want
        return h.paused_until, h.down, h.next_start, free, h.interval > 0

    def _take(self, host: str, n: int, now: float) -> None:
        h = self._local(host)
        h.busy += n
        self._requests[host] = self._requests.get(host, 0) + n
        if h.interval > 0:
            h.next_start = now + h.interval
            self._last_start[host] = now

    def _note_want(self, host: str, h: _Local) -> None:
        if h.want == h.sent_want:
            return
        self._want[host] = h.want
        h.sent_want = h.want
        if h.want > h.held == 0 and (h.fresh or self._bounded(h)):  # rows that cannot start without the gate
            self._kick.set()

    def _trim(self, host: str, h: _Local) -> None:
        """Give back the slots this process cannot use or the gate asked for."""
        keep = min(h.want, h.cap) if h.cap is not None else h.want
        keep = max(h.busy, keep)
        if h.held > keep:
            self._give[host] = self._give.get(host, 0) + h.held - keep
            if h.cap is not None and h.held > h.cap:
                self._kick.set()
            h.held = keep

    def _local(self, host: str) -> _Local:
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Local(interval=self.limits.interval)
        return h

    # ------------------------------------------------------------ talking to the gate

    def _report(self) -> dict:
        report = {
            "give": self._give,
            "want": self._want,
            "rows": self._rows,
            "requests": self._requests,
            "events": [tuple(e) for e in self._events],
            "interval": self._interval,
            "last_start": self._last_start,
        }
        if self._reset:
            report["reset"] = True
            report["held"] = {k: h.held for k, h in self._hosts.items() if h.held}
            report["want"] = {k: h.want for k, h in self._hosts.items() if h.want}
            report["interval"] = {k: h.interval for k, h in self._hosts.items() if h.interval}
            self._reset = False
        self._clear()
        return report

    def _pending(self) -> bool:
        return bool(
            self._give
            or self._want
            or self._rows
            or self._requests
            or self._events
            or self._interval
            or self._last_start
            or self._reset
        )

    def _apply(self, mail: dict) -> None:
        if self._epoch is not None and mail["epoch"] != self._epoch:
            self._reset = True  # a new gate: it gets our whole state
            self._kick.set()
        self._epoch = mail["epoch"]
        for host, n in mail["grants"].items():
            h = self._local(host)
            h.held += n
            self._trim(host, h)
        for host, (paused_until, down, next_start, interval, cap) in mail["hosts"].items():
            h = self._local(host)
            h.fresh = False
            h.paused_until = max(h.paused_until, paused_until)  # never shortened: a 429 here may not be there yet
            h.down, h.interval, h.cap = down, interval, cap
            h.next_start = max(h.next_start, next_start)
            self._trim(host, h)
        self._cv.notify_all()

    def _sync_loop(self) -> None:
        # its own wake-up (not the condition the request threads notify at every answer)
        while True:
            self._kick.wait(0.0 if self._stop else FLUSH)
            self._kick.clear()
            with self._cv:
                if not self._pending():
                    if self._stop:
                        return
                    continue
                report = self._report()
                asked = {}
                for host, outcome, *_ in report["events"]:
                    if outcome != "ok":
                        asked[host] = asked.get(host, 0) + 1
            try:
                mail = self.remote.exchange(self.id, report)
            except Exception:  # noqa: BLE001 - the gate restarting: send the whole state again
                if self._stop:  # closing: what was left to tell is lost with the gate's book
                    return
                time.sleep(FLUSH)
                with self._cv:
                    self._reset = True
                    self._kick.set()
                    for host, n in asked.items():  # failures told again by the whole state: not awaited
                        self._local(host).unanswered -= n
                continue
            with self._cv:
                for host, n in asked.items():
                    self._local(host).unanswered -= n
                self._apply(mail)

    def _watch_loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
            try:
                mail = self.remote.watch(self.id, WATCH)
            except Exception:  # noqa: BLE001 - the gate restarting
                time.sleep(FLUSH)
                continue
            with self._cv:
                self._apply(mail)
