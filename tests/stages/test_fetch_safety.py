"""What the download client never does, shown against real servers on
127.0.0.1 (issue 29: behaviour the review found working but untested, and
finding 10): it uses no environment proxy, sends no credentials from a URL
and keeps no cookie, fails a certificate it cannot verify, sends no header
a CR/LF in a URL would inject, survives an answer of 150 header lines,
refuses loopback however it is spelled (hex, short, octal IPv4; IPv6 zone
ids), checks the address it is connected to, follows an https -> http
redirect (decided and documented in docs/security.md), and refuses
``fec0::/10`` and Azure's WireServer."""

from __future__ import annotations

from ipaddress import ip_address as ip

import pytest

from pairforge.stages.common.fetch import AddressPolicy, SafeFetcher
from tests.fetchkit import IMAGE
from tests.rawserver import RawServer, answer
from tests.tlskit import HTTPSServer, make_certs

LOCAL = ("127.0.0.1/32",)


def fetcher(**kw) -> SafeFetcher:
    return SafeFetcher(**{"allow_networks": LOCAL, "timeout": 3.0, "deadline": 5.0, **kw})


# ------------------------------------------------------------------ what is sent


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])
def test_environment_proxies_are_ignored(monkeypatch, var):
    with RawServer({b"/img.png": answer(IMAGE)}) as target, RawServer(host="127.0.3.7") as proxy:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(var, f"http://{proxy.host}:{proxy.port}")
        got = fetcher().fetch(target.url("/img.png"))
        assert (got.reason, got.body) == ("", IMAGE)
        assert proxy.requests == [] and len(target.requests) == 1


def test_credentials_in_a_url_are_not_sent():
    with RawServer({b"/img.png": answer(IMAGE)}) as server:
        got = fetcher().fetch(f"http://alice:s3cret@{server.host}:{server.port}/img.png")
        assert (got.reason, got.body) == ("", IMAGE)
        (request,) = server.requests
        assert b"authorization" not in request.lower() and b"alice" not in request and b"s3cret" not in request


def test_cookies_are_not_kept_between_requests():
    set_cookie = answer(IMAGE, headers=("Set-Cookie: sid=abc123; Path=/", "Set-Cookie: other=1"))
    with RawServer({b"/first.png": set_cookie, b"/second.png": answer(IMAGE)}) as server:
        f = fetcher()
        assert f.fetch(server.url("/first.png")).reason == ""
        assert f.fetch(server.url("/second.png")).reason == ""
        assert all(b"cookie" not in r.lower() for r in server.requests) and len(server.requests) == 2


@pytest.mark.parametrize(
    "tail",
    [
        "/x.png\r\nX-Injected: 1",
        "/x.png\nX-Injected: 1",
        "/x.png%0d%0aX-Injected:%201",
        "/x.png\r\n\r\nGET /smuggled HTTP/1.1",
    ],
)
def test_cr_lf_in_a_url_injects_no_header(tail):
    with RawServer() as server:
        got = fetcher().fetch(server.url(tail))
        assert got.reason in ("", "invalid_url"), got
        for request in server.requests:
            head = request.split(b"\r\n\r\n")[0].split(b"\r\n")
            assert not any(line.lower().startswith(b"x-injected") for line in head), request
            assert b"/smuggled" not in request.split(b"\r\n")[0] or request.startswith(b"GET /x.png%0D%0A")
            assert sum(line.startswith(b"GET ") for line in head) == 1


def test_an_answer_with_too_many_headers_is_a_failed_row_not_a_crash():
    many = answer(IMAGE, headers=tuple(f"X-H{i}: v" for i in range(150)))
    with RawServer({b"/many.png": many}) as server:
        got = fetcher().fetch(server.url("/many.png"))
        assert got.reason == "connection_error" and got.body is None
        assert "more than 100 headers" in got.detail["error"]


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


def test_a_certificate_that_does_not_verify_is_a_connection_error(certs, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with HTTPSServer(certs, {"/img.png": (200, {"Content-Type": "image/png"}, IMAGE)}) as server:
        got = fetcher().fetch(server.url("/img.png"))
        assert got.reason == "connection_error" and got.body is None
        assert "CERTIFICATE_VERIFY_FAILED" in got.detail["error"]
        assert server.hits == []  # no request went over the unverified connection
        # the same server, once its CA is trusted: the failure above was the certificate
        monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
        got = fetcher().fetch(server.url("/img.png"))
        assert (got.reason, got.body) == ("", IMAGE) and server.hits == ["/img.png"]


def test_an_https_to_http_redirect_is_followed_and_recorded(certs, monkeypatch):
    """Decided: followed (docs/security.md). The client sends no credential
    and no cookie over either hop, the URL list itself holds http URLs,
    and img2dataset follows it; the row's ``final_url`` says where the
    image came from."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    with RawServer({b"/plain.png": answer(IMAGE)}) as plain:
        routes = {"/to-http": (302, {"Location": plain.url("/plain.png")}, b"")}
        with HTTPSServer(certs, routes) as server:
            got = fetcher().fetch(server.url("/to-http"))
            assert (got.reason, got.body) == ("", IMAGE)
            assert got.final_url == plain.url("/plain.png") and got.final_url.startswith("http://")
            assert len(plain.requests) == 1


# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    "host", ["0x7f.1", "127.1", "0177.0.0.1", "0x7f000001", "0x7f.0.0.1", "017700000001", "127.0.1"]
)
def test_loopback_spelled_in_hex_short_or_octal_is_refused(host):
    with RawServer() as server:
        got = SafeFetcher(timeout=3.0, deadline=5.0).fetch(f"http://{host}:{server.port}/x.png")
        assert got.reason == "blocked_address", got
        assert [why for _, why in got.detail["refused"]] == ["loopback"]
        assert server.requests == []


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://[fe80::1%25eth0]:{port}/x.png", "link_local"),
        ("http://[fe80::1%25lo]:{port}/x.png", "link_local"),
        ("http://[fe80::1%eth0]:{port}/x.png", "link_local"),
        ("http://[fe80::abcd%251]:{port}/x.png", "link_local"),  # a numeric zone (interface 1)
    ],
)
def test_an_ipv6_zone_id_does_not_carry_an_address_past_the_policy(url, why):
    with RawServer() as server:
        got = SafeFetcher(timeout=3.0, deadline=5.0).fetch(url.format(port=server.port))
        assert got.reason == "blocked_address", got
        assert [w for _, w in got.detail["refused"]] == [why]
        assert server.requests == []
    assert AddressPolicy().refusal(ip("fe80::1%eth0")) == "link_local"


def test_the_connected_peer_is_checked_not_only_the_resolved_address():
    """Connecting to 0.0.0.0 reaches this machine (Linux connects it to
    127.0.0.1): an allow-list that names 0.0.0.0 vets the address, the
    socket's peer is 127.0.0.1, and the peer check refuses it."""
    with RawServer() as server:
        got = SafeFetcher(allow_networks=["0.0.0.0/32"], timeout=3.0, deadline=5.0).fetch(
            f"http://0.0.0.0:{server.port}/x.png"
        )
        assert got.reason == "blocked_address"
        assert got.detail["refused"] == [("127.0.0.1", "peer_changed")]
        assert server.requests in ([], [b""])  # connected, refused before a byte was sent


@pytest.mark.parametrize(
    "address, why",
    [
        ("fec0::1", "site_local"),
        ("feff:ffff::1", "site_local"),
        ("168.63.129.16", "metadata"),
        ("::ffff:168.63.129.16", "metadata"),
        ("64:ff9b::a83f:8110", "metadata"),
    ],
)
def test_site_local_ipv6_and_azures_wireserver_are_refused(address, why):
    """Finding 10: Python calls both global, so both passed."""
    assert AddressPolicy().refusal(ip(address)) == why
    got = SafeFetcher(timeout=3.0, deadline=5.0).fetch(
        f"http://[{address}]/x.png" if ":" in address else f"http://{address}/x.png"
    )
    assert got.reason == "blocked_address" and got.detail["refused"] == [(str(ip(address)), why)]
    assert AddressPolicy().refusal(ip("2606:4700::1111")) == ""  # a global IPv6 still passes
