import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from pairforge.manifests import layout
from pairforge.manifests.shards import read_stats, write_shard
from pairforge.stages.base import Column, take
from tests.shardkit import rows


def test_shard_files_and_stats(tmp_path):
    r = rows(10, shard_id=3, rejected={2: "too_small", 7: "too_small"}, emb_dim=8)
    schema = {"img_emb": Column("img_emb", "vector", shape=(8,), store="embeddings")}
    stats = write_shard(r, tmp_path, 3, schema=schema)
    assert stats["version"] == 3
    assert stats["count"] == 10 and stats["successes"] == 8 and stats["rejected"] == 2
    assert stats["rejects_by_stage"] == {"filter": {"too_small": 2}}
    assert abs(stats["stage_seconds"]["download"] - 0.1) < 1e-9
    par = pq.read_table(layout.shard_parquet(tmp_path, 3))
    assert par.num_rows == 8 and "image" not in par.column_names and "stage" not in par.column_names
    assert {"key", "url", "caption", "width", "height", "sha256", "status"} <= set(par.column_names)
    rej = pq.read_table(layout.rejects_parquet(tmp_path, 3))
    assert rej.column("key").to_pylist() == ["000030002", "000030007"]
    assert rej.column("reason").to_pylist() == ["too_small"] * 2 and json.loads(rej.column("detail")[0].as_py()) == {
        "i": 2
    }
    emb = np.load(layout.embedding_npy(tmp_path, "img_emb", 3))
    ok = np.flatnonzero(r["status"] == "ok")
    assert emb.dtype == np.float16 and emb.shape == (8, 8)
    np.testing.assert_allclose(emb, r["img_emb"][ok].astype(np.float16))
    rej_emb = np.load(layout.rejects_embedding_npy(tmp_path, "img_emb", 3))
    np.testing.assert_allclose(rej_emb, r["img_emb"][[2, 7]].astype(np.float16))
    assert "img_emb" not in par.column_names
    for name, entry in stats["files"].items():
        data = (tmp_path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert read_stats(tmp_path, 3)["successes"] == 8
    # an undeclared 2-D column is not guessed to be an embedding
    write_shard(r, tmp_path / "undeclared", 3)
    assert not (tmp_path / "undeclared" / "embeddings").exists()


def test_same_rows_in_any_order_give_identical_bytes(tmp_path):
    r = rows(12, rejected={5: "x"})
    write_shard(r, tmp_path / "a", 0)
    write_shard(take(r, np.random.default_rng(1).permutation(12)), tmp_path / "b", 0)
    for f in ("shards/00000.tar", "shards/00000.parquet", "rejects/00000.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_webdataset_reads_back_images_captions_metadata(tmp_path):
    r = rows(6)
    write_shard(r, tmp_path, 0)
    samples = list(wds.WebDataset(str(layout.shard_tar(tmp_path, 0)), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == list(r["key"])
    s = samples[4]
    assert isinstance(s["jpg"], Image.Image) and s["jpg"].size == (32, 32)
    assert s["txt"] == "caption number 4"
    assert s["json"]["url"] == "http://h/0/4.jpg" and s["json"]["sha256"] == r["sha256"][4]
    with tarfile.open(layout.shard_tar(tmp_path, 0)) as tar:
        raw = tar.extractfile("000000004.jpg").read()
    assert raw == r["image"][4]
    assert Image.open(io.BytesIO(raw)).format == "JPEG"


def test_unfinished_shard_is_not_done(tmp_path):
    write_shard(rows(3), tmp_path, 0)
    layout.shard_tar(tmp_path, 0).unlink()
    assert read_stats(tmp_path, 0) is None
    assert read_stats(tmp_path, 1) is None


def test_empty_and_all_rejected_shards(tmp_path):
    stats = write_shard(rows(3, rejected={0: "a", 1: "a", 2: "b"}), tmp_path, 0)
    assert stats["successes"] == 0
    assert pq.read_table(layout.shard_parquet(tmp_path, 0)).num_rows == 0
    assert list(wds.WebDataset(str(layout.shard_tar(tmp_path, 0)), shardshuffle=False)) == []


def test_img2dataset_stats_status_and_error_message(tmp_path):
    """img2dataset's stats keys, status vocabulary and error_message, keeping our reason/detail."""
    r = rows(6, rejected={1: "http_404", 2: "decode_error", 4: "duplicate_sha256"})
    for i, (stage, status, detail) in {
        1: ("download", "failed", {"url": "http://h/0/1.jpg", "http_status": 404}),
        2: ("download", "failed", {"error": "cannot identify image file"}),
        4: ("dedup_exact", "dropped", {"distance": 0, "match": ["sha256"]}),
    }.items():
        r["stage"][i], r["status"][i], r["detail"][i] = stage, status, json.dumps(detail)
    stats = write_shard(r, tmp_path, 0)
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (6, 3, 1, 1)
    assert stats["status_dict"] == {"decode_error": 1, "duplicate_sha256": 1, "http_404": 1, "success": 3}
    assert stats["status"] == {"dropped": 1, "failed_to_download": 1, "failed_to_resize": 1, "success": 3}
    assert stats["end_time"] >= stats["start_time"] and stats["duration"] >= 0.06  # the stages' seconds + the write
    assert abs(stats["end_time"] - stats["start_time"] - stats["duration"]) < 1e-3
    par = pq.read_table(layout.shard_parquet(tmp_path, 0))
    assert set(par.column("status").to_pylist()) == {"success"} and "error_message" not in par.column_names
    rej = pq.read_table(layout.rejects_parquet(tmp_path, 0)).to_pylist()
    assert [x["status"] for x in rej] == ["failed_to_download", "failed_to_resize", "dropped"]
    assert [x["error_message"] for x in rej] == [
        "http_404 (http_status=404)",
        "decode_error: cannot identify image file",
        "duplicate_sha256 (distance=0)",
    ]
    assert [x["reason"] for x in rej] == ["http_404", "decode_error", "duplicate_sha256"]
    with tarfile.open(layout.shard_tar(tmp_path, 0)) as tar:
        assert json.loads(tar.extractfile("000000000.json").read())["status"] == "success"


def test_clip_retrieval_metadata_matches_embedding_rows(tmp_path):
    """embeddings/metadata/metadata_S.parquet: the rows of img_emb_S.npy, in order, listed in the stats."""
    r = rows(7, shard_id=2, rejected={3: "x"}, emb_dim=4)
    schema = {"img_emb": Column("img_emb", "vector", shape=(4,), store="embeddings")}
    stats = write_shard(take(r, np.random.default_rng(0).permutation(7)), tmp_path, 2, schema=schema)
    meta = pq.read_table(layout.embedding_metadata(tmp_path, 2))
    emb = np.load(layout.embedding_npy(tmp_path, "img_emb", 2))
    assert meta.num_rows == len(emb) == 6
    order = {k: i for i, k in enumerate(r["key"])}
    want = np.stack([r["img_emb"][order[k]] for k in meta.column("key").to_pylist()]).astype(np.float16)
    np.testing.assert_array_equal(emb, want)
    assert {"url", "caption", "key"} <= set(meta.column_names)
    assert "embeddings/metadata/metadata_00002.parquet" in stats["files"]
