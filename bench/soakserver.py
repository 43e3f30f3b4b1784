"""The planted URL mix of ``bench/soak.py`` and the server processes that
answer it, so the soak's per-reason counts can be held against what was
planted, row by row.

Row ``i`` of ``n`` gets one *kind* (exact counts from :data:`MIX`, shuffled
with a seed); each kind has a route on ``pipeline.httpserver`` and the
``(stage, reason)`` pairforge must give it:

========================  =======  =====================================  ==========================
kind                      share    what the server does                   expected
========================  =======  =====================================  ==========================
``good``                  85%      a 256-320 px JPEG (skimage photos)     ok
``http_404``/``http_500``  3%/2%   that status                            ``http_404``/``http_500``
``slow_body``             1%       a byte piece every 0.5 s, 50 s long    ``timeout`` (deadline)
``trickled_head``         1%       status line and headers, 1 byte/0.1 s  ``timeout`` (deadline)
``reset``                 2%       reads the request, answers a TCP RST   ``connection_error``
``gzip_bomb``             1.5%     100 MiB of zeros gzipped (half nested  ``too_many_bytes``
                                   ``gzip, gzip``), as ``image/png``
``pixel_bomb``            1.5%     a 40000x40000 PNG header (~300 bytes)  ``too_many_pixels``
``not_image``             2%       an HTML page as ``image/jpeg``         ``decode_error``
``truncated``             1%       a JPEG cut after 1000 of its bytes     ``truncated``
========================  =======  =====================================  ==========================

Servers are forked processes, each building its own routes for every path
(so the parent never holds them), one port each; URL ``i`` goes to port
``i % len(ports)``. Every answer that drips ends when the client hangs up,
or after 8 s.
"""

from __future__ import annotations

import gzip
import multiprocessing as mp
import struct
import zlib

import numpy as np

#: kind -> (share of the rows, stage, reason); reason "" means the row is kept
MIX: dict[str, tuple[float, str, str]] = {
    "good": (0.85, "", ""),
    "http_404": (0.03, "download", "http_404"),
    "http_500": (0.02, "download", "http_500"),
    "slow_body": (0.01, "download", "timeout"),
    "trickled_head": (0.01, "download", "timeout"),
    "reset": (0.02, "download", "connection_error"),
    "gzip_bomb": (0.015, "download", "too_many_bytes"),
    "pixel_bomb": (0.015, "download", "too_many_pixels"),
    "not_image": (0.02, "download", "decode_error"),
    "truncated": (0.01, "download", "truncated"),
}
KINDS = tuple(MIX)
#: the longest any dripping answer goes on, server side
DRIP_LIMIT = 8.0
GOOD_IMAGES = 48


def plant(n: int, seed: int = 0) -> np.ndarray:
    """The kind index (into :data:`KINDS`) of each of ``n`` rows: exact
    counts per kind (the remainder of rounding goes to ``good``), shuffled."""
    counts = [int(MIX[k][0] * n) for k in KINDS]
    counts[0] += n - sum(counts)
    kinds = np.repeat(np.arange(len(KINDS), dtype=np.int8), counts)
    np.random.default_rng(seed).shuffle(kinds)
    return kinds


def path(i: int, kind: int) -> str:
    return f"/{KINDS[kind]}/{i}"


def good_images(count: int = GOOD_IMAGES) -> list[bytes]:
    """``count`` distinct JPEGs, 256-320 px a side, cut from skimage's photos
    (so ``basic_filter``'s 200 px minimum keeps them)."""
    from bench.download import make_images

    return make_images(count, seed=1, sides=(256, 320), quality=85)


def pixel_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 1-bit pixels, with one
    tiny IDAT: its header alone must get it refused."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def kind_routes() -> list:
    """One route (or, for ``good``, a list of them) per kind, in :data:`KINDS` order."""
    from pairforge.pipeline.httpserver import Route

    images = good_images()
    jpg = images[0]
    bomb = gzip.compress(bytes(100 << 20), 9)
    html = b"<html><body>" + b"<p>not an image</p>" * 50 + b"</body></html>"
    by_kind = {
        "good": [Route(b, "image/jpeg") for b in images],
        "http_404": Route(b"not found", "text/plain", status=404),
        "http_500": Route(b"oops", "text/plain", status=500),
        "slow_body": Route(jpg, "image/jpeg", drip=0.5, chunk_size=max(1, len(jpg) // 100), drip_limit=DRIP_LIMIT),
        "trickled_head": Route(jpg, "image/jpeg", head_drip=0.1, drip_limit=DRIP_LIMIT),
        "reset": Route(reset=True),
        "gzip_bomb": [
            Route(bomb, "image/png", headers={"Content-Encoding": "gzip"}),
            Route(gzip.compress(bomb, 9), "image/png", headers={"Content-Encoding": "gzip, gzip"}, chunked=True),
        ],
        "pixel_bomb": Route(pixel_bomb(), "image/png"),
        "not_image": Route(html, "image/jpeg"),
        "truncated": Route(jpg, "image/jpeg", truncate_after=1000),
    }
    return [by_kind[k] for k in KINDS]


def _serve(n: int, seed: int, ports) -> None:
    from pairforge.pipeline.httpserver import LocalHTTPServer

    per_kind = kind_routes()
    routes = {}
    for i, k in enumerate(plant(n, seed)):
        r = per_kind[k]
        routes[path(i, k)] = r[i % len(r)] if isinstance(r, list) else r
    server = LocalHTTPServer(routes)
    ports.put(server.port)
    server.serve_forever()


def start_servers(n: int, seed: int, count: int) -> tuple[list, list[int]]:
    """``count`` server processes for the ``n`` planted rows; returns them and their ports."""
    ctx = mp.get_context("fork")
    ports = ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(n, seed, ports), daemon=True) for _ in range(count)]
    for p in procs:
        p.start()
    return procs, [ports.get(timeout=120) for _ in procs]


def urls(n: int, seed: int, ports: list[int]) -> list[str]:
    kinds = plant(n, seed)
    return [f"http://127.0.0.1:{ports[i % len(ports)]}{path(i, int(k))}" for i, k in enumerate(kinds)]
