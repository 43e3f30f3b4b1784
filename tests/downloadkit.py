"""Helpers for the download stage's tests (tests/test_download*.py): images
with known bytes and sizes, a local HTTP server with every route those tests
fetch (``server``, module scope: bind it in the test module as
``server = downloadkit.server``, and each module gets its own, with its own
hit counts), and ``download``: a URL list through ``run_stage_batch`` as the
runners do."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.stages.base import STATUS_OK, object_array, run_stage_batch
from pairforge.stages.download import Config, DownloadStage

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
