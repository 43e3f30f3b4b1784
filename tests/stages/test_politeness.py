"""Per-host politeness: the host gate's rules, then the download stage
against loopback hosts that count what it did to them (tests/hostsim.py).
The run-wide bound across nodes is in tests/test_cluster_polite.py."""

from __future__ import annotations

import json
import time

import pytest

from pairforge.stages.base import STATUS_OK
from pairforge.stages.common.fetch import default_user_agent, product_token
from pairforge.stages.common.frontier import host_and_origin
from pairforge.stages.common.hostgate import ROBOTS_FETCH, ROBOTS_READY, ROBOTS_WAIT, HostGate, Limits
from pairforge.stages.download import Config, DownloadStage
from tests.downloadkit import make_batch
from tests.hostsim import HostSim, Rule, addresses
from tests.shardkit import jpeg

LOCAL = ("127.0.0.0/8",)

# ------------------------------------------------------------------ the gate


def test_gate_bounds_connections_and_hands_leases_back():
    g = HostGate(Limits(connections=2))
    assert g.acquire([("a", 5)], budget=10)["grants"] == {"a": 2}
    assert g.acquire([("a", 5), ("b", 1)], budget=10)["grants"] == {"b": 1}  # a is at its bound
    g.release("a")
    assert g.acquire([("a", 5)], budget=10)["grants"] == {"a": 1}
    assert g.acquire([("c", 5)], budget=1)["grants"] == {"c": 1}  # the caller's budget holds too


def test_gate_waits_for_a_release_from_another_thread():
    import threading

    g = HostGate(Limits(connections=1))
    g.acquire([("a", 1)], budget=1)
    threading.Timer(0.1, g.release, args=("a",)).start()
    t = time.perf_counter()
    assert g.acquire([("a", 1)], budget=1, wait=2.0)["grants"] == {"a": 1}
    assert 0.05 < time.perf_counter() - t < 1.0


def test_gate_spaces_request_starts():
    g = HostGate(Limits(connections=None, interval=0.2))
    assert g.acquire([("a", 5)], budget=5)["grants"] == {"a": 1}  # one start per interval
    ans = g.acquire([("a", 5)], budget=5)
    assert ans["grants"] == {} and 0.1 < ans["paused"]["a"] - time.time() <= 0.2
    time.sleep(0.21)
    assert g.acquire([("a", 5)], budget=5)["grants"] == {"a": 1}


def test_a_retry_after_pauses_the_host_for_everyone():
    g = HostGate(Limits(connections=4))
    g.acquire([("a", 2)], budget=2)
    g.release("a", "transient", retry_after=0.3, status=429)
    ans = g.acquire([("a", 1), ("b", 1)], budget=2)
    assert ans["grants"] == {"b": 1} and "a" in ans["paused"]
    time.sleep(0.31)
    assert g.acquire([("a", 1)], budget=1)["grants"] == {"a": 1}
    s = g.stats()
    assert s["http_429"] == 1 and s["pauses"] == 1


def test_back_off_doubles_and_a_down_host_is_probed_one_request_at_a_time():
    g = HostGate(Limits(connections=8, backoff=0.05, failures_down=3), seed=0)
    pauses = []
    for _ in range(3):
        while not g.acquire([("a", 1)], budget=1)["grants"]:
            time.sleep(0.01)
        g.release("a", "transient", status=503)
        ans = g.acquire([("a", 1)], budget=1)
        if ans["grants"]:  # not paused: the lease goes back unused
            g.release("a", "none")
        pauses.append(max([*ans["paused"].values(), *ans["down"].values(), time.time()]) - time.time())
    assert pauses[0] <= 0.01  # one failure is not a pattern
    assert 0.02 < pauses[1] <= 0.08 and 0.05 < pauses[2] <= 0.16  # 0.05 x 2**(n-2), jitter 0.5-1.5
    assert "a" in g.acquire([("a", 1)], budget=1)["down"]
    time.sleep(pauses[2] + 0.01)
    assert g.acquire([("a", 8)], budget=8)["grants"] == {"a": 1}  # the probe
    assert g.acquire([("a", 8)], budget=8)["grants"] == {}
    g.release("a", "ok")
    assert g.acquire([("a", 8)], budget=8)["grants"] == {"a": 8}  # up again


def test_a_wave_of_failures_counts_once():
    """Requests in flight when a host starts failing fail together: that is
    one failure of the host, not eight (else 8 concurrent 503s would pause
    it for 2**6 back-offs, and a limit-free crawl of a 429ing host stall)."""
    g = HostGate(Limits(connections=8, backoff=10.0, failures_down=3), seed=0)
    assert g.acquire([("a", 8)], budget=8)["grants"] == {"a": 8}
    for _ in range(8):
        g.release("a", "transient", status=503)
    s = g.stats()
    assert s["transient"] == 8 and s["down"] == 0 and s["pauses"] == 1
    paused = g.acquire([("a", 1)], budget=1)["paused"]["a"] - time.time()
    assert 4.9 < paused <= 15.0  # the second failure's back-off (10 s x 0.5-1.5), not 10 x 2**6


def test_a_lease_not_given_back_expires():
    g = HostGate(Limits(connections=1, lease_seconds=0.1))
    g.acquire([("a", 1)], budget=1)
    assert g.acquire([("a", 1)], budget=1)["grants"] == {}
    time.sleep(0.11)
    assert g.acquire([("a", 1)], budget=1)["grants"] == {"a": 1}


def test_robots_txt_is_claimed_by_one_client():
    g = HostGate(Limits(robots_claim_seconds=0.1))
    assert g.claim_robots(["http://a:80"]) == {"http://a:80": ROBOTS_FETCH}
    assert g.claim_robots(["http://a:80"]) == {"http://a:80": ROBOTS_WAIT}
    time.sleep(0.11)  # the claimant died: the next one fetches
    assert g.claim_robots(["http://a:80"]) == {"http://a:80": ROBOTS_FETCH}
    g.robots_done("http://a:80", "a", "rules")
    assert g.claim_robots(["http://a:80"]) == {"http://a:80": ROBOTS_READY}
    assert g.stats()["robots"] == {"rules": 1}


def test_identity_names_pairforge_not_a_browser():
    agent = default_user_agent("https://example.org/crawler", version="1.2")
    assert agent == "pairforge/1.2 (+https://example.org/crawler)"
    assert product_token(agent) == "pairforge" and product_token("MyBot/2 (x)") == "mybot"
    assert host_and_origin("HTTPS://Img.Example.ORG/a.jpg") == ("img.example.org", "https://img.example.org:443")
    assert host_and_origin("http://[::1]:8080/x") == ("[::1]", "http://[::1]:8080")
    assert host_and_origin("ftp://x/y") == (None, None)


# ------------------------------------------------------------------ the stage against hosts


@pytest.fixture(scope="module")
def image():
    return jpeg(48, 40)


def _run(stage, urls):
    out = stage.process_batch(make_batch(urls))
    return out


def test_a_host_never_sees_more_than_its_bound_and_others_use_the_threads(image):
    hot, cold = addresses(2, second=71)
    rules = {hot: Rule(delay=0.05, limit=2), cold: Rule(delay=0.05)}
    with HostSim(rules, image) as sim:
        urls = [sim.url(hot, f"/img/{i}.jpg") for i in range(30)] + [sim.url(cold, f"/img/{i}.jpg") for i in range(10)]
        stage = DownloadStage(Config(allow_networks=LOCAL, thread_count=16, per_host_connections=2, image_size=32))
        t = time.perf_counter()
        out = _run(stage, urls)
        took = time.perf_counter() - t
    assert list(out["status"]) == [STATUS_OK] * 40, set(out["reason"])
    h, c = sim.scores[hot], sim.scores[cold]
    assert h.max_in_flight <= 2 and h.over_limit == 0 and h.sent_429 == 0
    assert c.max_in_flight <= 2  # the bound is per host, for every host
    assert h.robots == 1 and c.robots == 1  # robots.txt once per origin
    # the hot host's 30 rows at 2 at a time take >= 0.75 s; the cold host's
    # 10 went alongside them, not after them: most hot requests come later
    last_cold = max(t for t, p in c.arrivals)
    assert sum(t > last_cold for t, p in h.arrivals) >= 10, took


def test_no_request_reaches_a_host_before_its_retry_after(image):
    slow, other = addresses(2, second=72)
    # the slow host answers in 0.1 s, and the first request after 0.3 s gets 429 + Retry-After: 2
    rules = {slow: Rule(delay=0.1, throttle_at=time.time() + 0.3, retry_after=2), other: Rule(delay=0.02)}
    with HostSim(rules, image) as sim:
        urls = [sim.url(slow, f"/img/{i}.jpg") for i in range(12)] + [
            sim.url(other, f"/img/{i}.jpg") for i in range(30)
        ]
        stage = DownloadStage(
            Config(allow_networks=LOCAL, thread_count=8, retries=1, image_size=32, per_host_connections=2)
        )
        out = _run(stage, urls)
    s = sim.scores[slow]
    assert s.sent_429 == 1 and s.early == 0, (s.early, s.arrivals)
    # requests sent before the 429 reached us arrive with it; the next wait for its Retry-After
    later = [t for t, p in s.arrivals if t > s.sent_429_at + sim.grace]
    assert later and min(later) >= s.sent_429_at + 2.0
    # the other host was served while the slow one was paused (no thread waited on it)
    other_times = [t for t, p in sim.scores[other].arrivals if p.startswith("/img/")]
    assert max(other_times) < s.sent_429_at + 2.0
    assert (out["status"] == STATUS_OK).sum() == 42  # the 429'd row came back on its retry


def test_retries_back_off_and_a_dead_host_ends_its_rows_at_once(image):
    flaky, dead = addresses(2, second=73)
    # The flaky host answers 503 for 0.5 s from its first image request. Its
    # row's back-offs (0.4 s, then 0.8 s, each x0.5-1.5) bring the third try
    # at least 0.6 s after the first, so it never fails host_failures=3 times
    # in a row (which would put the host down and end the row, whatever the load).
    rules = {flaky: Rule(fail_first=0.5), dead: Rule(fail_until=time.time() + 3600)}
    with HostSim(rules, image) as sim:
        urls = [sim.url(flaky, "/img/0.jpg")] + [sim.url(dead, f"/img/{i}.jpg") for i in range(40)]
        stage = DownloadStage(Config(allow_networks=LOCAL, retries=3, backoff=0.4, host_failures=3, image_size=32))
        t = time.perf_counter()
        out = _run(stage, urls)
        took = time.perf_counter() - t
    assert out["status"][0] == STATUS_OK, (out["reason"][0], out["detail"][0])
    tries = [t for t, path in sim.scores[flaky].arrivals if path != "/robots.txt"]
    assert 2 <= len(tries) <= 3, tries
    assert tries[1] - tries[0] >= 0.4 * 0.5 - 0.01  # backed off, not retried at once
    reasons = list(out["reason"][1:])
    assert reasons.count("host_unavailable") >= 30  # ended without a request
    # robots.txt, then at most a wave of 8 connections per failure that took it down
    assert sim.scores[dead].requests <= 1 + 8 * 3, sim.scores[dead].requests
    assert took < 15


def test_robots_txt_disallows_rows_without_fetching_them(image):
    (ip,) = addresses(1, second=74)
    robots = b"User-agent: *\nDisallow: /private/\n\nUser-agent: GPTBot\nDisallow: /\n"
    with HostSim({ip: Rule(robots=robots)}, image) as sim:
        urls = [sim.url(ip, "/img/a.jpg"), sim.url(ip, "/private/b.jpg")]
        out = _run(DownloadStage(Config(allow_networks=LOCAL, image_size=32)), urls)
        out_off = _run(DownloadStage(Config(allow_networks=LOCAL, image_size=32, robots_txt=False)), urls)

    assert list(out["reason"]) == ["opted_out", "robots_disallowed"]  # GPTBot's group is an AI opt-out
    assert json.loads(out["detail"][1])["robots_rule"] == "Disallow: /private/"
    assert json.loads(out["detail"][0])["robots_token"] == "GPTBot"
    assert list(out_off["status"]) == [STATUS_OK, STATUS_OK]
    assert sum(1 for _, p in sim.scores[ip].arrivals if p.startswith("/private/")) == 1  # only with robots off


def test_user_agent_sent_is_pairforge(image):
    (ip,) = addresses(1, second=75)
    with HostSim({ip: Rule()}, image) as sim:
        stage = DownloadStage(Config(allow_networks=LOCAL, contact="ops@example.org", image_size=32))
        out = _run(stage, [sim.url(ip, "/img/a.jpg")])
    assert out["status"][0] == STATUS_OK
    (agent,) = sim.scores[ip].agents  # robots.txt and the image: the same identity
    assert agent.startswith("pairforge/") and agent.endswith("(+ops@example.org)")
    assert "Mozilla" not in agent and "img2dataset" not in agent


def test_a_refused_address_literal_ends_its_rows_without_robots_txt(image):
    """A URL at an IP literal the address policy refuses ends
    ``blocked_address`` before the frontier: no request reaches the host, and
    its robots.txt is not tried either (it was, refused at the connection,
    and the host figured as a ``disallow_all`` robots.txt)."""
    allowed, refused = addresses(2, second=76)
    with HostSim({allowed: Rule(), refused: Rule()}, image) as sim:
        urls = [sim.url(allowed, "/img/a.jpg"), sim.url(refused, "/img/b.jpg")]
        stage = DownloadStage(Config(allow_networks=[f"{allowed}/32"], image_size=32))
        out = _run(stage, urls)
    figures = stage._worker.gate.stats()
    assert figures["hosts"] == 1 and figures["robots"] == {"allow_all": 1}, figures
    assert list(out["status"]) == [STATUS_OK, "failed"], list(out["reason"])
    assert out["reason"][1] == "blocked_address"
    assert json.loads(out["detail"][1])["refused"] == [[refused, "loopback"]]
    assert sim.scores[refused].requests == 0
    assert sim.scores[allowed].robots == 1
