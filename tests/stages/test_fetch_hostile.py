"""The download client against hostile servers (issue 14, findings 1 and 6):
servers that trickle their status line, headers or body, or never answer,
must cost no more than the deadline; an allow-list entry must not admit the
6to4 or Teredo addresses that embed it; a null URL and a NaN URL must read
apart in the rejects. Content codings and compression bombs (finding 3):
tests/stages/test_fetch_hostile_codings.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from ipaddress import ip_address as ip

import numpy as np
import pytest

from pairforge.pipeline.httpserver import LocalHTTPServer, Route, SilentServer
from pairforge.pipeline.local import map_stage
from pairforge.stages.base import STATUS_FAILED, STATUS_OK, object_array
from pairforge.stages.common.fetch import AddressPolicy, SafeFetcher
from pairforge.stages.download import Config, DownloadStage
from tests.fetchkit import DEADLINE, DRIP, IMAGE, LOCAL, TIMEOUT, encoded_routes

#: a row must end within this (the issue: deadline + 1 s)
GRACE = 1.0


# ------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def servers():
    body = IMAGE * 20
    routes = {
        # finding 1: the status line and headers a byte at a time, forever
        "/trickle/head": Route(body, "image/png", head_drip=DRIP, endless_header=True),
        # the status line and a finite head, a byte at a time, longer than the deadline in all
        "/trickle/slow-head": Route(body, "image/png", head_drip=DRIP / 2),
        # a byte of body at a time
        "/trickle/body": Route(body, "image/png", drip=DRIP, chunk_size=1),
        "/trickle/chunked-body": Route(body, "image/png", drip=DRIP, chunk_size=1, chunked=True),
        # the request is read, never answered
        "/hang": Route(hang=True),
        # the deadline spans redirect hops: a fast hop, then a trickle
        "/redirect/to-trickle": Route(redirect="/trickle/head"),
        **encoded_routes(),
    }
    with LocalHTTPServer(routes) as http, SilentServer() as silent:
        yield http, silent


HOSTILE = {
    "trickled head, endless header": "/trickle/head",
    "trickled head": "/trickle/slow-head",
    "trickled body": "/trickle/body",
    "trickled chunked body": "/trickle/chunked-body",
    "request never answered": "/hang",
    "redirect to a trickled head": "/redirect/to-trickle",
    "accepts, never answers": "silent:http",  # the SilentServer
    "accepts, never answers the TLS handshake": "silent:https",
}


def hostile_url(servers, path: str) -> str:
    http, silent = servers
    if path.startswith("silent:"):
        return f"{path.split(':')[1]}://{silent.host}:{silent.port}/x.png"
    return http.url(path)


# ------------------------------------------------------------------ finding 1: the deadline


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_hostile_server_ends_in_timeout_within_the_deadline(servers, case):
    fetcher = SafeFetcher(allow_networks=LOCAL, timeout=TIMEOUT, deadline=DEADLINE)
    t0 = time.monotonic()
    got = fetcher.fetch(hostile_url(servers, HOSTILE[case]))
    took = time.monotonic() - t0
    fetcher.close()
    assert got.reason == "timeout", got.detail
    assert got.detail["error"] == f"deadline of {DEADLINE}s exceeded"
    assert DEADLINE - 0.05 <= took <= DEADLINE + GRACE, took


def test_the_deadline_holds_where_the_read_timeout_is_shorter(servers):
    """timeout < deadline: a silent server ends at the read timeout, as before."""
    fetcher = SafeFetcher(allow_networks=LOCAL, timeout=0.3, deadline=DEADLINE)
    t0 = time.monotonic()
    got = fetcher.fetch(hostile_url(servers, "silent:http"))
    assert got.reason == "timeout" and time.monotonic() - t0 < 0.3 + GRACE
    assert "read timeout=0.3" in got.detail["error"]  # the read timeout's, not the deadline's
    t0 = time.monotonic()
    got = fetcher.fetch(hostile_url(servers, "/trickle/head"))  # each byte inside 0.3 s
    assert got.reason == "timeout" and time.monotonic() - t0 <= DEADLINE + GRACE
    fetcher.close()


def test_a_download_batch_with_hostile_servers_finishes(servers):
    http, _ = servers
    urls = [hostile_url(servers, p) for p in HOSTILE.values()] + [http.url("/ok.png"), http.url("/ok-gzip.png")]
    n = len(urls)
    rows = {
        "key": object_array([f"{i:09d}" for i in range(n)]),
        "shard_id": np.zeros(n, dtype=np.int64),
        "status": object_array([STATUS_OK] * n),
        "stage": object_array([""] * n),
        "reason": object_array([""] * n),
        "detail": object_array(["{}"] * n),
        "url": object_array(urls),
        "caption": object_array([f"caption {i}" for i in range(n)]),
    }
    # every hostile path is on one host: politeness (a connection bound, a host
    # down after 5 timeouts) is lifted, so that the deadline alone is measured
    stage = DownloadStage(
        Config(
            allow_networks=LOCAL,
            timeout=TIMEOUT,
            deadline=DEADLINE,
            thread_count=n,
            image_size=16,
            per_host_connections=None,
            host_failures=n,
        )
    )
    stage.setup()  # the resizer's imports are not the download's time
    done: dict = {}
    worker = threading.Thread(target=lambda: done.setdefault("out", map_stage(stage, rows)), daemon=True)
    t0 = time.monotonic()
    worker.start()
    worker.join(timeout=DEADLINE + 30)
    took = time.monotonic() - t0
    assert "out" in done, f"the batch still runs after {took:.0f} s"
    out = done["out"]
    assert list(out["reason"]) == ["timeout"] * len(HOSTILE) + ["", ""]
    assert list(out["status"]) == [STATUS_FAILED] * len(HOSTILE) + [STATUS_OK, STATUS_OK]
    # a host that never answers times out on its robots.txt first: the row
    # says so ("robots.txt not read: timeout: deadline of ... exceeded")
    assert all(
        json.loads(d)["error"].endswith(f"deadline of {DEADLINE}s exceeded") for d in out["detail"][: len(HOSTILE)]
    )
    assert took <= DEADLINE + GRACE, took


# ------------------------------------------------------------------ finding 6


def test_6to4_and_teredo_are_not_the_ipv4_they_embed():
    policy = AddressPolicy(["127.0.0.1/32"])
    sixtofour = ip("2002:7f00:1::")  # 6to4 of 127.0.0.1
    teredo = ip("2001:0:4136:e378:8000:63bf:80ff:fffe")  # Teredo, client 127.0.0.1
    assert sixtofour.sixtofour == ip("127.0.0.1") and teredo.teredo[1] == ip("127.0.0.1")
    assert policy.refusal(sixtofour) == "loopback"
    assert policy.refusal(teredo) == "loopback"
    # the same host written as IPv6 still passes: mapped, NAT64
    assert policy.refusal(ip("::ffff:127.0.0.1")) == ""
    assert policy.refusal(ip("64:ff9b::7f00:1")) == ""
    # allowed where the 6to4 or Teredo prefix itself is allowed
    assert AddressPolicy(["127.0.0.1/32", "2002::/16"]).refusal(sixtofour) == ""
    assert AddressPolicy(["2001::/32"]).refusal(teredo) == ""
    assert AddressPolicy(["2001::/32"]).refusal(sixtofour) == "loopback"
    # without an allow-list, as before
    assert AddressPolicy().refusal(sixtofour) == "loopback"
    assert AddressPolicy().refusal(ip("2002:a00:1::")) == "private"


@pytest.mark.parametrize("address", ["2002:7f00:1::", "2001:0:4136:e378:8000:63bf:80ff:fffe"])
def test_a_host_resolving_to_6to4_or_teredo_of_an_allowed_ipv4_is_blocked(address):
    def resolver(host, port, family=0, type=0):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]

    fetcher = SafeFetcher(allow_networks=LOCAL, resolver=resolver, timeout=1, deadline=2)
    got = fetcher.fetch("http://relay.test/x.png")
    assert got.reason == "blocked_address" and got.detail["refused"] == [(address, "loopback")]


def test_null_and_nan_urls_read_apart():
    import pyarrow as pa

    urls = [None, float("nan"), np.float64("nan"), "", "None"]
    n = len(urls)
    rows = {
        "key": object_array([f"{i:09d}" for i in range(n)]),
        "shard_id": np.zeros(n, dtype=np.int64),
        "status": object_array([STATUS_OK] * n),
        "stage": object_array([""] * n),
        "reason": object_array([""] * n),
        "detail": object_array(["{}"] * n),
        "url": object_array(urls),
        "caption": object_array(["c"] * n),
    }
    out = map_stage(DownloadStage(Config(thread_count=2)), rows)
    assert list(out["reason"]) == ["invalid_url"] * n
    details = [json.loads(d) for d in out["detail"]]
    assert details[0] == {"url": None, "error": "no url (null)"}
    assert details[1] == {"url": "nan", "url_type": "float", "error": "not a string: float nan"}
    assert details[2] == {"url": "nan", "url_type": "float64", "error": "not a string: float64 nan"}
    assert details[3] == {"url": "", "error": "empty url"}
    assert details[4]["url"] == "None" and "url_type" not in details[4]
    # the url column cannot tell the first two apart once in parquet; the detail can
    assert pa.array(out["url"][:2], from_pandas=True).null_count == 2
    assert len({json.dumps(d, sort_keys=True) for d in details}) == n
