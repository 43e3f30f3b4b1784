"""What the download stage refuses to fetch, against a real local HTTP
server: addresses that are not global unless allow-listed (loopback, private,
metadata; checked on the address actually connected to, so DNS rebinding has
no say), redirects to such addresses, redirect loops and redirects to other
schemes, bodies past the byte cap, images past the pixel cap (read from the
header only, before a decompression bomb is decoded), and images whose
X-Robots-Tag opts out (read as img2dataset reads it). Every other outcome:
tests/stages/test_download.py."""

from __future__ import annotations

import hashlib
import socket

import pytest

from pairforge.stages.base import STATUS_FAILED, STATUS_OK, run_stage_batch
from pairforge.stages.common.fetch import AddressPolicy, SafeFetcher
from pairforge.stages.download import Config, DownloadStage
from tests import downloadkit
from tests.downloadkit import ASTRONAUT, LOCAL, detail, download, make_batch, outcome

server = downloadkit.server  # this module's own server (module scope)


# ------------------------------------------------------------------ addresses


def test_loopback_is_refused_by_default(server):
    before = server.hits["/blocked-target.jpg"]
    stage = DownloadStage(Config(thread_count=4))
    out = run_stage_batch(
        stage, make_batch([server.url("/blocked-target.jpg"), f"http://localhost:{server.port}/blocked-target.jpg"])
    )
    assert [outcome(out, i) for i in range(2)] == [(STATUS_FAILED, "blocked_address")] * 2
    assert server.hits["/blocked-target.jpg"] == before  # never connected
    assert ["127.0.0.1", "loopback"] in detail(out, 0)["refused"]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.1.2.3/a.jpg",
        "http://192.168.0.1/a.jpg",
        "http://172.16.5.4/a.jpg",
        "http://100.64.0.1/a.jpg",
        "http://0.0.0.0:1/a.jpg",
        "http://224.0.0.1/a.jpg",
        "http://240.0.0.1/a.jpg",
        "http://[::1]/a.jpg",
        "http://[::ffff:127.0.0.1]/a.jpg",
        "http://[fe80::1]/a.jpg",
        "http://2130706433/a.jpg",  # 127.0.0.1 as one decimal number
    ],
)
def test_non_global_addresses_are_refused(url):
    out = download([url], allow_networks=())
    assert outcome(out, 0) == (STATUS_FAILED, "blocked_address")


def test_address_policy():
    policy = AddressPolicy(["127.0.0.1/32"])
    from ipaddress import ip_address as ip

    assert policy.refusal(ip("93.184.216.34")) == ""
    assert policy.refusal(ip("127.0.0.1")) == ""
    assert policy.refusal(ip("::ffff:127.0.0.1")) == ""
    assert policy.refusal(ip("127.0.0.2")) == "loopback"
    assert policy.refusal(ip("169.254.169.254")) == "metadata"
    assert policy.refusal(ip("fd00:ec2::254")) == "metadata"
    assert policy.refusal(ip("2002:a00:1::")) == "private"  # 6to4 carrying 10.0.0.1
    assert policy.refusal(ip("64:ff9b::a9fe:a9fe")) == "metadata"  # NAT64 of 169.254.169.254
    assert AddressPolicy().refusal(ip("127.0.0.1")) == "loopback"


def test_the_checked_address_is_the_connected_address(server):
    """One DNS answer per connection, vetted, then connected to as a literal:
    a resolver that answers differently later (DNS rebinding) has no say."""
    calls = []

    def resolver(host, port, family=0, type=0):
        calls.append(host)
        answers = ["10.0.0.7", "127.0.0.1"] if len(calls) == 1 else ["10.0.0.7"]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers]

    fetcher = SafeFetcher(allow_networks=LOCAL, resolver=resolver)
    got = fetcher.fetch(f"http://images.test:{server.port}/chain3.jpg")
    assert (got.reason, got.body) == ("", ASTRONAUT)
    assert calls == ["images.test"]
    # the pooled connection (to the vetted 127.0.0.1) is reused, no new lookup
    assert fetcher.fetch(f"http://images.test:{server.port}/chain3.jpg").reason == ""
    assert calls == ["images.test"]
    fetcher.close()
    got = fetcher.fetch(f"http://images.test:{server.port}/chain3.jpg")
    assert got.reason == "blocked_address" and got.detail["refused"] == [("10.0.0.7", "private")]


# ------------------------------------------------------------------ redirects


def test_redirect_without_location_or_to_other_scheme(server):
    out = download([server.url("/no-location"), server.url("/to-ftp")])
    assert outcome(out, 0) == (STATUS_FAILED, "http_302")
    assert outcome(out, 1) == (STATUS_FAILED, "invalid_url")
    assert detail(out, 1)["redirect_from"] == server.url("/to-ftp")


def test_redirect_chain_that_ends_ok(server):
    out = download([server.url("/chain1"), server.url("/to-absolute")])
    for i in range(2):
        assert outcome(out, i) == (STATUS_OK, "")
        assert out["sha256"][i] == hashlib.sha256(ASTRONAUT).hexdigest()


@pytest.mark.parametrize("path", ["/to-metadata", "/to-127-0-0-2", "/to-ipv6-loopback"])
def test_redirect_to_a_blocked_address(server, path):
    before = server.hits["/blocked-target.jpg"]
    out = download([server.url(path)])
    assert outcome(out, 0) == (STATUS_FAILED, "blocked_address")
    assert detail(out, 0)["final_url"] != server.url(path)
    assert server.hits["/blocked-target.jpg"] == before


def test_too_many_redirects(server):
    before = server.hits["/loop"]
    out = download([server.url("/loop")], max_redirects=3)
    assert outcome(out, 0) == (STATUS_FAILED, "too_many_redirects")
    assert server.hits["/loop"] - before == 4


# ------------------------------------------------------------------ caps


def test_byte_cap(server):
    out = download([server.url("/astronaut.jpg"), server.url("/no-length.png")], max_bytes=10_000)
    assert [outcome(out, i) for i in range(2)] == [(STATUS_FAILED, "too_many_bytes")] * 2
    assert detail(out, 0)["content_length"] == len(ASTRONAUT)  # refused from the header
    assert detail(out, 1)["bytes_read"] == 10_001  # streamed, stopped one byte past the cap


def test_pixel_cap_reads_only_the_header(server):
    out = download([server.url("/bomb.png"), server.url("/big-header.png"), server.url("/astronaut.jpg")])
    assert [outcome(out, i)[1] for i in range(3)] == ["too_many_pixels", "too_many_pixels", ""]
    assert detail(out, 1)["pixels"] == 81_000_000
    out = download([server.url("/astronaut.jpg")], max_pixels=512 * 511)
    assert outcome(out, 0) == (STATUS_FAILED, "too_many_pixels")


# ------------------------------------------------------------------ opt-outs


def test_opt_out_headers(server):
    paths = ["/noai", "/noindex-nofollow", "/nofollow", "/two-tags", "/otherbot"]
    out = download([server.url(p) for p in paths])
    assert [outcome(out, i)[1] for i in range(5)] == ["opted_out", "opted_out", "", "opted_out", ""]
    assert detail(out, 0)["x_robots_tag"] == ["noai"]
    # a directive addressed to our token applies to us
    out = download([server.url("/otherbot")], user_agent_token="otherbot")
    assert outcome(out, 0) == (STATUS_FAILED, "opted_out")
    # an empty list of directives turns the check off
    out = download([server.url("/noai")], disallowed_header_directives=())
    assert outcome(out, 0) == (STATUS_OK, "")


@pytest.mark.parametrize(
    "values,token",
    [
        (["noai"], None),
        (["NoImageAI"], None),
        (["noindex, nofollow"], None),
        (["nofollow"], None),
        (["nofollow", "noimageai"], None),
        (["otherbot: noai"], None),
        (["otherbot: noai"], "otherbot"),
        (["otherbot: noindex, noimageai"], None),
        (["otherbot: noindex, noimageai", "noai"], None),
        (["unavailable_after: 2030-01-01"], None),
        ([], None),
    ],
)
def test_robots_parser_agrees_with_img2dataset(values, token):
    from email.message import Message

    from img2dataset.downloader import is_disallowed

    from pairforge.stages.common.fetch import robots_disallowed

    directives = {"noai", "noimageai", "noindex", "noimageindex"}
    msg = Message()
    for v in values:
        msg["X-Robots-Tag"] = v
    assert robots_disallowed(values, token, directives) == is_disallowed(msg, token, directives)
