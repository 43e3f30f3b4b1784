"""A job end to end on a real local Ray, downloading from a real local HTTP
server, read back by the readers trainers use."""

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.manifests import layout
from pairforge.manifests.manifest import read_manifest, verify
from pairforge.pipeline.config import load_job
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from tests.shardkit import jpeg

pytestmark = pytest.mark.slow
N_OK = 30


@pytest.fixture(scope="module")
def server():
    routes = {f"/img/{i}.jpg": Route(jpeg(i, size=48), "image/jpeg") for i in range(N_OK)}
    routes.update({f"/copy/{i}.jpg": routes[f"/img/{i}.jpg"] for i in range(10)})  # same bytes, other URLs
    routes["/gone.jpg"] = Route(b"", status=404)
    routes["/page.jpg"] = Route(b"<html></html>", "text/html")
    with LocalHTTPServer(routes) as s:
        yield s


def _job(tmp_path, server, out="out", runner="ray"):
    urls = [server.url(f"/img/{i}.jpg") for i in range(N_OK)] + [
        server.url("/gone.jpg"),
        server.url("/page.jpg"),
        "nope",
    ]
    pq.write_table(
        pa.table({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))], "lang": ["en"] * len(urls)}),
        tmp_path / "urls.parquet",
    )
    return load_job(
        {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": out, "samples_per_shard": 8},
            "runner": runner,
            "stages": [
                {
                    "name": "download",
                    "image_size": 32,
                    "resize_mode": "center_crop",
                    "allow_networks": ["127.0.0.1/32"],
                    "timeout": 5.0,
                },
                "shard",
            ],
        },
        base_dir=tmp_path,
    )


def test_job_on_local_ray_then_verify_then_tamper(tmp_path, server, ray_local):
    man = run_job(_job(tmp_path, server))
    assert man["counts"] == {"input": N_OK + 3, "ok": N_OK, "rejected": 3}
    dl = man["stages"][0]
    assert dl["name"] == "download" and dl["in"] == N_OK + 3 and dl["out"] == N_OK and sum(dl["dropped"].values()) == 3
    assert "http_404" in dl["dropped"] and man["ray"]["runner"] == "ray"
    out = tmp_path / "out"
    assert verify(out) == []
    rej = pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))])
    assert rej.num_rows == 3 and all(r for r in rej.column("reason").to_pylist())
    par = pq.read_table(layout.shard_parquet(out, 0))
    assert par.column("lang").to_pylist()[0] == "en"  # extra input columns are carried through
    tar = layout.shard_tar(out, 2)
    tar.write_bytes(tar.read_bytes()[:-1024] + b"\x01" * 1024)
    assert any("00002.tar" in p for p in verify(out))


def test_open_clip_training_loader_reads_the_shards(tmp_path, server, ray_local):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    run_job(_job(tmp_path, server))
    shards = str(tmp_path / "out" / "shards" / "{00000..00004}.tar")
    import torchvision.transforms as T

    preprocess = T.Compose([T.Resize(32), T.ToTensor()])
    tokenizer = open_clip.get_tokenizer("RN50")
    args = argparse.Namespace(
        train_data=shards,
        train_num_samples=None,
        train_data_upsampling_factors=None,
        val_data=None,
        batch_size=5,
        workers=1,
        world_size=1,
        seed=0,
    )
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    assert info.dataloader.num_samples == N_OK  # read from our sizes.json, as open_clip training does
    batches = list(info.dataloader)
    assert batches, "open_clip's loader produced no batch"
    for images, texts in batches:
        assert images.shape == (5, 3, 32, 32) and texts.shape == (5, 77)


def test_resume_after_interruption_is_identical(tmp_path, server, ray_local):
    run_job(_job(tmp_path, server, out="full"))
    run_job(_job(tmp_path, server, out="cut"))
    cut = tmp_path / "cut"
    # an interrupted run: shard 1 never finished, shard 3 was half written
    for f in (
        layout.shard_stats(cut, 1),
        layout.shard_tar(cut, 1),
        layout.shard_parquet(cut, 1),
        layout.shard_stats(cut, 3),
    ):
        f.unlink()
    layout.shard_tar(cut, 3).write_bytes(b"partial")
    layout.rejects_parquet(cut, 4).unlink()
    man = run_job(_job(tmp_path, server, out="cut"), resume=True)
    assert man["timing"]["resumed_shards"] == 2  # shards 0 and 2; 1, 3, 4 (rejects gone) rerun
    full = tmp_path / "full"
    for sid in range(5):
        for f in (layout.shard_parquet, layout.rejects_parquet, layout.shard_tar):
            assert f(cut, sid).read_bytes() == f(full, sid).read_bytes(), f(cut, sid)
    assert verify(cut) == []
    assert read_manifest(cut)["counts"] == read_manifest(full)["counts"]


@pytest.fixture(scope="module")
def random_scorer(tmp_path_factory):
    """pf-tiny with seeded random weights: scores are arbitrary but fixed,
    which is all a runner-parity test needs."""
    import open_clip
    import torch

    from pairforge.stages.common import clip as _clip

    _clip.register_model_configs()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scorer") / "pf-tiny-random.pt"
    torch.save(open_clip.create_model("pf-tiny").state_dict(), path)
    return str(path)


def _model_job(tmp_path, server, scorer, out, runner):
    # every image twice more, at other URLs with other captions: semantic duplicates
    urls = [server.url(f"/img/{i}.jpg") for i in range(N_OK)] + [server.url(f"/copy/{i}.jpg") for i in range(10)]
    urls += [server.url("/gone.jpg")]
    pq.write_table(
        pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(len(urls))]}),
        tmp_path / "urls.parquet",
    )
    stages = [
        {"name": "download", "image_size": 64, "allow_networks": ["127.0.0.1/32"], "timeout": 5.0},
        {"name": "clip_score", "model": "pf-tiny", "pretrained": scorer, "top_fraction": 0.7, "batch_size": 8},
        {"name": "dedup_semantic", "n_clusters": 3},
        "shard",
    ]
    job = {"input": {"paths": ["urls.parquet"]}, "output": {"dir": out, "samples_per_shard": 8}, "runner": runner}
    return load_job({**job, "stages": stages}, base_dir=tmp_path)


def _kept_and_rejected(out):
    import pandas as pd

    shards = pd.concat([pq.read_table(layout.shard_parquet(out, s)).to_pandas() for s in range(6)])
    rejects = pd.concat([pq.read_table(layout.rejects_parquet(out, s)).to_pandas() for s in range(6)])
    return sorted(shards.key), dict(zip(rejects.key, rejects.reason))


def test_model_and_global_stages_agree_in_process_on_ray_and_after_resume(tmp_path, server, random_scorer, ray_local):
    run_job(_model_job(tmp_path, server, random_scorer, "local", runner="local"))
    run_job(_model_job(tmp_path, server, random_scorer, "ray", runner="ray"))
    run_job(_model_job(tmp_path, server, random_scorer, "cut", runner="ray"))
    for f in (layout.shard_stats(tmp_path / "cut", 2), layout.shard_parquet(tmp_path / "cut", 2)):
        f.unlink()
    man = run_job(_model_job(tmp_path, server, random_scorer, "cut", runner="ray"), resume=True)
    assert man["timing"]["resumed_shards"] == 5

    kept, rejected = _kept_and_rejected(tmp_path / "local")
    reasons = sorted(set(rejected.values()))
    assert reasons == ["clip_score_below_top_fraction", "duplicate_semantic", "http_404"], reasons
    top = sum(r == "clip_score_below_top_fraction" for r in rejected.values())
    assert top == (N_OK + 10) - int(0.7 * (N_OK + 10) + 0.5)  # the cut runs before semantic dedup
    assert len(kept) + len(rejected) == N_OK + 11 and not set(kept) & set(rejected)
    for other in ("ray", "cut"):
        assert _kept_and_rejected(tmp_path / other) == (kept, rejected), other
    for sid in range(6):
        for f in (layout.shard_parquet, layout.rejects_parquet, layout.embedding_npy):
            args = ("img_emb", sid) if f is layout.embedding_npy else (sid,)
            assert f(tmp_path / "cut", *args).read_bytes() == f(tmp_path / "ray", *args).read_bytes()
    assert verify(tmp_path / "cut") == []


def _every_stage_job(tmp_path, server, scorer, out, runner):
    urls = [server.url(f"/img/{i}.jpg") for i in range(N_OK)] + [server.url(f"/copy/{i}.jpg") for i in range(10)]
    urls += [server.url("/gone.jpg"), server.url("/page.jpg")]
    captions = [f"a photo number {i}" for i in range(len(urls))]
    captions[3] = "x"  # too short for basic_filter
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "every.parquet")
    stages = [
        {"name": "download", "image_size": 64, "allow_networks": ["127.0.0.1/32"], "timeout": 5.0},
        {"name": "basic_filter", "min_image_size": 0},
        {"name": "dedup_exact", "kinds": ["sha256"]},
        {"name": "dedup_phash"},
        {"name": "clip_score", "model": "pf-tiny", "pretrained": scorer, "top_fraction": 0.8, "batch_size": 8},
        {"name": "dedup_semantic", "n_clusters": 3, "keep": "clip_score", "eps": 0.0005},
        {"name": "regions", "score_threshold": 0.05, "batch_size": 8, "micro_batch": 4},
        {"name": "tests.contract_stages:RaggedStage"},
        {"name": "tests.contract_stages:LinkStage"},
        "shard",
    ]
    job = {"input": {"paths": ["every.parquet"]}, "output": {"dir": out, "samples_per_shard": 8}, "runner": runner}
    return load_job({**job, "stages": stages}, base_dir=tmp_path)


def test_every_stage_gives_the_same_bytes_in_process_and_on_ray(tmp_path, server, random_scorer, ray_local):
    local = run_job(_every_stage_job(tmp_path, server, random_scorer, "local", runner="local"))
    remote = run_job(_every_stage_job(tmp_path, server, random_scorer, "ray", runner="ray"))

    def counters(man):  # the stage counters, less their timings
        return [{k: v for k, v in st.items() if k != "seconds"} for st in man["stages"]]

    assert counters(local) == counters(remote) and local["counts"] == remote["counts"]
    dropped = {s["name"]: s["dropped"] for s in local["stages"]}
    assert dropped["basic_filter"] and dropped["dedup_exact"] and dropped["clip_score"] and dropped["link_test"]
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    compared = [
        f for f in files if f.parts[0] in ("shards", "rejects", "embeddings", "arrays", "links") and "_stats" not in f.name
    ]
    assert len(compared) > 20
    regions = [f for f in compared if f.parts[0] == "arrays" and f.name.endswith(".offsets.npy")]
    assert regions and sum(int(np.load(tmp_path / "local" / f)[-1]) for f in regions) > 0  # boxes were found
    for f in compared:
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes(), f
    assert verify(tmp_path / "ray") == []
