"""The download stage against a real local HTTP server: every outcome a URL
list can produce, run through ``run_stage_batch`` as the runners do: the
rows of images that download (sizes, resize modes, encodings), the failures
(HTTP errors, timeouts, bad URLs, bodies that do not decode, the resizer's
size filters), every row accounted for, and details that read the same in
every run. What the stage refuses to fetch (addresses, redirects, caps,
opt-outs): tests/stages/test_download_policy.py."""

from __future__ import annotations

import hashlib
import io
import pickle
import socket

import numpy as np
import pytest
from PIL import Image

from pairforge.stages.base import STATUS_FAILED, STATUS_OK, run_stage_batch
from pairforge.stages.download import Config, DownloadStage
from tests import downloadkit
from tests.downloadkit import ASTRONAUT, LOCAL, detail, download, make_batch, outcome

server = downloadkit.server  # this module's own server (module scope)


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
        def _finish(self, url, got, attempts):
            row = super()._finish(url, got, attempts)
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


# ------------------------------------------------------------------ the stage's config and details


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
