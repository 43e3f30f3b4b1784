"""Many web hosts on loopback, each its own address and listening socket,
that push back the way real hosts do and count what a crawler did to them.

Why not ``pipeline.httpserver``: that is one threaded server on one address;
a politeness test needs tens or hundreds of *hosts* (distinct 127.x.y.z
addresses: the whole 127.0.0.0/8 routes to ``lo``), each answering after a
delay without a thread per request, and each keeping score. One asyncio loop
(in a thread, or a process of its own for benchmarks) serves them all.

A host's :class:`Rule` says how it behaves: answer after ``delay`` seconds;
with ``limit``, answer ``429`` + ``Retry-After`` when more than ``limit``
requests are in flight (counted as nginx's ``limit_conn`` does: requests
whose headers were read and whose answer is not yet sent); ``first_429``
answers the first image request ``429`` with that ``Retry-After``, and
``throttle_at`` the first one after that ``time.time()``, ``throttle_after``
the first one after that many images were served (both with
``retry_after``: the requests before it are answered, not racing it);
``fail_until`` answers ``503`` until that ``time.time()``, ``fail_first``
for that many seconds from the first request it gets; ``robots`` is its
robots.txt (404 when ``None``). Its :class:`Score`: requests, the most in
flight at once, requests that arrived with ``limit`` already in flight
(``over_limit``), ``429``s sent, and requests that arrived before a
``Retry-After`` it had sent was over (``early``), leaving out those that
came within ``grace`` seconds of the ``429``: a client cannot take back a
request it sent before the answer reached it (on loopback, that is well
under the 20 ms default).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    delay: float = 0.0
    limit: int | None = None
    retry_after: float = 1.0
    first_429: float | None = None
    throttle_at: float | None = None
    throttle_after: int | None = None
    fail_until: float | None = None
    fail_first: float | None = None
    robots: bytes | None = None


@dataclass
class Score:
    requests: int = 0
    images: int = 0
    robots: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    over_limit: int = 0
    sent_429: int = 0
    sent_503: int = 0
    early: int = 0
    paused_until: float = 0.0
    sent_429_at: float = 0.0
    first_at: float = 0.0
    arrivals: list = field(default_factory=list)  # (time, path)
    agents: set = field(default_factory=set)  # User-Agent headers seen


def free_port(ips: list[str]) -> int:
    """A port free on every one of ``ips``."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        try:
            for ip in ips[1:]:
                with socket.socket() as t:
                    t.bind((ip, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every address")


def addresses(n: int, second: int = 77) -> list[str]:
    """``n`` distinct loopback addresses, 127.<second>.x.y."""
    return [f"127.{second}.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


class HostSim:
    """``rules``: address -> :class:`Rule`; ``image``: the bytes every
    ``/img/...`` path answers. ``with HostSim(...) as sim`` serves in a
    thread; ``sim.url(ip, path)``, ``sim.scores[ip]``."""

    def __init__(self, rules: dict[str, Rule], image: bytes, port: int | None = None, grace: float = 0.02):
        self.rules, self.image, self.grace = rules, image, grace
        self.port = port or free_port(list(rules))
        self.scores = {ip: Score() for ip in rules}
        self._first: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._servers: list = []

    def url(self, ip: str, path: str) -> str:
        return f"http://{ip}:{self.port}{path}"

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> HostSim:
        self._thread = threading.Thread(target=self.serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("host simulator did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        if self._thread is not None:
            self._thread.join(10)

    async def _stop(self) -> None:
        for s in self._servers:
            s.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    def serve(self) -> None:
        """Serve until the loop is stopped (in this thread)."""
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._servers = [
            loop.run_until_complete(asyncio.start_server(self._conn(ip), ip, self.port, backlog=1024))
            for ip in self.rules
        ]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    # ------------------------------------------------------------ HTTP

    def _conn(self, ip: str):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else "/"
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"user-agent:"):
                            self.scores[ip].agents.add(line[11:].strip().decode("latin-1"))
                    status, headers, body = await self._answer(ip, path)
                    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers, "", ""]
                    writer.write("\r\n".join(lines).encode() + body)
                    await writer.drain()
                    self.scores[ip].in_flight -= 1
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        return handle

    async def _answer(self, ip: str, path: str) -> tuple[int, list[str], bytes]:
        rule, sc = self.rules[ip], self.scores[ip]
        now = time.time()
        sc.requests += 1
        sc.arrivals.append((now, path))
        if rule.limit is not None and sc.in_flight >= rule.limit:
            sc.over_limit += 1
        if sc.sent_429_at + self.grace < now < sc.paused_until:
            sc.early += 1
        sc.in_flight += 1
        sc.max_in_flight = max(sc.max_in_flight, sc.in_flight)
        if path == "/robots.txt":
            sc.robots += 1
            return (404, [], b"") if rule.robots is None else (200, ["Content-Type: text/plain"], rule.robots)
        if rule.fail_first is not None and not sc.first_at:
            sc.first_at = now
        failing = rule.fail_until is not None and now < rule.fail_until
        failing |= rule.fail_first is not None and now < sc.first_at + rule.fail_first
        if failing:
            sc.sent_503 += 1
            return 503, [], b""
        if rule.first_429 is not None and ip not in self._first:
            self._first.add(ip)
            return self._too_many(sc, now, rule.first_429)
        throttle = rule.throttle_at is not None and now >= rule.throttle_at
        throttle |= rule.throttle_after is not None and sc.images >= rule.throttle_after
        if throttle and ip not in self._first:
            self._first.add(ip)
            return self._too_many(sc, now, rule.retry_after)
        if rule.limit is not None and sc.in_flight > rule.limit:
            return self._too_many(sc, now, rule.retry_after)
        if rule.delay:
            await asyncio.sleep(rule.delay)
        sc.images += 1
        return 200, ["Content-Type: image/jpeg"], self.image

    @staticmethod
    def _too_many(sc: Score, now: float, seconds: float) -> tuple[int, list[str], bytes]:
        sc.sent_429 += 1
        sc.sent_429_at = now
        sc.paused_until = max(sc.paused_until, now + seconds)
        return 429, [f"Retry-After: {seconds:g}"], b""
