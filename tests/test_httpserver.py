"""The local test server, read with the standard library's own client."""

from __future__ import annotations

import http.client
import socket

import pytest

from pipeline.httpserver import LocalHTTPServer, Route


@pytest.fixture(scope="module")
def server():
    routes = {
        "/a.bin": Route(
            b"0123456789",
            "application/x-test",
            headers=[("X-Robots-Tag", "noai"), ("X-Robots-Tag", "otherbot: noindex")],
        ),
        "/moved": Route(redirect="/a.bin"),
        "/moved-perm": Route(redirect="http://example.invalid/x", status=301),
        "/cut": Route(b"x" * 1000, truncate_after=100),
        "/stream": Route(b"y" * 5000, content_length=False, drip=0.01, chunk_size=1000),
        "/teapot": Route(b"short and stout", "text/plain", status=418),
    }
    with LocalHTTPServer(routes) as s:
        yield s


def get(server, path, timeout=5.0):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    conn.request("GET", path)
    return conn, conn.getresponse()


def test_binds_loopback_on_a_free_port(server):
    assert server.host == "127.0.0.1" and server.port > 0
    assert server.url("a.bin") == f"http://127.0.0.1:{server.port}/a.bin"


def test_body_headers_and_keep_alive(server):
    conn, r = get(server, "/a.bin")
    assert (r.status, r.read()) == (200, b"0123456789")
    assert r.getheader("Content-Type") == "application/x-test"
    assert r.headers.get_all("X-Robots-Tag") == ["noai", "otherbot: noindex"]
    conn.request("GET", "/a.bin?v=2")  # same connection, query ignored for routing
    assert conn.getresponse().read() == b"0123456789"
    conn.close()


def test_status_redirects_and_unknown_paths(server):
    assert get(server, "/teapot")[1].status == 418
    r = get(server, "/moved")[1]
    assert (r.status, r.getheader("Location")) == (302, "/a.bin")
    r = get(server, "/moved-perm")[1]
    assert (r.status, r.getheader("Location")) == (301, "http://example.invalid/x")
    assert get(server, "/nothing-here")[1].status == 404


def test_cut_transfer_and_close_delimited_body(server):
    r = get(server, "/cut")[1]
    assert r.getheader("Content-Length") == "1000"
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    r = get(server, "/stream")[1]
    assert r.getheader("Content-Length") is None
    assert r.read() == b"y" * 5000


def test_delay_and_hit_counts():
    with LocalHTTPServer({"/slow": Route(b"late", delay=1.0)}) as s:
        with pytest.raises(socket.timeout):
            get(s, "/slow", timeout=0.2)[1].read()
        assert s.hits["/slow"] == 1
        s.routes["/slow"] = Route(b"now")  # routes can change while serving
        assert get(s, "/slow")[1].read() == b"now"
        assert s.hits["/slow"] == 2
