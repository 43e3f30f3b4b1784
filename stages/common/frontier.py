"""One task's crawl frontier: its rows queued per host, started only as the
run's :class:`~stages.common.hostgate.HostGate` grants leases.

Why a frontier inside a task rather than one thread per row. A thread that
waits for its host (paused by a ``Retry-After``, at its connection bound,
or spacing its requests) is a thread other hosts cannot use; a list whose
top host holds 20% of the rows would leave most threads parked on it. Here
rows wait in per-host queues, holding nothing, and a thread is given work
only with a lease in hand: the hot host gets its bound and the other hosts
the rest of the threads.

The loop, on the task's own thread:

* rows of an origin whose robots.txt is not known wait for it; it is read
  from the run's store, or fetched by the one client the gate names (a
  request to the host like any other, under a lease), and each row is then
  checked against it: a disallowed row ends at once, with no request;
* rows ready to go are asked for, least-served hosts first, up to the free
  threads (when none can start, the ask waits up to ``poll`` seconds at the
  gate, which answers at once when any task gives a lease back: a host at
  its bound gets its next request without polling); a granted row runs in a
  thread: fetch, give the lease back with
  the outcome (the gate learns of a 429's ``Retry-After`` at once), then
  decode and resize without holding the lease;
* a transient failure (timeout, broken connection, 5xx, 429) with tries
  left waits ``backoff * 2**(try-1)`` seconds, with jitter, before its
  host's queue takes it again; the host's own pause comes on top;
* a host the gate says is down ends its waiting rows as
  ``host_unavailable`` at once when ``fail_down_fast`` (the run's deferred
  retry pass tries them again), else they wait for its probe.
"""

from __future__ import annotations

import heapq
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pairforge.stages.common.fetch import error_text, transient
from pairforge.stages.common.hostgate import ROBOTS_FETCH, ROBOTS_READY
from pairforge.stages.common.robots import origin_of

#: seconds between two robots.txt claims of an origin another client is fetching
ROBOTS_POLL = 0.05
#: the longest the loop sleeps with nothing to do before looking again
IDLE = 1.0


def host_and_origin(url) -> tuple[str | None, str | None]:
    """The politeness key (the host, as in the origin) and the robots.txt
    origin (``scheme://host:port``) of ``url``; ``(None, None)`` for what is
    not an http(s) URL with a host (the fetcher then names the problem)."""
    origin = origin_of(url)
    if origin is None:
        return None, None
    return origin.partition("://")[2].rpartition(":")[0], origin


@dataclass
class _Job:
    index: int
    url: object
    host: str | None
    origin: str | None
    attempts: int = 0
    not_before: float = 0.0


class Frontier:
    """Runs ``fetch`` then ``finish`` for every URL of one batch under the
    gate's leases; ``fail`` makes the row of a URL that is never fetched.

    ``fetch(url) -> Fetched`` and ``finish(url, fetched, attempts) -> row``
    run in ``pool``'s threads; ``robots`` (optional) gives ``cached(origin)``,
    ``stored(origin)`` and ``fetch(origin) -> (policy, outcome, failed)``
    (``stages.common.robots_cache.SharedRobots``)."""

    def __init__(
        self,
        *,
        gate,
        pool,
        threads: int,
        fetch: Callable,
        finish: Callable,
        fail: Callable,
        refuse: Callable | None = None,
        robots=None,
        retries: int = 0,
        backoff: float = 1.0,
        fail_down_fast: bool = True,
        count_rows: bool = True,
        poll: float = 0.05,
        seed: int | None = None,
    ):
        self.gate, self.pool, self.threads = gate, pool, threads
        self._fetch, self._finish, self._fail = fetch, finish, fail
        self._refuse = refuse  # host -> (reason, detail) of rows that end unfetched (an address literal refused)
        self.robots, self.retries, self.backoff = robots, retries, backoff
        self.fail_down_fast, self.count_rows, self.poll = fail_down_fast, count_rows, poll
        self._rng = random.Random(seed)

    def run(self, urls, decided: list | None = None) -> list:
        """The rows of ``urls``, in order; ``decided``: rows already made
        (not ``None``) for URLs that are not to be fetched."""
        self.results: list = [None] * len(urls)
        self.remaining = len(urls)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.queues: dict[str, deque[_Job]] = {}
        self.delayed: list = []  # (not_before, seq, job)
        self.robots_wait: dict[str, list[_Job]] = {}
        self.robots_todo: dict[str, deque[str]] = {}
        self.robots_next: dict[str, float] = {}
        self.hold: dict[str, float] = {}
        self.served: dict[str, int] = {}
        self.running = 0
        self.queued = 0  # submitted to the pool, not started
        self._lock = threading.Lock()  # queues' pops and ``running``: threads hand rows over too
        rows: dict[str, int] = {}
        refusals: dict[str, tuple | None] = {}
        for i, url in enumerate(urls):
            host, origin = host_and_origin(url)
            job = _Job(i, url, host, origin)
            if decided is not None and decided[i] is not None:
                self._done(job, decided[i])
            elif host is None:  # no request will be made: the fetcher names the problem
                self._submit(self._run_row, job)
            elif (refused := self._refused(host, refusals)) is not None:  # not even its robots.txt
                self._done(job, self._fail(url, refused[0], {"url": url, **refused[1]}))
            else:
                rows[host] = rows.get(host, 0) + 1
                self._place(job)
        self._rows = rows if self.count_rows else {}
        self.gate.open(self.threads)
        try:
            while self.remaining:
                self._step()
        finally:
            self.gate.close(self.threads)
        return self.results

    def _refused(self, host: str, seen: dict) -> tuple | None:
        """``refuse(host)``, asked once per host of the batch."""
        if self._refuse is None:
            return None
        if host not in seen:
            seen[host] = self._refuse(host)
        return seen[host]

    # ------------------------------------------------------------ the loop

    def _step(self) -> None:
        now = time.time()
        while self.delayed and self.delayed[0][0] <= now:
            job = heapq.heappop(self.delayed)[2]
            self.queues.setdefault(job.host, deque()).append(job)
        self._claim_robots(now)
        asks = [
            (h, len(q) + len(self.robots_todo.get(h, ())))
            for h, q in self.queues.items()
            if (q or self.robots_todo.get(h)) and self.hold.get(h, 0.0) <= now
        ]
        asks += [(h, len(o)) for h, o in self.robots_todo.items() if o and h not in self.queues]
        budget = self.threads - self.running
        granted = 0
        if asks and budget > 0:
            asks.sort(key=lambda a: self.served.get(a[0], 0))
            waiting = self.events.empty()
            ans = self.gate.acquire(asks, budget, wait=self.poll if waiting else 0.0, rows=self._rows or None)
            self._rows = {}
            granted = self._use(ans)
        if granted:
            self._drain(block=0.0)
            return
        self._drain(block=0.0 if asks and budget > 0 else self._sleep(now))

    def _sleep(self, now: float) -> float:
        """How long to wait for a thread's event when nothing can start now."""
        wake = [t for t in self.hold.values() if t > now]
        wake += [self.delayed[0][0]] if self.delayed else []
        wake += [t for o, t in self.robots_next.items() if o in self.robots_wait]
        return max(0.0, min([now + IDLE, *wake]) - now)

    def _use(self, ans: dict) -> int:
        n = 0
        for host, k in ans["grants"].items():
            self.served[host] = self.served.get(host, 0) + k
            for _ in range(k):
                todo = self.robots_todo.get(host)
                with self._lock:  # the threads hand rows over too (_next_row)
                    q = self.queues.get(host)
                    job = q.popleft() if q and not todo else None
                if todo:
                    self._submit(self._run_robots, todo.popleft(), host)
                elif job is not None:
                    self._submit(self._run_row, job, leased=True)
                else:
                    self.gate.release(host, "none")
                    continue
                n += 1
        for host, until in ans["paused"].items():
            self.hold[host] = until
        for host, until in ans["down"].items():
            if not self.fail_down_fast:
                self.hold[host] = until
                continue
            with self._lock:
                gone = self.queues.pop(host, ())
            for job in gone:
                detail = {"url": job.url, "host": host, "down_until": round(until, 3)}
                self._done(job, self._fail(job.url, "host_unavailable", detail))
        return n

    def _drain(self, block: float) -> None:
        try:
            ev = self.events.get(timeout=block) if block > 0 else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._event(*ev)
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return

    def _event(self, kind: str, *args) -> None:
        with self._lock:
            self.running -= 1
        if kind == "row":
            job, row = args
            self._done(job, row)
        elif kind == "retry":
            job = args[0]
            job.attempts += 1
            job.not_before = time.time() + self.backoff * 2 ** (job.attempts - 1) * self._rng.uniform(0.5, 1.5)
            heapq.heappush(self.delayed, (job.not_before, job.index, job))
        else:  # robots
            origin, policy = args
            self._robots_known(origin, policy)

    def _done(self, job: _Job, row) -> None:
        self.results[job.index] = row
        self.remaining -= 1

    def _submit(self, fn, *args, **kwargs) -> None:
        with self._lock:
            self.running += 1
            self.queued += 1
        self.pool.submit(self._guard, fn, *args, **kwargs)

    def _guard(self, fn, *args, **kwargs) -> None:
        with self._lock:
            self.queued -= 1
        try:
            self.events.put(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - never lose the event, whatever the thread met
            job = args[0] if args and isinstance(args[0], _Job) else None
            if job is not None:
                self.events.put(("row", job, self._fail(job.url, "internal_error", {"error": error_text(e)})))
            else:
                self.events.put(("robots", args[0], None))

    # ------------------------------------------------------------ in threads

    def _run_row(self, job: _Job, leased: bool = False):
        """Fetch ``job``'s URL (under its lease). When the release brings the
        host's next lease, this thread goes on to the host's next row and
        gives this row's decode and resize to the pool, unless a pool's worth
        of work already waits there: a host's slot never waits for a free
        thread behind other rows' resizing (with a bound of a few
        connections a host, that wait was most of a slot's time)."""
        while True:
            got = nxt = None
            try:
                got = self._fetch(job.url)
            except BaseException as e:  # noqa: BLE001 - this job's row says so (not the first job's)
                if leased:
                    self.gate.release(job.host, "transient")
                return ("row", job, self._fail(job.url, "internal_error", {"error": error_text(e)}))
            if leased:  # the lease goes back with what the host said
                wait = got.detail.get("retry_after") if got.reason else None
                outcome = "transient" if transient(got.reason) else "ok"
                again = outcome == "ok" and bool(self.queues.get(job.host))
                if self.gate.release(job.host, outcome, wait, got.http_status, again=again):
                    nxt = self._next_row(job.host)
            if nxt is None:
                return self._conclude(job, got)
            if self.queued >= self.threads:  # the pool is behind: the next row waits its turn
                self._submit(self._run_row, nxt, leased=True)
                return self._conclude(job, got)
            self._submit(self._conclude, job, got)
            job = nxt

    def _conclude(self, job: _Job, got):
        if transient(got.reason) and job.attempts < self.retries and job.host is not None:
            return ("retry", job)
        return ("row", job, self._finish(job.url, got, job.attempts + 1))

    def _next_row(self, host: str) -> _Job | None:
        """In a thread that just got the host's next lease with its release:
        the host's next row (the lease goes back unused when there is none),
        started without a turn of the task's loop (one gate call a request
        instead of two, and no wait for the loop)."""
        with self._lock:
            q = self.queues.get(host)
            job = q.popleft() if q else None
        if job is None:
            self.gate.release(host, "none")
        return job

    def _run_robots(self, origin: str, host: str):
        policy, outcome, failed = None, "error", True
        try:
            policy, outcome, failed = self.robots.fetch(origin)
        finally:
            self.gate.release(host, "transient" if failed else "ok")
            if policy is not None and policy.bounded_crawl_delay:  # before others may read it
                self.gate.set_interval(host, policy.bounded_crawl_delay)
            self.gate.robots_done(origin, host, outcome)
        return ("robots", origin, policy)

    # ------------------------------------------------------------ robots.txt

    def _place(self, job: _Job) -> None:
        if self.robots is not None:
            policy = self.robots.cached(job.origin)
            if policy is None:
                self.robots_wait.setdefault(job.origin, []).append(job)
                return
            reason, detail = self.robots.check(policy, job.url)
            if reason:
                self._done(job, self._fail(job.url, reason, {"url": job.url, **detail}))
                return
        self.queues.setdefault(job.host, deque()).append(job)

    def _claim_robots(self, now: float) -> None:
        want = [o for o in self.robots_wait if self.robots_next.get(o, 0.0) <= now]
        for origin in [o for o in want if o not in self.robots_next]:
            policy = self.robots.stored(origin)  # by an earlier run or another task: no claim
            if policy is not None:
                self._robots_known(origin, policy)
        want = [o for o in want if o in self.robots_wait]
        if not want:
            return
        for origin, state in self.gate.claim_robots(want).items():
            policy = self.robots.stored(origin) if state == ROBOTS_READY else None
            if policy is not None:
                self._robots_known(origin, policy)
            elif state in (ROBOTS_FETCH, ROBOTS_READY):  # ready but not in our store: read it ourselves
                host = self.robots_wait[origin][0].host
                self.robots_todo.setdefault(host, deque()).append(origin)
                self.robots_next[origin] = float("inf")
            else:
                self.robots_next[origin] = now + ROBOTS_POLL

    def _robots_known(self, origin: str, policy) -> None:
        self.robots_next.pop(origin, None)
        jobs = self.robots_wait.pop(origin, [])
        if policy is None:  # the fetch itself broke: its rows say so
            for job in jobs:
                detail = {"url": job.url, "error": "robots.txt could not be read"}
                self._done(job, self._fail(job.url, "internal_error", detail))
            return
        delay = policy.bounded_crawl_delay
        if delay and jobs:
            self.gate.set_interval(jobs[0].host, delay)
        for job in jobs:
            self._place(job)
