"""The language and safety stages in a job (local runner, real models,
images from a loopback server): drops by reason in the manifest, the
signals declared, counted in ``manifest.json``'s ``columns`` and drawn in
the report; and the checks before a run name a missing model or a head
that does not fit the embedding, one line each."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pairforge.manifests import layout
from pairforge.manifests.manifest import verify
from pairforge.manifests.report import write_report
from pairforge.pipeline.checks import check_job
from pairforge.pipeline.config import ConfigError, load_job
from pairforge.pipeline.datasets import skimage_photos
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job

CAPTIONS = {
    "astronaut": "portrait of an astronaut in a white space suit in front of a flag",
    "chelsea": "eine getigerte Katze schaut zur Seite",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "colorwheel": "a rainbow colour wheel on a black background",  # NudeNet's false positive: dropped as nsfw
    "page": "a scanned page of printed text",  # mostly text: dropped above text_threshold
    "rocket": "a rocket on the launch pad before take off",
}


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert("RGB").resize((256, 256)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _job(tmp_path, urls_path, stages, out="out", runner="local"):
    return load_job(
        {"input": {"paths": [str(urls_path)]}, "output": {"dir": out, "samples_per_shard": 4}, "runner": runner,
         "stages": stages},  # fmt: skip
        base_dir=tmp_path,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety-job")
    photos = {name: _jpeg(img) for name, _, img in skimage_photos() if name in CAPTIONS}
    with LocalHTTPServer({f"/{n}.jpg": Route(b, "image/jpeg") for n, b in photos.items()}) as server:
        names = list(CAPTIONS)
        pq.write_table(pa.table({"url": [server.url(f"/{n}.jpg") for n in names], "caption": [CAPTIONS[n] for n in names]}),
                       tmp / "urls.parquet")  # fmt: skip
        stages = [
            {"name": "download", "image_size": 256, "allow_networks": ["127.0.0.0/8"]},
            "language",
            {"name": "basic_filter", "languages": ["en"], "min_image_size": 0},
            {"name": "safety", "text_threshold": 0.3, "micro_batch": 4},
            "shard",
        ]
        man = run_job(_job(tmp, tmp / "urls.parquet", stages))
    return tmp / "out", man, names


def test_drops_by_reason_and_columns(run):
    out, man, names = run
    assert verify(out) == []
    by_stage = {s["name"]: s for s in man["stages"]}
    assert by_stage["basic_filter"]["dropped"] == {"caption_language": 1}
    assert by_stage["safety"]["dropped"] == {"nsfw": 1, "too_much_text": 1}
    assert man["counts"]["ok"] == 3
    kept = pq.read_table(layout.shard_parquet(out, 0)).to_pylist() + pq.read_table(layout.shard_parquet(out, 1)).to_pylist()
    assert sorted(r["url"].rsplit("/", 1)[1] for r in kept) == ["astronaut.jpg", "coffee.jpg", "rocket.jpg"]
    for r in kept:
        assert r["lang"] == "en" and 0 < r["lang_prob"] <= 1 and 0 <= r["punsafe"] < 0.5 and r["text_area"] < 0.01
    rejects = pq.read_table(layout.rejects_parquet(out, 1)).to_pylist() + pq.read_table(layout.rejects_parquet(out, 0)).to_pylist()
    nsfw = next(r for r in rejects if r["reason"] == "nsfw")
    assert nsfw["url"].endswith("/colorwheel.jpg") and nsfw["punsafe"] > 0.5
    assert json.loads(nsfw["detail"])["class"] == "BUTTOCKS_EXPOSED"
    schema = {c["name"]: c["stage"] for c in man["schema"]}
    assert {k: schema[k] for k in ("lang", "lang_prob", "punsafe", "text_area")} == {
        "lang": "language", "lang_prob": "language", "punsafe": "safety", "text_area": "safety"}  # fmt: skip


def test_the_manifest_counts_each_signal(run):
    out, man, names = run
    cols = man["columns"]
    assert set(cols) == {"lang_prob", "punsafe", "text_area"}
    assert cols["lang_prob"]["rows"] == len(names)  # detected on every row, the German one included
    # scored on the rows alive at the safety stage: kept and dropped there
    assert cols["punsafe"]["rows"] == 5 and cols["punsafe"]["max"] > 0.5 and cols["text_area"]["max"] > 0.3
    assert cols["text_area"]["positive"] >= 1
    assert cols["punsafe"]["mean"] == pytest.approx(cols["punsafe"]["sum"] / 5)


def test_the_report_draws_each_signal_with_its_threshold(run, tmp_path):
    out, man, _ = run
    info = write_report(out, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    for title in ("NSFW score", "Text in images", "Caption language"):
        assert title in page
    for png in ("signal-punsafe.png", "signal-text_area.png", "signal-lang.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert "rows above the threshold are dropped" in page and info["plots"] >= 3


def test_checks_name_a_missing_model_and_a_head_that_does_not_fit(tmp_path):
    from safetensors.numpy import save_file

    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/a.jpg"], "caption": ["a"]}), tmp_path / "urls.parquet")
    head = tmp_path / "aesthetic.safetensors"
    shapes = {"layers.0": (1024, 768), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64), "layers.7": (1, 16)}
    save_file({f"{k}.{p}": np.zeros(s if p == "weight" else s[:1], np.float32) for k, s in shapes.items()
               for p in ("weight", "bias")}, str(head))  # fmt: skip
    stages = [
        {"name": "download", "allow_networks": ["127.0.0.0/8"]},
        {"name": "language", "model": str(tmp_path / "lid.176.bin")},
        {"name": "safety", "nsfw_model": str(tmp_path / "no.onnx")},
        {"name": "clip_score", "model": "ViT-B-32", "pretrained": "random"},
        {"name": "heads", "heads": [{"name": "aesthetic", "path": str(head), "kind": "laion_aesthetic"}]},
        "shard",
    ]
    with pytest.raises(ConfigError) as e:
        check_job(_job(tmp_path, tmp_path / "urls.parquet", stages))
    lines = str(e.value).splitlines()
    assert f"stages[1](language).model: no model file {str(tmp_path / 'lid.176.bin')!r}" in lines
    assert f"stages[2](safety).nsfw_model: no model file {str(tmp_path / 'no.onnx')!r}" in lines
    assert "stages[4](heads).heads[0](aesthetic).path: the head takes 768 inputs, img_emb has 512" in lines
    assert len(lines) == 3, lines


@pytest.mark.slow
def test_both_runners_write_the_same_bytes(tmp_path, ray_local):
    """The safety actor (NudeNet, PP-OCR, MTCNN and the blur) and the
    language task on Ray give the bytes the local runner gives."""
    photos = {name: _jpeg(img) for name, _, img in skimage_photos() if name in CAPTIONS}
    with LocalHTTPServer({f"/{n}.jpg": Route(b, "image/jpeg") for n, b in photos.items()}) as server:
        names = list(CAPTIONS)
        pq.write_table(pa.table({"url": [server.url(f"/{n}.jpg") for n in names], "caption": [CAPTIONS[n] for n in names]}),
                       tmp_path / "urls.parquet")  # fmt: skip
        stages = [
            {"name": "download", "image_size": 256, "allow_networks": ["127.0.0.0/8"]},
            "language",
            {"name": "safety", "text_threshold": 0.3, "blur_faces": True, "text_boxes": True, "micro_batch": 4},
            "shard",
        ]
        files = {}
        for runner in ("local", "ray"):
            run_job(_job(tmp_path, tmp_path / "urls.parquet", stages, out=runner, runner=runner))
            out = tmp_path / runner
            assert verify(out) == []
            files[runner] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "shards").iterdir())
                             if not p.name.endswith("_stats.json")}  # fmt: skip
            files[runner] |= {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "rejects").iterdir())}
    assert files["local"] == files["ray"] and len(files["local"]) >= 6

