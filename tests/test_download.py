"""The download stage against a real local HTTP server: every outcome a URL
list can produce, run through ``run_stage_batch`` as the runners do."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.httpserver import LocalHTTPServer, Route
from stages.base import STATUS_FAILED, STATUS_OK, object_array, run_stage_batch
from stages.common.fetch import AddressPolicy, SafeFetcher
from stages.download import Config, DownloadStage

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

LOCAL = ("127.0.0.1/32",)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


ASTRONAUT = encode(skimage.data.astronaut(), "JPEG")  # 512 x 512
COFFEE = encode(skimage.data.coffee(), "PNG")  # 600 wide x 400 high
TINY = encode(np.full((20, 20, 3), 128, np.uint8), "PNG")
WIDE = encode(np.full((30, 300, 3), 200, np.uint8), "JPEG")

ROUTES = {
    "/astronaut.jpg": Route(ASTRONAUT, "image/jpeg"),
    "/coffee.png": Route(COFFEE, "image/png"),
    "/tiny.png": Route(TINY, "image/png"),
    "/wide.jpg": Route(WIDE, "image/jpeg"),
    "/page.html": Route(b"<html><body>not an image</body></html>", "text/html"),
    "/empty": Route(b"", "image/jpeg"),
    "/half.jpg": Route(ASTRONAUT[: len(ASTRONAUT) // 2], "image/jpeg"),
    "/half.png": Route(COFFEE[: len(COFFEE) // 2], "image/png"),
    "/cut.jpg": Route(ASTRONAUT, "image/jpeg", truncate_after=2000),
    "/no-length.jpg": Route(ASTRONAUT, "image/jpeg", content_length=False),
    "/no-length.png": Route(COFFEE, "image/png", content_length=False),
    "/error500": Route(b"oops", "text/plain", status=500),
    "/slow": Route(ASTRONAUT, "image/jpeg", delay=1.5),
    "/drip": Route(ASTRONAUT, "image/jpeg", drip=0.15, chunk_size=1000),
    "/noai": Route(ASTRONAUT, "image/jpeg", headers={"X-Robots-Tag": "noai"}),
    "/noindex-nofollow": Route(ASTRONAUT, "image/jpeg", headers={"X-Robots-Tag": "noindex, nofollow"}),
    "/nofollow": Route(ASTRONAUT, "image/jpeg", headers={"X-Robots-Tag": "nofollow"}),
    "/two-tags": Route(ASTRONAUT, "image/jpeg", headers=[("X-Robots-Tag", "nofollow"), ("X-Robots-Tag", "noimageai")]),
    "/otherbot": Route(ASTRONAUT, "image/jpeg", headers={"X-Robots-Tag": "otherbot: noai"}),
    "/bomb.png": Route(png_declaring(20000, 20000), "image/png"),
    "/big-header.png": Route(png_declaring(9000, 9000), "image/png"),
    "/chain1": Route(redirect="/chain2"),
    "/chain2": Route(redirect="/chain3.jpg", status=301),
    "/chain3.jpg": Route(ASTRONAUT, "image/jpeg"),
    "/to-metadata": Route(redirect="http://169.254.169.254/latest/meta-data/"),
    "/loop": Route(redirect="/loop"),
    "/no-location": Route(status=302),
    "/to-ftp": Route(redirect="ftp://example.com/x.jpg"),
    "/blocked-target.jpg": Route(ASTRONAUT, "image/jpeg"),
}


@pytest.fixture(scope="module")
def server():
    with LocalHTTPServer(ROUTES) as s:
        # redirects to this server under names the allow-list does not cover
        s.routes["/to-127-0-0-2"] = Route(redirect=f"http://127.0.0.2:{s.port}/blocked-target.jpg")
        s.routes["/to-ipv6-loopback"] = Route(redirect=f"http://[::1]:{s.port}/blocked-target.jpg")
        s.routes["/to-absolute"] = Route(redirect=s.url("/chain3.jpg"))
        yield s


def make_batch(urls, status=None, reason=None) -> dict:
    n = len(urls)
    return {
        "key": object_array([f"00000{i:04d}" for i in range(n)]),
        "shard_id": np.zeros(n, dtype=np.int64),
        "status": object_array(status or [STATUS_OK] * n),
        "stage": object_array(["reader" if r else "" for r in (reason or [""] * n)]),
        "reason": object_array(reason or [""] * n),
        "detail": object_array(["{}"] * n),
        "url": object_array(urls),
        "caption": object_array([f"caption {i}" for i in range(n)]),
        "source": object_array(["test"] * n),
    }


def download(urls, **options) -> dict:
    options = {"allow_networks": LOCAL, "thread_count": 8, "image_size": 64, **options}
    stage = DownloadStage(Config(**options))
    stage.setup()
    out = run_stage_batch(stage, make_batch(urls))
    assert list(out["key"]) == list(make_batch(urls)["key"])
    return out


def outcome(out, i) -> tuple[str, str]:
    return out["status"][i], out["reason"][i]


def detail(out, i) -> dict:
    return json.loads(out["detail"][i])


# ------------------------------------------------------------------ ok rows


def test_ok_row_has_resized_image_sizes_hash_and_status(server):
    out = download([server.url("/astronaut.jpg")], image_size=64, resize_mode="border")
    assert outcome(out, 0) == (STATUS_OK, "")
    assert (out["width"][0], out["height"][0]) == (64, 64)
    assert (out["original_width"][0], out["original_height"][0]) == (512, 512)
    assert out["sha256"][0] == hashlib.sha256(ASTRONAUT).hexdigest()
    assert out["http_status"][0] == 200
    assert out["image_ext"][0] == "jpg"
    with Image.open(io.BytesIO(out["image"][0])) as im:
        assert im.format == "JPEG" and im.size == (64, 64)


@pytest.mark.parametrize(
    "mode, size",
    [
        ("border", (100, 100)),
        ("center_crop", (100, 100)),
        ("keep_ratio", (150, 100)),
        ("keep_ratio_largest", (100, 67)),
        ("no", (600, 400)),
    ],
)
def test_resize_modes(server, mode, size):
    out = download([server.url("/coffee.png")], image_size=100, resize_mode=mode)
    assert outcome(out, 0) == (STATUS_OK, "")
    assert (out["width"][0], out["height"][0]) == size
    assert (out["original_width"][0], out["original_height"][0]) == (600, 400)
    with Image.open(io.BytesIO(out["image"][0])) as im:
        assert im.size == size


@pytest.mark.parametrize("fmt, pil_format", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_formats(server, fmt, pil_format):
    quality = 5 if fmt == "png" else 80
    out = download([server.url("/astronaut.jpg")], encode_format=fmt, encode_quality=quality)
    assert out["image_ext"][0] == fmt
    with Image.open(io.BytesIO(out["image"][0])) as im:
        assert im.format == pil_format


def test_body_without_content_length_is_read_to_the_end(server):
    out = download([server.url("/no-length.jpg")])
    assert outcome(out, 0) == (STATUS_OK, "")
    assert out["sha256"][0] == hashlib.sha256(ASTRONAUT).hexdigest()


# ------------------------------------------------------------------ failures


def test_http_errors_retry_only_when_worth_it(server):
    out = download([server.url("/missing.jpg"), server.url("/error500")], retries=2)
    assert outcome(out, 0) == (STATUS_FAILED, "http_404")
    assert outcome(out, 1) == (STATUS_FAILED, "http_500")
    assert server.hits["/missing.jpg"] == 1
    assert server.hits["/error500"] == 3
    assert detail(out, 1)["attempts"] == 3 and detail(out, 1)["http_status"] == 500
    assert list(out["http_status"]) == [404, 500]


def test_timeout_is_retried(server):
    out = download([server.url("/slow")], timeout=0.2, retries=1)
    assert outcome(out, 0) == (STATUS_FAILED, "timeout")
    assert server.hits["/slow"] == 2
    assert out["http_status"][0] == 0


def test_deadline_stops_a_slow_drip(server):
    out = download([server.url("/drip")], timeout=1.0, deadline=0.5)
    assert outcome(out, 0) == (STATUS_FAILED, "timeout")
    assert "deadline" in detail(out, 0)["error"]


def test_connection_refused(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = download([f"http://127.0.0.1:{port}/x.jpg"])
    assert outcome(out, 0) == (STATUS_FAILED, "connection_error")
    assert "refused" in detail(out, 0)["error"].lower()


@pytest.mark.parametrize(
    "url",
    [
        "",
        None,
        42,
        "not a url",
        "ftp://example.com/a.jpg",
        "javascript:alert(1)",
        "http://",
        "http://exa mple.com/a b.jpg",
    ],
)
def test_invalid_urls(url):
    out = download([url])
    assert outcome(out, 0) == (STATUS_FAILED, "invalid_url")
    assert "url" in detail(out, 0)


def test_redirect_without_location_or_to_other_scheme(server):
    out = download([server.url("/no-location"), server.url("/to-ftp")])
    assert outcome(out, 0) == (STATUS_FAILED, "http_302")
    assert outcome(out, 1) == (STATUS_FAILED, "invalid_url")
    assert detail(out, 1)["redirect_from"] == server.url("/to-ftp")


@pytest.mark.parametrize("path", ["/page.html", "/empty", "/half.jpg", "/half.png"])
def test_non_images_and_truncated_files_are_decode_errors(server, path):
    out = download([server.url(path)])
    assert outcome(out, 0) == (STATUS_FAILED, "decode_error")
    assert out["image"][0] is None
    assert out["http_status"][0] == 200


def test_transfer_cut_short(server):
    out = download([server.url("/cut.jpg")])
    assert outcome(out, 0) == (STATUS_FAILED, "truncated")


def test_size_filters_of_the_resizer(server):
    urls = [server.url("/tiny.png"), server.url("/coffee.png"), server.url("/wide.jpg"), server.url("/astronaut.jpg")]
    out = download(urls, min_image_size=25, max_image_area=300_000, max_aspect_ratio=5)
    assert [outcome(out, i)[1] for i in range(4)] == ["image_too_small", "", "aspect_ratio_too_large", ""]
    assert detail(out, 0)["original_width"] == 20
    out = download([server.url("/astronaut.jpg")], max_image_area=100_000)
    assert outcome(out, 0) == (STATUS_FAILED, "image_area_too_large")
    assert (detail(out, 0)["original_width"], detail(out, 0)["original_height"]) == (512, 512)


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


# ------------------------------------------------------------------ accounting


def test_every_row_accounted_for(server):
    paths = ["/astronaut.jpg", "/missing.jpg", "/coffee.png", "/page.html", "/noai", "/chain1"]
    urls = [server.url(p) for p in paths] * 5 + ["ftp://x", None]
    status = [STATUS_OK] * len(urls)
    reason = [""] * len(urls)
    status[3], reason[3] = STATUS_FAILED, "bad_row"  # failed upstream: passes through
    stage = DownloadStage(Config(allow_networks=LOCAL, thread_count=3))
    batch = make_batch(urls, status, reason)
    out = run_stage_batch(stage, batch)
    assert list(out["key"]) == list(batch["key"]) and list(out["caption"]) == list(batch["caption"])
    lengths = {len(v) for v in out.values()}
    assert lengths == {len(urls)}
    ok = out["status"] == STATUS_OK
    assert ok.sum() == 15  # 5 x (astronaut, coffee, chain1)
    assert all(out["image"][i] is not None and out["width"][i] > 0 for i in np.flatnonzero(ok))
    assert all(out["reason"][i] and out["image"][i] is None for i in np.flatnonzero(~ok))
    assert (out["reason"][3], out["stage"][3], out["width"][3], out["image_ext"][3]) == ("bad_row", "reader", -1, "")
    assert set(out["stage"][~ok]) == {"download", "reader"}


def test_an_exception_in_one_row_never_fails_the_batch(server):
    class Flaky(DownloadStage):
        def _fetch_one(self, url):
            row = super()._fetch_one(url)
            if url.endswith("coffee.png"):
                raise RuntimeError("boom")
            return row

    stage = Flaky(Config(allow_networks=LOCAL, thread_count=2))
    out = run_stage_batch(stage, make_batch([server.url("/astronaut.jpg"), server.url("/coffee.png")]))
    assert outcome(out, 0) == (STATUS_OK, "")
    assert outcome(out, 1) == (STATUS_FAILED, "internal_error")
    assert "boom" in detail(out, 1)["error"]


def test_stage_pickles_after_setup():
    stage = DownloadStage(Config(thread_count=2))
    stage.setup()
    again = pickle.loads(pickle.dumps(stage))
    assert again.config == stage.config


# ------------------------------------------------------------------ the client and its policy


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


def test_config_rejects_bad_values():
    for bad in (
        {"resize_mode": "stretch"},
        {"encode_format": "gif"},
        {"encode_format": "png", "encode_quality": 95},
        {"allow_networks": ("nonsense",)},
        {"thread_count": 0},
    ):
        with pytest.raises(ValueError):
            Config(**bad)


def test_reasons_and_details_read_the_same_in_every_run(server):
    """Rejects files are compared byte for byte on resume: no memory
    addresses or timings may leak into a detail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"
    urls = [server.url(p) for p in ("/page.html", "/half.png", "/missing.jpg", "/cut.jpg")] + [
        closed,
        "http://10.0.0.1/",
    ]
    first = download(urls)
    second = download(urls, thread_count=3)  # another worker, same decisions
    assert list(first["detail"]) == list(second["detail"])
    assert all(" at 0x" not in d for d in first["detail"])


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

    from stages.common.fetch import robots_disallowed

    directives = {"noai", "noimageai", "noindex", "noimageindex"}
    msg = Message()
    for v in values:
        msg["X-Robots-Tag"] = v
    assert robots_disallowed(values, token, directives) == is_disallowed(msg, token, directives)
