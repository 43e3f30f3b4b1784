"""The stage contract end to end: ragged columns (K varies, K = 0 included)
and a global stage that sets columns on kept rows and writes a side table,
through both runners, the shard files (read back by pyarrow and
webdataset), the rejects, resume and ``manifest verify``."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.manifests import layout
from pairforge.manifests.manifest import read_manifest, verify
from pairforge.manifests.shards import write_shard
from pairforge.pipeline.config import load_job
from pairforge.pipeline.job import run_job
from pairforge.stages.base import STATUS_FAILED, Column, fresh_rows, object_array, reject, run_stage_batch
from tests.contract_stages import RaggedConfig, RaggedStage, boxes_for

N = 30
RAGGED = "tests.contract_stages:RaggedStage"
LINK = "tests.contract_stages:LinkStage"


def test_ragged_defaults_for_rows_the_stage_never_saw():
    rows = fresh_rows([f"00000{i:03d}" for i in range(6)], caption=object_array(["c"] * 6))
    reject(rows, np.array([0, 1, 0, 0, 1, 0], bool), "download", "http_404", {}, status=STATUS_FAILED)
    out = run_stage_batch(RaggedStage(RaggedConfig()), rows)
    assert [b.shape for b in out["boxes"]] == [(0, 4), (0, 4), (2, 4), (0, 4), (0, 4), (2, 4)]
    assert all(b.dtype == np.float32 for b in out["boxes"]) and out["labels"][2].dtype == np.int64
    assert list(out["n_boxes"]) == [0, -1, 2, 0, -1, 2] and out["n_boxes"].dtype == np.int64


def test_writer_routes_columns_by_declared_kind(tmp_path):
    import webdataset as wds

    keys = [f"00000{i:03d}" for i in range(5)]
    rows = fresh_rows(keys, caption=object_array([f"c{i}" for i in range(5)]))
    rows["image"] = object_array([b"\xff\xd8fake"] * 5)
    rows["image_ext"] = object_array(["jpg"] * 5)
    rows["boxes"] = object_array([boxes_for(k) for k in keys])
    rows["vec"] = np.arange(15, dtype=np.float32).reshape(5, 3)
    schema = {
        "boxes": Column("boxes", "ragged", "float32", (4,)),
        "vec": Column("vec", "vector", "float32", (3,)),
        "image": Column("image", "bytes"),
    }
    write_shard(rows, tmp_path, 0, schema=schema)
    t = pq.read_table(layout.shard_parquet(tmp_path, 0))
    assert t.schema.field("boxes").type == pa.list_(pa.list_(pa.float32(), 4))
    assert t.schema.field("vec").type == pa.list_(pa.float32(), 3) and "image" not in t.column_names
    for k, got in zip(t.column("key").to_pylist(), t.column("boxes").to_pylist()):
        assert np.array_equal(np.array(got, np.float32).reshape(-1, 4), boxes_for(k))
    samples = list(wds.WebDataset(str(layout.shard_tar(tmp_path, 0)), shardshuffle=False).decode())
    assert [s["boxes.npy"].shape for s in samples] == [boxes_for(k).shape for k in keys]
    assert "boxes" not in samples[0]["json"]  # arrays travel as .npy members, not JSON


def _job(tmp_path, out, runner, drop_every=5):
    pq.write_table(
        pa.table({"url": [f"http://x/{i}.jpg" for i in range(N)], "caption": [f"thing {i}" for i in range(N)]}),
        tmp_path / "urls.parquet",
    )
    return load_job(
        {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": out, "samples_per_shard": 8},
            "runner": runner,
            "stages": [{"name": RAGGED}, {"name": LINK, "drop_every": drop_every}, "shard"],
        },
        base_dir=tmp_path,
    )


def _files(out):
    names = [layout.shard_parquet, layout.shard_tar, layout.rejects_parquet]
    got = {f(out, s).name + f.__name__: f(out, s).read_bytes() for s in range(4) for f in names}
    for p in sorted(layout.side_table_dir(out, "links").glob("*.parquet")):
        got["links/" + p.name] = p.read_bytes()
    return got


@pytest.mark.slow
def test_ragged_and_side_tables_through_both_runners_resume_and_verify(tmp_path, ray_local):
    import webdataset as wds

    local = run_job(_job(tmp_path, "local", "local"))
    run_job(_job(tmp_path, "ray", "ray"))
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")  # same bytes from both runners

    out = tmp_path / "ray"
    assert verify(out) == []
    man = read_manifest(out)
    schema = {c["name"]: c for c in man["schema"]}
    assert schema["boxes"] == {
        "name": "boxes",
        "kind": "ragged",
        "dtype": "float32",
        "shape": [4],
        "stage": "ragged_test",
    }
    assert man["side_tables"]["links"]["rows"] == local["counts"]["ok"]
    link = man["stages"][1]
    assert link["name"] == "link_test" and link["dropped"] == {"link_test_drop": 5}  # 27 alive, every 5th of them

    shards = pa.concat_tables([pq.read_table(layout.shard_parquet(out, s)) for s in range(4)])
    rejects = pa.concat_tables([pq.read_table(layout.rejects_parquet(out, s)) for s in range(4)])
    assert shards.num_rows + rejects.num_rows == N
    for k, b in zip(shards.column("key").to_pylist(), shards.column("boxes").to_pylist()):
        assert np.array_equal(np.array(b, np.float32).reshape(-1, 4), boxes_for(k))
    assert 0 in shards.column("n_boxes").to_pylist()  # K = 0 made it through
    ranks = shards.column("rank").to_pylist()
    assert sorted(ranks) == list(range(shards.num_rows))  # set by the fit on every kept row
    by_reason = dict(zip(rejects.column("key").to_pylist(), rejects.column("reason").to_pylist()))
    assert sum(r == "unlucky_key" for r in by_reason.values()) == 3
    dropped = [k for k, r in by_reason.items() if r == "link_test_drop"]
    # rows the global stage dropped keep their own ragged values, and get -1 for what it would have set
    rej = {r["key"]: r for r in rejects.to_pylist()}
    assert all(rej[k]["rank"] == -1 and len(rej[k]["boxes"]) == len(boxes_for(k)) for k in dropped)
    links = pa.concat_tables([pq.read_table(p) for p in sorted((out / "links").glob("*.parquet"))])
    partner = dict(zip(shards.column("key").to_pylist(), shards.column("partner").to_pylist()))
    assert dict(zip(links.column("anchor_key").to_pylist(), links.column("partner_key").to_pylist())) == partner
    tar_boxes = {
        s["__key__"]: s["boxes.npy"] for s in wds.WebDataset(str(layout.shard_tar(out, 2)), shardshuffle=False).decode()
    }
    assert tar_boxes and all(np.array_equal(v, boxes_for(k)) for k, v in tar_boxes.items())

    # resume: shard 1 lost everything (rows, shard, stats); the rest is reused and the bytes match
    cut = tmp_path / "cut"
    run_job(_job(tmp_path, "cut", "ray"))
    for f in (layout.shard_stats, layout.shard_tar, layout.shard_parquet, layout.rejects_parquet):
        f(cut, 1).unlink()
    man2 = run_job(_job(tmp_path, "cut", "ray"), resume=True)
    assert man2["timing"]["resumed_shards"] == 3
    assert _files(cut) == _files(out) and verify(cut) == []

    # a linked key removed from the shards: verify names the side table
    par = layout.shard_parquet(out, 0)
    t = pq.read_table(par)
    linked = set(links.column("partner_key").to_pylist())
    victim = next(k for k in t.column("key").to_pylist() if k in linked)
    pq.write_table(t.filter(pa.compute.not_equal(t.column("key"), victim)), par)
    problems = verify(out)
    assert any("links/" in p and "partner_key" in p and victim in p for p in problems), problems


def test_job_refuses_a_changed_job_on_resume(tmp_path):
    from pairforge.pipeline.job import JobError

    run_job(_job(tmp_path, "out", "local"))
    (tmp_path / "out" / "shards" / "00001_stats.json").unlink()
    with pytest.raises(JobError, match="job changed"):
        run_job(_job(tmp_path, "out", "local", drop_every=4), resume=True)
    assert json.loads(layout.job_record(tmp_path / "out").read_text())["stages"][1]["drop_every"] == 5


def test_manifest_counts_survivors_a_later_stage_dropped(tmp_path):
    shas = ["a" * 64, "a" * 64, "a" * 64, "b" * 64, "b" * 64, "c" * 64]
    pq.write_table(
        pa.table({"url": [f"http://x/{i}" for i in range(6)], "caption": list("uvwxyz"), "sha256": shas}),
        tmp_path / "urls.parquet",
    )
    job = load_job(
        {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": "out", "samples_per_shard": 4},
            "runner": "local",
            "stages": [
                {"name": "dedup_exact", "kinds": ["sha256"], "keep": "first"},
                {"name": "tests.contract_stages:RejectKeysStage", "keys": ["000000"]},  # the survivor of 0, 1, 2
                "shard",
            ],
        },
        base_dir=tmp_path,
    )
    man = run_job(job)
    dedup = man["stages"][0]
    assert dedup["dropped"] == {"duplicate_sha256": 3}
    assert dedup["survivors_dropped_later"] == {"reject_keys": {"survivors": 1, "duplicates": 2}}
    assert verify(tmp_path / "out") == []


@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_stage_that_raises_is_one_line_naming_stage_and_row(tmp_path, runner, request):
    from pairforge.cli import main

    if runner == "ray":
        request.getfixturevalue("ray_local")
    import yaml

    job = _job(tmp_path, "out", runner)  # writes the URL list
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "input": {"paths": [str(tmp_path / "urls.parquet")]},
                "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 8},
                "runner": runner,
                "stages": [{"name": "tests.contract_stages:BrokenStage"}, "shard"],
            }
        )
    )
    assert job.runner == runner
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", str(tmp_path / "job.yaml")])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("pairforge: error")]
    assert code == 2 and len(lines) == 1, err.getvalue()[-2000:]
    import re

    # whichever shard fails first: a row whose key ends in 3
    assert re.search(r"stage broken_test failed on row \d+3: ZeroDivisionError: a bug", lines[0]), lines[0]
    assert "ZeroDivisionError: a bug" in (tmp_path / "out" / "_work" / "error.log").read_text()
