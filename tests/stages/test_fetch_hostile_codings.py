"""The download client's content decoding against hostile servers (issue
14, finding 3): every content coding it inflates (gzip, deflate with and
without its zlib wrapper, several members, nested codings up to the limit)
gives back the image; bodies that do not inflate are decode errors, not
retried; compression bombs (nested, chunked, one behind a redirect) must
cost no more than the byte cap in bytes and a stated bound in memory, which
a fresh interpreter measures. The deadline and the allow-list:
tests/stages/test_fetch_hostile.py."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.stages.common.fetch import SafeFetcher
from tests.fetchkit import IMAGE, LOCAL, TIMEOUT, encoded_routes

ROOT = Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def servers(bombs):
    """The bombs and the encoded images on one server, as ``(http, None)``:
    the pair's second place is the deadline tests' silent server, none here."""
    with LocalHTTPServer({**bomb_routes(bombs), **encoded_routes()}) as http:
        yield http, None


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
from pairforge.stages.common.fetch import SafeFetcher
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
