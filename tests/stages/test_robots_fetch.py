"""Fetching robots.txt and keeping it (RFC 9309 2.3-2.5; stages/common/robots.py's
``fetch_robots``, robots_cache.py), against loopback servers posing as
several hosts, each on its own 127.0.23.x address, through the project's
SafeFetcher: what each answer means, redirects across hosts, the deadline,
the 500 KiB parse and the second cap, X-Robots-Tag on the file; one fetch
an origin for 16 threads, the store, stale and broken stored files. What a
file says is test_robots_rules.py's."""

from __future__ import annotations

import functools
import json
import threading
import time

import pytest

from pairforge.pipeline.httpserver import Route
from pairforge.stages.common.robots import MAX_ROBOTS_BYTES, RobotsFile, RobotsPolicy, fetch_robots, origin_of
from pairforge.stages.common.robots_cache import RobotsCache, store_name
from tests import robotskit
from tests.robotskit import DEADLINE, RULES, DirStore, SafeGet, closed_port_origin, fetched, origin, text

site, get = robotskit.site, robotskit.get


# ------------------------------------------------------------ what a fetch means


@pytest.mark.parametrize(
    "route, outcome",
    [
        (Route(b"gone", "text/plain", status=404), "allow_all"),
        (Route(b"no", "text/plain", status=403), "allow_all"),
        (Route(b"slow down", "text/plain", status=429), "disallow_all"),
        (Route(b"oops", "text/plain", status=500), "disallow_all"),
        (Route(b"later", "text/plain", status=503), "disallow_all"),
    ],
)
def test_status_outcomes(site, get, route, outcome):
    file, server = fetched(site, get, {"/robots.txt": route})
    assert file.outcome == outcome and file.status == route.status
    assert file.error == f"http_{route.status}"
    verdict = RobotsPolicy(file).check(server.url("/img.jpg"))
    assert verdict.allowed is (outcome == "allow_all")
    if not verdict.allowed:
        assert verdict.reason == "robots_disallowed"
        assert verdict.detail["robots_outcome"] == "disallow_all"
        assert verdict.detail["robots_status"] == route.status


def test_unreachable_is_disallow_all(get):
    where = closed_port_origin()
    file = fetch_robots(get, where)
    assert file.outcome == "disallow_all" and file.status == 0
    assert file.error.startswith("connection_error")
    assert not RobotsPolicy(file).check(where + "/a.jpg").allowed


def test_redirects_are_followed_across_hosts(site, get):
    """Five redirects (RFC 9309 2.3.1.2 asks at least five), one of them to
    another host: that file's rules apply to the first host's URLs."""
    elsewhere = site({"/real-robots.txt": text("User-agent: *\nDisallow: /moved-rules/\n")})
    hops = {"/robots.txt": Route(redirect="/hop1")}
    hops |= {f"/hop{i}": Route(redirect=f"/hop{i + 1}") for i in range(1, 4)}
    hops["/hop4"] = Route(redirect=elsewhere.url("/real-robots.txt"), status=301)
    file, server = fetched(site, get, hops)
    assert file.outcome == "rules", file
    assert not RobotsPolicy(file).check(server.url("/moved-rules/a.jpg")).allowed
    assert RobotsPolicy(file).check(server.url("/a.jpg")).allowed
    assert elsewhere.hits["/real-robots.txt"] == 1


def test_too_many_redirects_is_unavailable(site, get):
    hops = {"/robots.txt": Route(redirect="/hop1")}
    hops |= {f"/hop{i}": Route(redirect=f"/hop{i + 1}") for i in range(1, 7)}
    file, server = fetched(site, get, hops)
    assert file.outcome == "allow_all" and file.error.startswith("too_many_redirects")
    assert server.hits["/hop5"] == 1 and server.hits["/hop6"] == 0


def test_a_trickle_past_the_deadline_is_unreachable(site, get):
    body = ("User-agent: *\nAllow: /\n" + "# padding\n" * 200).encode()
    started = time.monotonic()
    file, _ = fetched(site, get, {"/robots.txt": Route(body, "text/plain", drip=0.2, chunk_size=8)})
    took = time.monotonic() - started
    assert file.outcome == "disallow_all" and file.error.startswith("timeout"), file
    assert DEADLINE - 0.1 <= took <= DEADLINE + 0.75


def test_a_large_file_parses_its_first_500_kib(site, get):
    """A 2 MiB robots.txt: the first 500 KiB are parsed (RFC 9309 2.5), the
    line the cut falls in is dropped whole (cut short, ``Disallow:
    /cut-here-...`` would rule ``/cut``), and what comes after is not read."""
    head = "User-agent: *\nDisallow: /early/\n"
    straddling = "Disallow: /cut-here-and-longer\n"
    pad = "# " + "x" * 97 + "\n"
    body = head + pad * ((MAX_ROBOTS_BYTES - len(head) - 10) // len(pad))
    body += " " * (MAX_ROBOTS_BYTES - 10 - len(body)) + straddling
    body += "Disallow: /late/\n" + pad * ((2 * 1024 * 1024 - len(body)) // len(pad))
    assert len(body) > 2 * 1024 * 1024 - 100 and body.index(straddling) < MAX_ROBOTS_BYTES < body.index("/late/")
    file, server = fetched(site, get, {"/robots.txt": text(body)})
    assert file.outcome == "rules" and file.truncated and len(file.body) <= MAX_ROBOTS_BYTES
    policy = RobotsPolicy(file)
    assert not policy.check(server.url("/early/a.jpg")).allowed
    assert policy.check(server.url("/late/a.jpg")).allowed
    assert policy.check(server.url("/cut")).allowed
    # this SafeFetcher refuses a body over its cap rather than cut it: a
    # second request, under the higher cap, brings the file
    assert server.hits["/robots.txt"] == 2 and get.caps == [MAX_ROBOTS_BYTES, 10 * 1024 * 1024]


def test_a_file_over_the_second_cap_is_unreachable(site, get):
    file, server = fetched(site, get, {"/robots.txt": Route(b"#" * (10 * 1024 * 1024 + 1), "text/plain")})
    assert file.outcome == "disallow_all" and file.error.startswith("too_many_bytes")


def test_x_robots_tag_on_robots_txt(site):
    """Sites send ``X-Robots-Tag: noindex`` on their robots.txt (to keep it
    out of search results): a fetcher built with header directives refuses
    it, which is reported as unreachable with a reason that says what to
    change; built without, as SafeGet is, the file is read."""
    routes = {"/robots.txt": text("User-agent: *\nDisallow: /no/\n", headers={"X-Robots-Tag": "noindex"})}
    server = site(routes)
    strict = SafeGet(header_directives=("noindex",))
    refused = fetch_robots(strict, origin(server))
    strict.close()
    assert refused.outcome == "disallow_all" and "X-Robots-Tag" in refused.error
    plain = SafeGet()
    assert fetch_robots(plain, origin(server)).outcome == "rules"
    plain.close()


# ------------------------------------------------------------ the cache


def test_cache_fetches_once_with_16_threads(site, get):
    """16 threads ask about one origin at once while its robots.txt takes
    0.5 s to answer: one request; and a second origin asked meanwhile is
    not held up behind the first (no lock is held across origins)."""
    slow = site({"/robots.txt": text("User-agent: *\nDisallow: /no/\n", delay=0.5)})
    other = site({"/robots.txt": text("User-agent: *\nAllow: /\n", delay=0.5)})
    cache = RobotsCache(functools.partial(fetch_robots, get))
    barrier = threading.Barrier(17)
    verdicts: list = []

    def ask(server, path):
        barrier.wait()
        verdicts.append(cache.check(server.url(path)))

    threads = [threading.Thread(target=ask, args=(slow, f"/no/{i}.jpg")) for i in range(16)]
    threads.append(threading.Thread(target=ask, args=(other, "/no/x.jpg")))
    for t in threads:
        t.start()
    started = time.monotonic()
    for t in threads:
        t.join(10)
    took = time.monotonic() - started
    assert slow.hits["/robots.txt"] == 1 and other.hits["/robots.txt"] == 1
    assert sum(not v.allowed for v in verdicts) == 16 and len(verdicts) == 17
    assert took < 0.9, f"origins fetched one after another ({took:.2f}s)"
    assert cache.counts["robots_fetched"] == 2


def test_store_round_trip(site, get, tmp_path):
    server = site({"/robots.txt": text(RULES)})
    store = DirStore(tmp_path / "robots")
    first = RobotsCache(functools.partial(fetch_robots, get), store)
    url = server.url("/private/x.jpg")
    verdict = first.check(url)
    assert not verdict.allowed and server.hits["/robots.txt"] == 1
    name = store_name(origin_of(url))
    assert [p.name for p in store.root.iterdir()] == [name] and len(name) == 45
    second = RobotsCache(functools.partial(fetch_robots, get), store)
    assert second.check(url) == verdict and second.check(server.url("/ok.jpg")).allowed
    assert server.hits["/robots.txt"] == 1 and second.counts == {"robots_from_store": 1}


def test_stale_or_broken_stored_files_are_fetched_again(site, get, tmp_path):
    server = site({"/robots.txt": text("User-agent: *\nDisallow: /\n")})
    where = origin(server)
    store = DirStore(tmp_path)
    stale = RobotsFile(where, "allow_all", 404, "", "http_404", fetched_at=time.time() - 25 * 3600)
    store.write(store_name(where), stale.to_json())
    cache = RobotsCache(functools.partial(fetch_robots, get), store)
    assert not cache.check(where + "/a.jpg").allowed  # RFC 9309 2.4: not used past 24 hours
    for junk in (b"\x80not json", b"[]", json.dumps({"format": 1, "origin": where}).encode()):
        store.write(store_name(where), junk)
        assert not RobotsCache(functools.partial(fetch_robots, get), store).check(where + "/a.jpg").allowed
    assert server.hits["/robots.txt"] == 4
    fresh = RobotsFile.from_json(store.read(store_name(where)))
    assert fresh.outcome == "rules" and fresh.origin == where


def test_a_fetch_that_raises_disallows_and_stores_nothing(tmp_path):
    def broken(origin: str) -> RobotsFile:
        raise RuntimeError("bug")

    store = DirStore(tmp_path)
    cache = RobotsCache(broken, store)
    verdict = cache.check("http://127.0.23.250:9/a.jpg")
    assert not verdict.allowed and "RuntimeError" in verdict.detail["robots_error"]
    assert cache.counts == {"robots_fetch_raised": 1} and store.writes == 0


def test_cache_keeps_at_most_max_origins():
    calls: list[str] = []

    def answer(origin: str) -> RobotsFile:
        calls.append(origin)
        return RobotsFile(origin, "allow_all", 404, "", "http_404")

    cache = RobotsCache(answer, max_origins=2)
    for host in ("a", "b", "a", "c", "a", "b"):
        cache.check(f"http://{host}.test/x")
    # a is used often enough to stay; b is dropped when c comes, and fetched again
    assert calls == ["http://a.test:80", "http://b.test:80", "http://c.test:80", "http://b.test:80"]
