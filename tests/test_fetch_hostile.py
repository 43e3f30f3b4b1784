"""The download client against hostile servers (issue 14, findings 1, 3, 6):
servers that trickle their status line, headers or body, or never answer,
must cost no more than the deadline; compression bombs (nested, chunked)
must cost no more than the byte cap in bytes and a stated bound in memory;
an allow-list entry must not admit the 6to4 or Teredo addresses that embed
it; a null URL and a NaN URL must read apart in the rejects."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from ipaddress import ip_address as ip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.httpserver import LocalHTTPServer, Route, SilentServer
from pipeline.local import map_stage
from stages.base import STATUS_FAILED, STATUS_OK, object_array
from stages.common.fetch import MAX_CONTENT_CODINGS, AddressPolicy, SafeFetcher
from stages.download import Config, DownloadStage

LOCAL = ("127.0.0.1/32",)
ROOT = Path(__file__).resolve().parents[1]

# Every trickled byte comes well inside the read timeout: only the deadline
# can stop these answers.
TIMEOUT, DEADLINE, DRIP = 5.0, 1.5, 0.1
#: a row must end within this (the issue: deadline + 1 s)
GRACE = 1.0


def png(width: int = 32, height: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


IMAGE = png()


# ------------------------------------------------------------------ bombs

GIB = 1 << 30


def deflate_zeros(n_mib: int) -> tuple[bytes, bytes, bytes]:
    """Raw deflate of ``n_mib`` MiB of zeros, as (first block, repeated
    block, end): each MiB is compressed after a full flush, so every block
    but the first is the same bytes and a 1 GiB stream costs one MiB of
    compressing, not a GiB."""
    z = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(z) + c.flush(zlib.Z_FULL_FLUSH) == block
    return first, block, c.flush()


def gzip_zeros(n_mib: int) -> bytes:
    """A valid gzip member holding ``n_mib`` MiB of zeros."""
    first, block, end = deflate_zeros(n_mib)
    z, crc = bytes(1 << 20), 0
    for _ in range(n_mib):
        crc = zlib.crc32(z, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + first + block * (n_mib - 1) + end + struct.pack("<II", crc, (n_mib << 20) & 0xFFFFFFFF)


def zlib_zeros(n_mib: int) -> bytes:
    """A valid zlib stream (``deflate`` coding) holding ``n_mib`` MiB of zeros."""
    first, block, end = deflate_zeros(n_mib)
    n = n_mib << 20
    adler = ((n % 65521) << 16) | 1  # Adler-32 of n zero bytes
    return b"\x78\xda" + first + block * (n_mib - 1) + end + struct.pack(">I", adler)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    one = gzip_zeros(GIB >> 20)  # 1 GiB of zeros in ~1 MB
    assert zlib.decompressobj(31).decompress(one, 1 << 20) == bytes(1 << 20)
    return {
        "gzip": one,
        "gzip, gzip": gzip.compress(one, 9),  # 1 GiB in a few KB
        "deflate": zlib_zeros(GIB >> 20),
        "deflate, gzip": gzip.compress(zlib_zeros(GIB >> 20), 9),
    }


def bomb_routes(bombs) -> dict[str, Route]:
    png_type = "image/png"
    return {
        "/bomb/gzip-chunked": Route(bombs["gzip"], png_type, headers={"Content-Encoding": "gzip"}, chunked=True),
        "/bomb/gzip2-chunked": Route(
            bombs["gzip, gzip"], png_type, headers={"Content-Encoding": "gzip, gzip"}, chunked=True, chunk_size=512
        ),
        "/bomb/gzip2-length": Route(bombs["gzip, gzip"], png_type, headers={"Content-Encoding": "gzip, gzip"}),
        # the two codings in two header lines, which mean the same
        "/bomb/gzip2-two-lines": Route(
            bombs["gzip, gzip"], png_type, headers=[("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")]
        ),
        "/bomb/deflate": Route(bombs["deflate"], png_type, headers={"Content-Encoding": "deflate"}, chunked=True),
        "/bomb/deflate-gzip": Route(
            bombs["deflate, gzip"], png_type, headers={"Content-Encoding": "deflate, gzip"}, chunked=True
        ),
        # a redirect whose small body is a nested bomb: drained raw, never inflated
        "/bomb/redirect": Route(
            bombs["gzip, gzip"], redirect="/ok-gzip.png", headers={"Content-Encoding": "gzip, gzip"}, status=302
        ),
    }


def encoded_routes() -> dict[str, Route]:
    gz = gzip.compress(IMAGE)
    members = gzip.compress(IMAGE[:100]) + gzip.compress(IMAGE[100:])
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw_deflate = raw.compress(IMAGE) + raw.flush()

    def coded(body: bytes, encoding: str, **kw) -> Route:
        return Route(body, "image/png", headers={"Content-Encoding": encoding}, **kw)

    many = IMAGE
    for _ in range(MAX_CONTENT_CODINGS + 1):
        many = gzip.compress(many)
    return {
        "/ok.png": Route(IMAGE, "image/png"),
        "/ok-gzip.png": coded(gz, "gzip"),
        "/ok-x-gzip.png": coded(gz, "x-gzip"),
        "/ok-gzip-chunked-1.png": coded(gz, "gzip", chunked=True, chunk_size=1),
        "/ok-gzip2.png": coded(gzip.compress(gz), "GZIP , gzip"),
        "/ok-deflate.png": coded(zlib.compress(IMAGE), "deflate"),
        "/ok-raw-deflate.png": coded(raw_deflate, "deflate"),
        "/ok-raw-deflate-chunked-1.png": coded(raw_deflate, "deflate", chunked=True, chunk_size=1),
        "/ok-members.png": coded(members, "gzip"),
        "/ok-trailing.png": coded(gz + b"trailing junk", "gzip"),
        "/ok-identity.png": coded(IMAGE, "identity"),
        "/ok-gzip-identity.png": coded(gz, "gzip, identity"),
        "/as-sent-br.png": coded(IMAGE, "br"),  # not inflated here: the body is used as sent
        "/corrupt-gzip": coded(b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"not deflate at all", "gzip"),
        "/too-many-codings": coded(many, ", ".join(["gzip"] * (MAX_CONTENT_CODINGS + 1))),
        "/max-codings.png": coded(
            _nest(IMAGE, MAX_CONTENT_CODINGS), ", ".join(["gzip"] * MAX_CONTENT_CODINGS), chunked=True
        ),
    }


def _nest(body: bytes, times: int) -> bytes:
    for _ in range(times):
        body = gzip.compress(body)
    return body


# ------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def servers(bombs):
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
        **bomb_routes(bombs),
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
    stage = DownloadStage(
        Config(allow_networks=LOCAL, timeout=TIMEOUT, deadline=DEADLINE, thread_count=n, image_size=16)
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
    assert all(json.loads(d)["error"] == f"deadline of {DEADLINE}s exceeded" for d in out["detail"][: len(HOSTILE)])
    assert took <= DEADLINE + GRACE, took


# ------------------------------------------------------------------ finding 3: decoding


@pytest.mark.parametrize(
    "path",
    [
        "/ok-gzip.png",
        "/ok-x-gzip.png",
        "/ok-gzip-chunked-1.png",
        "/ok-gzip2.png",
        "/ok-deflate.png",
        "/ok-raw-deflate.png",
        "/ok-raw-deflate-chunked-1.png",
        "/ok-members.png",
        "/ok-trailing.png",
        "/ok-identity.png",
        "/ok-gzip-identity.png",
        "/as-sent-br.png",
        "/max-codings.png",
    ],
)
def test_content_codings_are_inflated_here(servers, path):
    http, _ = servers
    fetcher = SafeFetcher(allow_networks=LOCAL, timeout=TIMEOUT, deadline=10)
    got = fetcher.fetch(http.url(path))
    fetcher.close()
    assert (got.reason, got.body) == ("", IMAGE), got.detail


def test_bodies_that_do_not_inflate_are_decode_errors(servers):
    http, _ = servers
    fetcher = SafeFetcher(allow_networks=LOCAL, timeout=TIMEOUT, deadline=10)
    got = fetcher.fetch(http.url("/corrupt-gzip"))
    assert got.reason == "decode_error" and got.detail["content_encoding"] == "gzip"
    got = fetcher.fetch(http.url("/too-many-codings"))
    assert got.reason == "decode_error" and "more than 5" in got.detail["error"]
    # not retried: the same bytes would come again
    assert "attempts" not in got.detail
    fetcher.close()


#: peak RSS growth allowed while fetching every bomb, over the byte cap
#: itself (the body held up to the cap): pieces, zlib states, interpreter
RSS_SLACK_MIB = 16

_CHILD = """
import json, sys
from stages.common.fetch import SafeFetcher
import urllib3

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def reset_peak():
    # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS.
    # (ru_maxrss cannot be used: it keeps the parent's peak across exec.)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_kib("VmHWM") <= status_kib("VmRSS") + 64

max_bytes, urls = int(sys.argv[1]), sys.argv[2:]
fetcher = SafeFetcher(allow_networks=["127.0.0.1/32"], timeout=10, deadline=60, max_bytes=max_bytes)
warm = fetcher.fetch(urls[0])  # a small gzip body: imports and buffers in the baseline
reset = reset_peak()
base = status_kib("VmRSS")
rows = []
for url in urls[1:]:
    got = fetcher.fetch(url)
    rows.append({"url": url, "reason": got.reason, "detail": got.detail, "body": len(got.body or b"")})
print(json.dumps({"urllib3": urllib3.__version__, "warm": warm.reason, "peak_reset": reset, "base_kib": base,
                  "growth_kib": status_kib("VmHWM") - base, "rows": rows}))
"""


def _fetch_in_child(urls: list[str], max_bytes: int) -> dict:
    """Fetch in a fresh interpreter, so its peak RSS is these fetches' own.
    The urllib3 it imports is whichever ``PYTHONPATH`` puts first (a lower
    version can be tried by installing it into a folder named there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(max_bytes), *urls],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("max_bytes", [20_000_000, 1_000_000])
def test_compression_bombs_stay_within_the_byte_cap_and_memory(servers, max_bytes):
    http, _ = servers
    paths = sorted(p for p in http.routes if p.startswith("/bomb/"))
    got = _fetch_in_child([http.url("/ok-gzip.png")] + [http.url(p) for p in paths], max_bytes)
    assert got["warm"] == ""
    by_path = {r["url"].rsplit("/bomb/", 1)[1]: r for r in got["rows"]}
    for name, row in by_path.items():
        if name == "redirect":
            # the bomb in the redirect's body is drained raw; the hop goes on
            assert (row["reason"], row["body"]) == ("", len(IMAGE)), row
            continue
        assert row["reason"] == "too_many_bytes", row
        assert row["detail"]["bytes_read"] == max_bytes + 1 and row["body"] == 0
        assert row["detail"]["content_encoding"]
    if not got["peak_reset"]:
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs); caps checked, memory not")
    growth_mib = got["growth_kib"] / 1024
    print(f"urllib3 {got['urllib3']}: peak RSS growth {growth_mib:.1f} MiB for 1 GiB bombs, cap {max_bytes} bytes")
    assert growth_mib <= max_bytes / (1 << 20) + RSS_SLACK_MIB, growth_mib


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
