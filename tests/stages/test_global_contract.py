"""A new global stage is plain to write: a whole one, in under 40 lines and
with only the public contract (``stages.base``, ``stages.options``), runs
in a real job (a local HTTP server, the in-process runner, real shards read
back and verified) and in a unit test through the same join the run uses
(``pipeline.local.run_global`` -> ``engine.join_decisions``). The stage is
``tests/global_stage_example.py``."""

import inspect
import json

import pyarrow.parquet as pq

import pairforge
from pairforge.stages.base import fresh_rows, object_array
from tests.global_stage_example import CaptionDedup, CaptionDedupConfig

CAPTIONS = ["a red cup", "A  red cup", "a blue cup", "a red CUP", "a green cup", "a blue cup", "a dog"]


def test_the_stage_is_under_40_lines_of_the_public_contract():
    lines = [ln for ln in (inspect.getsource(CaptionDedupConfig) + inspect.getsource(CaptionDedup)).splitlines() if ln.strip()]
    assert len(lines) < 40, len(lines)
    source = inspect.getsource(inspect.getmodule(CaptionDedup))
    imports = [ln for ln in source.splitlines() if ln.startswith(("import ", "from "))]
    assert [ln for ln in imports if "pairforge" in ln] == [
        "from pairforge.stages.base import FitResult, GlobalStage, batch_len, object_array",
        "from pairforge.stages.options import options",
    ]  # the public contract, nothing of the runners


def test_run_global_applies_its_decisions_with_the_runs_join():
    from pairforge.pipeline.local import run_global

    rows = fresh_rows([f"0000{i}" for i in range(len(CAPTIONS))], caption=object_array(CAPTIONS))
    out = run_global(CaptionDedup(), rows)
    dropped = {k: json.loads(d)["duplicate_of"] for k, s, d in zip(out["key"], out["status"], out["detail"]) if s != "ok"}
    assert dropped == {"00001": "00000", "00003": "00000", "00005": "00002"}
    assert set(out["reason"][out["status"] != "ok"]) == {"duplicate_caption"} and list(rows["status"]) == ["ok"] * 7


def test_the_stage_runs_in_a_job_and_its_rejects_are_verified(tmp_path):
    import pyarrow as pa

    from pairforge.manifests.manifest import verify
    from pairforge.pipeline.httpserver import LocalHTTPServer, Route
    from pairforge.stages import Download, Shard
    from tests.shardkit import jpeg

    routes = {f"/{i}.jpg": Route(jpeg(i, size=40), "image/jpeg") for i in range(len(CAPTIONS))}
    with LocalHTTPServer(routes) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(len(CAPTIONS))]
        pq.write_table(pa.table({"url": urls, "caption": CAPTIONS}), tmp_path / "urls.parquet")
        job = pairforge.Job(
            input=tmp_path / "urls.parquet",
            output=pairforge.Output(dir=tmp_path / "out", samples_per_shard=3),
            stages=[Download(image_size=32, allow_networks=["127.0.0.1/32"]), CaptionDedup(buckets=4), Shard()],
            runner="local",
        )
        manifest = pairforge.run(job)
    assert job.stages[1].name == "tests.global_stage_example:CaptionDedup"
    assert manifest["counts"] == {**manifest["counts"], "input": 7, "ok": 4, "rejected": 3}
    rejects = pq.read_table([str(p) for p in sorted((tmp_path / "out" / "rejects").glob("*.parquet"))]).to_pylist()
    assert sorted((r["caption"], r["reason"]) for r in rejects) == [
        ("A  red cup", "duplicate_caption"), ("a blue cup", "duplicate_caption"), ("a red CUP", "duplicate_caption")]  # fmt: skip
    fit = next(f for f in manifest["fits"] if f["stage"] == "caption_dedup")
    assert fit["counters"] == {"duplicate_captions": 3}
    assert verify(tmp_path / "out") == []
