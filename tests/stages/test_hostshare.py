"""The run's host gate lent out in shares (stages/common/hostshare.py): many
clients (one per process in a run, several in one process here, each with
its own sync threads) against one ShareGate, first by its calls, then as
the download stage's gate against loopback hosts that count what they got.
On Ray, tests/pipeline/test_cluster.py runs the same gate as an actor on two nodes."""

from __future__ import annotations

import threading
import time

import pytest

from pairforge.stages.base import STATUS_OK
from pairforge.stages.common.hostgate import Limits
from pairforge.stages.common.hostshare import ShareGate
from pairforge.stages.common.hostshare_client import ShareClient
from pairforge.stages.download import Config, DownloadStage
from tests.downloadkit import make_batch
from tests.hostsim import HostSim, Rule, addresses
from tests.shardkit import jpeg

LOCAL = ("127.0.0.0/8",)


def _client(gate, limits, threads=8) -> ShareClient:
    c = ShareClient(gate, limits)
    c.open(threads)
    return c


def _take(c: ShareClient, host: str, waiting: int, timeout: float = 2.0) -> int:
    """Leases ``c`` starts for ``host`` within ``timeout`` (asking as a frontier does)."""
    end, got = time.time() + timeout, 0
    while time.time() < end and not got:
        got = c.acquire([(host, waiting)], budget=waiting, wait=0.05)["grants"].get(host, 0)
    return got


def test_shares_split_a_hosts_bound_and_come_back_to_a_newcomer():
    lim = Limits(connections=4)
    gate = ShareGate(lim)
    a, b = _client(gate, lim), _client(gate, lim)
    try:
        assert _take(a, "h", 10) == 4  # alone: the whole bound, after one exchange
        assert b.acquire([("h", 10)], budget=10, wait=0.2)["grants"] == {}  # all four are a's
        # b's demand made the gate cap a at 2: a gives back as its requests end
        for _ in range(4):
            a.release("h")
        assert _take(b, "h", 10) == 2
        assert a.acquire([("h", 10)], budget=10)["grants"] == {"h": 2}
        assert gate._books["h"].alloc == {a.id: 2, b.id: 2}
        assert a.acquire([("h", 10)], budget=10)["grants"] == {}  # a at its share
        for c in (a, a, b, b):
            c.release("h")
    finally:
        a.close(8)
        b.close(8)
    assert gate._books["h"].alloc == {}  # closing gave every slot back
    assert gate.stats()["requests"] == 8


def test_the_bound_holds_whatever_the_clients_do():
    """Four clients, eight threads each, random demand: the slots out never
    exceed the bound, and every row gets its request."""
    lim = Limits(connections=3)
    gate = ShareGate(lim)
    live = {"n": 0, "max": 0, "done": 0}
    lock = threading.Lock()

    def worker(c: ShareClient, rows: int):
        left = rows
        while left:
            got = c.acquire([("h", left)], budget=2, wait=0.05)["grants"].get("h", 0)
            for _ in range(got):
                with lock:
                    live["n"] += 1
                    live["max"] = max(live["max"], live["n"])
            time.sleep(0.002 * got)
            for _ in range(got):
                with lock:
                    live["n"] -= 1
                    live["done"] += 1
                c.release("h")
            left -= got

    clients = [_client(gate, lim) for _ in range(4)]
    threads = [threading.Thread(target=worker, args=(c, 40 + 10 * i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close(8)
    assert live["done"] == 40 + 50 + 60 + 70 and live["max"] <= 3, live
    assert gate.stats()["requests"] == live["done"] and gate.stats()["ok"] == live["done"]


def test_a_retry_after_reaches_the_other_clients_at_once():
    lim = Limits(connections=4)
    gate = ShareGate(lim)
    a, b = _client(gate, lim), _client(gate, lim)
    try:
        assert _take(a, "h", 2) == 2 and _take(b, "h", 2) == 2
        a.release("h", "transient", retry_after=3.0, status=429)
        t = time.time()
        while time.time() - t < 1.0 and b._local("h").paused_until < t + 2.5:
            time.sleep(0.005)
        assert b._local("h").paused_until >= t + 2.5, "b never heard of the pause"
        assert time.time() - t < 0.2  # a report and a watch's answer, not b's next request
        b.release("h")
        assert b.acquire([("h", 2)], budget=2)["paused"]["h"] >= t + 2.5
    finally:
        a.close(8)
        b.close(8)
    assert gate.stats()["http_429"] == 1


def test_without_a_bound_a_process_new_to_a_host_hears_of_its_pause_first():
    lim = Limits(connections=None)
    gate = ShareGate(lim)
    a, b = _client(gate, lim), _client(gate, lim)
    try:
        assert _take(a, "h", 1) == 1  # a's first request to h waits for the gate's word on h
        t = time.time()
        a.release("h", "transient", retry_after=2.0, status=429)
        while a._local("h").unanswered and time.time() - t < 1:
            time.sleep(0.005)
        out = b.acquire([("h", 5)], budget=5, wait=0.3)
        assert out["grants"] == {} and out["paused"]["h"] >= t + 1.9, out
    finally:
        a.close(8)
        b.close(8)
    assert "h" not in a._hosts or a._hosts["h"].paused_until > time.time()  # idle hosts forgotten, pauses kept


def test_a_silent_client_loses_its_slots_and_a_new_gate_gets_the_state_again():
    lim = Limits(connections=2, lease_seconds=0.5)
    gate = ShareGate(lim)
    dead, alive = _client(gate, lim), _client(gate, lim)
    assert _take(dead, "h", 5) == 2

    class Gone:  # a killed worker's calls never reach the gate
        def __getattr__(self, name):
            raise ConnectionError(name)

    dead.remote = Gone()
    dead._stop = True  # and its threads end
    dead._kick.set()
    time.sleep(1.2)  # the watch's last long poll ends
    assert _take(alive, "h", 5, timeout=3.0) >= 1  # after lease_seconds of silence
    assert dead.id not in gate._books["h"].alloc

    class Restarting:  # the actor restarted with an empty book: a new epoch
        def __init__(self, g):
            self.g = g

        def __getattr__(self, name):
            return getattr(self.g, name)

    # a client of a gate that is replaced sends what it holds to the new one
    lim2 = Limits(connections=2)
    remote = Restarting(ShareGate(lim2))
    c = _client(remote, lim2)
    try:
        assert _take(c, "x", 5) == 2
        remote.g = ShareGate(lim2)
        end = time.time() + 3
        while time.time() < end and remote.g._books.get("x") is None:
            time.sleep(0.02)
        assert remote.g._books["x"].alloc == {c.id: 2}
    finally:
        c.close(8)
    alive.close(8)


# ------------------------------------------------------------------ as the download stage's gate


@pytest.fixture(scope="module")
def image():
    return jpeg(48, 40)


def _stages(n: int, lim_kwargs: dict, **cfg) -> tuple[list[DownloadStage], ShareGate]:
    base = Config(allow_networks=LOCAL, image_size=32, **cfg)
    gate = ShareGate(Limits(connections=base.per_host_connections, **lim_kwargs))
    stages = []
    for _ in range(n):
        st = DownloadStage(base)
        st.attach("host_gate", ShareClient(gate, gate.limits))
        stages.append(st)
    return stages, gate


def _run_all(stages, url_lists) -> list:
    outs: list = [None] * len(stages)

    def run(i):
        outs[i] = stages[i].process_batch(make_batch(url_lists[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outs


def test_three_clients_keep_a_hosts_bound_and_its_retry_after(image):
    """Three download stages with their own share clients (three processes
    of a run): a host that answers 429 over 2 in flight never does, and a
    host's Retry-After holds for all three."""
    hot, throttled = addresses(2, second=74)
    rules = {hot: Rule(delay=0.03, limit=2), throttled: Rule(delay=0.05, throttle_after=5, retry_after=2)}
    with HostSim(rules, image, grace=0.2) as sim:
        lists = [
            [sim.url(hot, f"/img/{k}-{i}.jpg") for i in range(20)]
            + [sim.url(throttled, f"/img/{k}-{i}.jpg") for i in range(4)]
            for k in range(3)
        ]
        stages, gate = _stages(3, {}, thread_count=8, per_host_connections=2, retries=1)
        outs = _run_all(stages, lists)
    for out in outs:
        assert list(out["status"]) == [STATUS_OK] * 24, set(out["reason"])
    h, p = sim.scores[hot], sim.scores[throttled]
    assert h.max_in_flight <= 2 and h.over_limit == 0 and h.sent_429 == 0, (h.max_in_flight, h.over_limit)
    assert p.sent_429 == 1 and p.early == 0, [round(t - p.sent_429_at, 3) for t, _ in p.arrivals]
    after = [t for t, _ in p.arrivals if t > p.sent_429_at + sim.grace]
    assert after and min(after) >= p.sent_429_at + 2.0
    st = gate.stats()
    assert st["rows"] == 72 and st["http_429"] == 1 and st["ok"] >= 72
