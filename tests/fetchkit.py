"""Helpers for the download client's tests against hostile servers
(tests/test_fetch_hostile*.py, issue 14): the timings every trickle is
measured against, a small PNG, and the routes that serve it under every
content coding the client inflates (and two it must refuse)."""

from __future__ import annotations

import gzip
import io
import zlib

import numpy as np
from PIL import Image

from pairforge.pipeline.httpserver import Route
from pairforge.stages.common.fetch import MAX_CONTENT_CODINGS

LOCAL = ("127.0.0.1/32",)


# Every trickled byte comes well inside the read timeout: only the deadline
# can stop these answers.
TIMEOUT, DEADLINE, DRIP = 5.0, 1.5, 0.1


def png(width: int = 32, height: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


IMAGE = png()


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
