import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from manifests import layout
from manifests.shards import read_stats, write_shard
from stages.base import Column, take
from tests.shardkit import rows


def test_shard_files_and_stats(tmp_path):
    r = rows(10, shard_id=3, rejected={2: "too_small", 7: "too_small"}, emb_dim=8)
    schema = {"img_emb": Column("img_emb", "vector", shape=(8,), store="embeddings")}
    stats = write_shard(r, tmp_path, 3, schema=schema)
    assert stats["version"] == 2
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
