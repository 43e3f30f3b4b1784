"""The local test server, read with the standard library's own client."""

from __future__ import annotations

import http.client
import socket
import time

import pytest

from pairforge.pipeline.httpserver import LocalHTTPServer, Route, SilentServer


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


# ------------------------------------------------------------------ hostile routes


def raw_get(host: str, port: int, path: str, timeout: float) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


def read_for(s: socket.socket, seconds: float) -> bytes:
    """What arrives in ``seconds`` (at most 1000 reads)."""
    got, end = b"", time.monotonic() + seconds
    for _ in range(1000):
        left = end - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            piece = s.recv(4096)
        except TimeoutError:
            break
        if not piece:
            break
        got += piece
    return got


def test_trickled_head_and_endless_header():
    routes = {
        "/head": Route(b"body", "text/plain", head_drip=0.02),
        "/endless": Route(b"", head_drip=0.02, endless_header=True),
    }
    with LocalHTTPServer(routes) as s:
        with raw_get(s.host, s.port, "/endless", 2.0) as c:
            got = read_for(c, 1.0)
        assert got.startswith(b"HTTP/1.1 200 OK\r\nX-Endless: a")
        assert 10 <= len(got) <= 60  # a byte each 20 ms, never a whole head
        assert b"\r\n\r\n" not in got
        with raw_get(s.host, s.port, "/head", 2.0) as c:
            assert len(read_for(c, 0.2)) <= 15
            rest = read_for(c, 8.0)
        assert rest.endswith(b"\r\n\r\nbody") and b"Content-Length: 4\r\n" in rest


def test_chunked_body_and_keep_alive():
    with LocalHTTPServer({"/c": Route(b"z" * 2500, chunked=True, chunk_size=1000)}) as s:
        conn, r = get(s, "/c")
        assert r.getheader("Transfer-Encoding") == "chunked" and r.getheader("Content-Length") is None
        assert r.read() == b"z" * 2500
        conn.request("GET", "/c")  # the same connection
        assert conn.getresponse().read() == b"z" * 2500
        conn.close()


def test_a_hanging_answer_ends_at_its_limit_or_when_the_server_stops():
    with LocalHTTPServer({"/hang": Route(hang=True, drip_limit=0.5), "/forever": Route(hang=True)}) as s:
        with pytest.raises(socket.timeout):
            get(s, "/hang", timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(http.client.RemoteDisconnected):
            get(s, "/hang", timeout=3.0)  # closed, unanswered, after drip_limit
        assert time.monotonic() - t0 < 2.0
        c = raw_get(s.host, s.port, "/forever", 5.0)
        time.sleep(0.1)
    t0 = time.monotonic()  # the server has stopped: the hanging answer closes
    assert read_for(c, 3.0) == b"" and time.monotonic() - t0 < 2.0
    c.close()


def test_silent_server_accepts_and_never_answers():
    with SilentServer() as s:
        assert s.host == "127.0.0.1" and s.url("x") == f"http://127.0.0.1:{s.port}/x"
        with raw_get(s.host, s.port, "/x", 1.0) as c:
            assert read_for(c, 0.3) == b""
            for _ in range(50):  # the accept thread has taken it
                if s.accepted:
                    break
                time.sleep(0.02)
            assert s.accepted == 1


def test_reset_answers_with_a_rst_and_in_flight_names_the_client():
    with LocalHTTPServer({"/reset": Route(reset=True), "/slow": Route(b"late", delay=0.5)}) as s:
        with raw_get(s.host, s.port, "/reset", 2.0) as c:
            with pytest.raises(ConnectionResetError):
                c.recv(10)
        conn = http.client.HTTPConnection(s.host, s.port, timeout=2.0)
        conn.request("GET", "/slow")
        time.sleep(0.2)
        assert s.in_flight() == {conn.sock.getsockname(): "/slow"}
        assert conn.getresponse().read() == b"late"
        conn.close()
        for _ in range(50):  # the handler forgets the request just after its last write
            if not s.in_flight():
                break
            time.sleep(0.02)
        assert s.in_flight() == {} and s.hits["/reset"] == 1
