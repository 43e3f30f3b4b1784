"""The one-decode resizer against img2dataset's own ``Resizer`` on real
photos, and the pHash taken from its pixels against the stored file's."""

import io
from concurrent.futures import ThreadPoolExecutor

import cv2
import imagehash
import numpy as np
import pytest
from PIL import Image

from pairforge.pipeline.config import load_job
from pairforge.pipeline.datasets import skimage_photos
from pairforge.stages.base import stage_columns
from pairforge.stages.batch import fresh_rows
from pairforge.stages.common.resize import Resize, img2dataset_resizer_class, probe
from pairforge.stages.dedup_phash import Config as PConfig
from pairforge.stages.dedup_phash import PerceptualDedupStage
from pairforge.stages.download import DownloadStage
from tests.planted import build_planted, run_kind

MODES = ("border", "keep_ratio", "center_crop", "keep_ratio_largest", "no")
#: a reduced decode against img2dataset's output, on skimage's photos enlarged
#: 2-8x (70 images): worst 37.9 dB (retina, grey, 1/8 scale), median 47.5 dB
MIN_PSNR, MEDIAN_PSNR = 37.0, 44.0


def settings(**kw):
    base = dict(
        image_size=256,
        resize_mode="border",
        resize_only_if_bigger=False,
        upscale_interpolation="lanczos",
        downscale_interpolation="area",
        encode_format="jpg",
        encode_quality=95,
        skip_reencode=False,
        min_image_size=0,
        max_image_area=None,
        max_aspect_ratio=None,
    )
    return {**base, **kw}


def reference(**kw):
    cfg = settings(**kw)
    cfg["max_image_area"] = cfg["max_image_area"] or float("inf")
    cfg["max_aspect_ratio"] = cfg["max_aspect_ratio"] or float("inf")
    return img2dataset_resizer_class()(**cfg)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """skimage's photos as JPEG (colour and grey), PNG (RGB, grey, RGBA) and WebP."""
    out = []
    for _, _, a in skimage_photos():
        im = Image.fromarray(a)
        rgb = im.convert("RGB")
        out += [encode(rgb, "JPEG", quality=90), encode(im.convert("L"), "JPEG"), encode(rgb, "PNG")]
        out += [encode(im.convert("L"), "PNG"), encode(im.convert("RGBA"), "PNG"), encode(rgb, "WEBP")]
    return out


@pytest.fixture(scope="module")
def large() -> list[bytes]:
    """Photos 3-8x larger than the output, where a reduced decode applies."""
    out = []
    for i, (_, _, a) in enumerate(skimage_photos()):
        im = Image.fromarray(a).convert("L" if i % 4 == 0 else "RGB")
        for f in (3, 6) if i % 3 == 0 else (4,):
            out.append(encode(im.resize((im.width * f, im.height * f), Image.LANCZOS), "JPEG", quality=90))
    return out


def psnr(a: bytes, b: bytes) -> float:
    x = cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float64)
    y = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("mode", MODES)
def test_without_reduced_decode_the_bytes_are_img2datasets(mode, photos, large):
    ref, mine = reference(resize_mode=mode), Resize(**settings(resize_mode=mode), reduced_decode=False)
    for data in photos + large:
        img, w, h, ow, oh, err = ref(io.BytesIO(data))
        got = mine(data, probe(data, 10**9))
        assert err is None and not got.reason
        assert (got.width, got.height, got.original_width, got.original_height) == (w, h, ow, oh)
        assert got.image == img


@pytest.mark.parametrize("mode", ("border", "center_crop"))
def test_a_reduced_decode_keeps_the_sizes_and_stays_within_the_psnr_bound(mode, large):
    ref, mine = reference(resize_mode=mode), Resize(**settings(resize_mode=mode))
    reduced, quality = 0, []
    for data in large:
        img, w, h, ow, oh, _ = ref(io.BytesIO(data))
        got = mine(data, probe(data, 10**9))
        assert (got.width, got.height, got.original_width, got.original_height) == (w, h, ow, oh)
        reduced += got.reduced > 1
        quality.append(psnr(got.image, img))
    assert reduced >= 0.8 * len(large)  # most took the cheaper decode (an elongated 3x photo under center_crop does not)
    assert min(quality) >= MIN_PSNR and np.median(quality) >= MEDIAN_PSNR


@pytest.mark.parametrize(
    "kw",
    [
        dict(min_image_size=300),
        dict(max_image_area=100_000),
        dict(max_aspect_ratio=1.2),
        dict(resize_only_if_bigger=True, image_size=1024),
        dict(skip_reencode=True, resize_mode="no"),
        dict(encode_format="png", encode_quality=3),
        dict(encode_format="webp", encode_quality=80, upscale_interpolation="bicubic", image_size=640),
    ],
)
def test_checks_and_options_decide_as_img2dataset_does(kw, photos):
    ref, mine = reference(**kw), Resize(**settings(**kw), reduced_decode=False)
    for data in photos:
        img, *_, err = ref(io.BytesIO(data))
        got = mine(data)
        assert got.image == img
        assert bool(got.reason) == (err is not None)


def test_layouts_off_the_fast_path_go_to_img2datasets_resizer():
    a = skimage_photos()[0][2]
    rgb = Image.fromarray(a).convert("RGB")
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    deep = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    cases = [encode(rgb.convert("CMYK"), "JPEG"), encode(palette, "PNG"), encode(deep, "PNG")]
    ref, mine = reference(), Resize(**settings())
    for data in cases:
        img, w, h, *_, err = ref(io.BytesIO(data))
        got = mine(data)
        assert (got.image, got.reason == "") == (img, err is None)
        assert got.reduced == 1
    assert mine(b"not an image").reason == "decode_error"


def test_threads_resize_in_parallel_to_the_same_bytes(photos):
    mine = Resize(**settings())
    serial = [mine(d).image for d in photos]
    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(lambda d: mine(d).image, photos)) == serial


def test_the_download_threads_hash_as_dedup_phash_does(tmp_path):
    """Hashed in the download stage or by dedup_phash from the stored files:
    the same hashes, so the same decisions on the planted set."""
    from pairforge.pipeline.httpserver import LocalHTTPServer, Route
    from pairforge.pipeline.local import map_stage
    from pairforge.stages.download import Config as DConfig
    from pairforge.stages.download import DownloadStage

    rows = build_planted()
    routes = {f"/{i}": Route(b, "image/jpeg") for i, b in enumerate(rows["image"])}
    with LocalHTTPServer(routes) as server:
        urls = np.array([server.url(f"/{i}") for i in range(len(rows["key"]))], dtype=object)
        stage = DownloadStage(DConfig(allow_networks=("127.0.0.1/32",), perceptual_hash="phash"))
        got = map_stage(stage, fresh_rows(rows["key"], url=urls))
    assert (got["status"] == "ok").all()
    stored = {**rows, "image": got["image"], "original_width": got["original_width"]}
    own = PerceptualDedupStage(PConfig()).process_batch(dict(stored))["phash"]
    assert list(got["phash"]) == list(own)
    # and close to imagehash on the whole stored image (no reduced decode):
    # 1,020 rows, all but 1.2% within 2 bits, none above 4
    dist = np.array([imagehash.hex_to_hash(h) - imagehash.phash(Image.open(io.BytesIO(s))) for h, s in zip(own, got["image"])])
    assert (dist <= 2).mean() >= 0.98 and dist.max() <= 4
    decoded = run_kind(PerceptualDedupStage(PConfig()), stored)
    hashed = run_kind(PerceptualDedupStage(PConfig(hash_column="phash")), {**stored, "phash": got["phash"]})
    assert len(decoded["key"]) > 700
    assert dict(zip(decoded["key"], decoded["duplicate_of"])) == dict(zip(hashed["key"], hashed["duplicate_of"]))


def test_a_job_hashes_in_download_when_dedup_phash_follows(tmp_path):
    def stages(*specs):
        job = load_job({"input": {"paths": ["u.parquet"]}, "output": {"dir": "out"}, "stages": list(specs)}, tmp_path)
        return {s.name: s.config for s in job.stages}

    got = stages("download", {"name": "dedup_phash"}, "shard")
    assert (got["download"].perceptual_hash, got["dedup_phash"].hash_column) == ("phash", "phash")
    # one hash column in the shards, declared by download (which computes it), read and kept by dedup_phash
    built = [DownloadStage(got["download"]), PerceptualDedupStage(got["dedup_phash"])]
    columns = stage_columns(built)
    assert columns["phash"][0] == "download" and "image_phash" not in columns
    got = stages("download", {"name": "dedup_phash", "algorithm": "dhash"}, "shard")
    assert (got["download"].perceptual_hash, got["dedup_phash"].hash_column) == ("dhash", "dhash")
    got = stages("download", {"name": "dedup_phash", "hash_column": "my_hash"}, "shard")
    assert (got["download"].perceptual_hash, got["dedup_phash"].hash_column) == (None, "my_hash")
    assert stages("download", "shard")["download"].perceptual_hash is None
