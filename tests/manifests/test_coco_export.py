"""``pairforge export coco`` and the regions readers (manifests/coco.py,
manifests/regions.py) on shards written by the project's own writer with the
regions stage's columns, read back by real clients: pycocotools, webdataset,
pyarrow."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools.coco import COCO

from pairforge.manifests import layout
from pairforge.manifests.regions import RegionsError, read_arrays, read_regions
from pairforge.manifests.shards import write_shard
from pairforge.stages.base import Column, fresh_rows, object_array

PAIRFORGE = str(Path(sys.executable).parent / "pairforge")
FEAT_DIM = 8
SCHEMA = {
    c.name: c
    for c in (
        Column("image", "bytes"),
        Column("num_regions", "scalar", "int32", default=0),
        Column("region_boxes", "ragged", "float32", (4,)),
        Column("region_labels", "ragged", "str", ()),
        Column("region_scores", "ragged", "float32", ()),
        Column("region_feats", "ragged", "float16", (FEAT_DIM,), store="arrays"),
    )
}
LABELS = ("person", "dog", "cat")
#: per shard: (width, height, K) of each row; K = 0 rows have no box
SHARDS = {0: [(64, 48, 2), (40, 80, 0), (50, 50, 3), (96, 32, 1)], 1: [(32, 32, 1), (70, 45, 4)]}
#: rows of shard 0 the writer sends to rejects (their regions must not show)
REJECTED = {2}


def jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def normalised_boxes(rng, k: int) -> np.ndarray:
    a, b = rng.uniform(0, 1, (k, 2)), rng.uniform(0, 1, (k, 2))
    return np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.float32)  # x0 y0 x1 y1


def shard_rows(sid: int, with_regions: bool = True) -> dict:
    spec = SHARDS[sid]
    n = len(spec)
    rng = np.random.default_rng(sid)
    rows = fresh_rows(
        [f"{sid:05d}{i:04d}" for i in range(n)], sid, caption=object_array([f"c {sid} {i}" for i in range(n)])
    )
    rows["image"] = object_array([jpeg(w, h, sid * 100 + i) for i, (w, h, _) in enumerate(spec)])
    rows["image_ext"] = object_array(["jpg"] * n)
    rows["width"] = np.array([w for w, _, _ in spec], dtype=np.int64)
    rows["height"] = np.array([h for _, h, _ in spec], dtype=np.int64)
    if sid == 0:
        for i in REJECTED:
            rows["status"][i], rows["stage"][i], rows["reason"][i] = "dropped", "basic_filter", "too_small"
    if with_regions:
        ks = [k for _, _, k in spec]
        rows["num_regions"] = np.array(ks, dtype=np.int32)
        rows["region_boxes"] = object_array([normalised_boxes(rng, k) for k in ks])
        rows["region_labels"] = object_array([np.array([LABELS[j % 3] for j in range(k)], dtype=str) for k in ks])
        rows["region_scores"] = object_array([np.sort(rng.uniform(0.5, 1, k)).astype(np.float32)[::-1] for k in ks])
        rows["region_feats"] = object_array([rng.standard_normal((k, FEAT_DIM)).astype(np.float16) for k in ks])
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run's shard files and the rows that went into them."""
    out = tmp_path_factory.mktemp("run")
    written = {}
    for sid in SHARDS:
        rows = shard_rows(sid)
        write_shard(rows, out, sid, schema=SCHEMA)
        written[sid] = rows
    return out, written


def samples(written) -> dict[str, dict]:
    """key -> the row's values, for the rows that made it into a shard."""
    out = {}
    for rows in written.values():
        for i, key in enumerate(rows["key"]):
            if rows["status"][i] == "ok":
                out[key] = {c: rows[c][i] for c in rows}
    return out


def export(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([PAIRFORGE, "export", "coco", *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_export_loads_in_pycocotools_with_pixel_boxes(run, tmp_path):
    out, written = run
    target = tmp_path / "det.json"
    r = export(out, "--out", target, "--captions", tmp_path / "caps.json")
    assert "5 images, 8 boxes in 3 categories" in r.stdout, r.stdout
    coco = COCO(str(target))
    want = samples(written)
    assert sorted(coco.getImgIds()) == sorted(int(k) for k in want)
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == [(1, "cat"), (2, "dog"), (3, "person")]  # sorted, from 1
    names = {c["id"]: c["name"] for c in cats}
    for key, row in want.items():
        img = coco.loadImgs(int(key))[0]
        assert img["file_name"] == f"{key}.jpg" and img["shard"] == f"shards/{key[:5]}.tar"
        assert (img["width"], img["height"]) == (row["width"], row["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(key)]))
        assert len(anns) == row["num_regions"]
        w, h = float(row["width"]), float(row["height"])
        for ann, box, label, score in zip(anns, row["region_boxes"], row["region_labels"], row["region_scores"]):
            x0, y0, x1, y1 = box.astype(np.float64) * [w, h, w, h]
            np.testing.assert_allclose(ann["bbox"], [x0, y0, x1 - x0, y1 - y0], rtol=0, atol=1e-9)
            assert ann["area"] == pytest.approx((x1 - x0) * (y1 - y0))
            assert names[ann["category_id"]] == label and ann["iscrowd"] == 0
            assert ann["score"] == pytest.approx(float(score))
    assert coco.getAnnIds(imgIds=[1]) == []  # 000000001: the row with no box is an image without annotations
    assert 1 in coco.getImgIds()
    assert not (out / "coco.json").exists()  # --out was honoured
    caps = COCO(str(tmp_path / "caps.json"))
    assert sorted(caps.getImgIds()) == sorted(coco.getImgIds())
    for key, row in want.items():
        (ann,) = caps.loadAnns(caps.getAnnIds(imgIds=[int(key)]))
        assert ann["caption"] == row["caption"]
    detection = json.loads(target.read_text())
    assert sorted((c["image_id"], c["caption"]) for c in detection["captions"]) == sorted(
        (int(k), r["caption"]) for k, r in want.items()
    )
    assert not list(tmp_path.glob(".*.tmp*"))


def test_default_paths_and_manifest_categories(tmp_path):
    out = tmp_path / "run"
    write_shard(shard_rows(1), out, 1, schema=SCHEMA)
    listed = ["__background__", "person", "N/A", "cat"]  # "dog" is found but not listed
    manifest = {"format": "pairforge-manifest/2", "stages": [{"name": "regions", "categories": listed}]}
    layout.atomic_write_bytes(layout.manifest_json(out), json.dumps(manifest).encode())
    export(out)
    coco = COCO(str(out / "coco.json"))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, "person"), (3, "cat"), (4, "dog")]
    COCO(str(out / "coco_captions.json"))


def test_clear_errors_name_the_path(tmp_path):
    r = export(tmp_path, check=False)
    assert r.returncode == 2 and str(tmp_path / "shards") in r.stderr and "Traceback" not in r.stderr
    r = export(tmp_path / "missing", check=False)
    assert r.returncode == 2 and str(tmp_path / "missing") in r.stderr
    plain = tmp_path / "plain"
    write_shard(shard_rows(1, with_regions=False), plain, 1, schema={"image": SCHEMA["image"]})
    r = export(plain, check=False)
    assert r.returncode == 2 and str(layout.shard_parquet(plain, 1)) in r.stderr and "region_boxes" in r.stderr
    assert not (plain / "coco.json").exists()


def test_read_regions_in_pixels(run):
    out, written = run
    want = samples(written)
    got = {**read_regions(out, 0), **read_regions(out, 1)}
    assert list(got) == sorted(want)
    for key, (boxes, labels, scores) in got.items():
        row = want[key]
        w, h = row["width"], row["height"]
        np.testing.assert_allclose(boxes, row["region_boxes"].astype(np.float64) * [w, h, w, h])
        assert boxes.shape == (row["num_regions"], 4) and list(labels) == list(row["region_labels"])
        np.testing.assert_array_equal(scores, row["region_scores"])


def test_arrays_are_aligned_with_parquet_rows(run):
    import pyarrow.parquet as pq

    out, written = run
    want = samples(written)
    for sid in SHARDS:
        keys = pq.read_table(layout.shard_parquet(out, sid), columns=["key"]).column("key").to_pylist()
        feats = read_arrays(out, "region_feats", sid)
        assert len(feats) == len(keys)
        for key, f in zip(keys, feats):
            assert f.dtype == np.float16 and f.shape == (want[key]["num_regions"], FEAT_DIM)
            np.testing.assert_array_equal(f, want[key]["region_feats"])
    assert "region_feats" not in pq.read_table(layout.shard_parquet(out, 0)).column_names


def test_arrays_reader_refuses_offsets_that_do_not_fit(run, tmp_path):
    out, _ = run
    bad = tmp_path / "bad"
    write_shard(shard_rows(1), bad, 1, schema=SCHEMA)
    offsets = np.load(layout.array_offsets(bad, "region_feats", 1))
    np.save(layout.array_offsets(bad, "region_feats", 1), offsets[:-1])
    with pytest.raises(RegionsError, match="do not fit"):
        read_arrays(bad, "region_feats", 1)
    with pytest.raises(FileNotFoundError, match="region_clip"):
        read_arrays(out, "region_clip", 0)


def test_webdataset_reads_region_arrays_inside_the_image(run):
    out, written = run
    want = samples(written)
    seen = 0
    for sid in SHARDS:
        for s in wds.WebDataset(str(layout.shard_tar(out, sid)), shardshuffle=False).decode("rgb8"):
            boxes, img = s["region_boxes.npy"], s["jpg"]
            h, w = img.shape[:2]
            assert (w, h) == (s["json"]["width"], s["json"]["height"])
            assert boxes.dtype == np.float32 and boxes.shape == (s["json"]["num_regions"], 4)
            px = boxes.astype(np.float64) * [w, h, w, h]
            assert np.all(px >= 0) and np.all(px[:, [0, 2]] <= w) and np.all(px[:, [1, 3]] <= h)
            assert np.all(px[:, 2] >= px[:, 0]) and np.all(px[:, 3] >= px[:, 1])
            np.testing.assert_array_equal(boxes, want[s["__key__"]]["region_boxes"])
            assert list(s["region_labels.npy"]) == list(want[s["__key__"]]["region_labels"])
            seen += 1
    assert seen == len(want)
