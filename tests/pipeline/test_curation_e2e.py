"""MetaCLIP's and ALIGN's recipes end to end: ``metadata_match`` ->
``balance`` -> ``align_text`` -> ``shard`` over a URL list with a Zipf law
of entries and planted boilerplate. The in-process runner writing a local
folder and Ray writing to S3 (moto's server on 127.0.0.1) give the same
bytes; a resume after a lost shard gives them again; another
``samples_per_shard`` keeps the same rows; the manifest's counts before and
after balancing are those of the shards; the report draws them."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.manifests import layout
from pairforge.manifests.manifest import read_manifest, verify
from pairforge.pipeline.config import load_job
from pairforge.pipeline.job import run_job
from pairforge.stages.common import balancing
from tests.pipeline.test_object_storage import BUCKET, s3  # noqa: F401 - the moto server fixture

N, ENTRIES, T = 900, 40, 25


def _url_list(tmp_path) -> None:
    rng = np.random.default_rng(7)
    p = 1.0 / np.arange(1, ENTRIES + 1) ** 1.2
    caps = []
    for i in range(N):
        if i % 60 == 0:
            caps.append("click to enlarge")  # 15 rows: boilerplate for align_text
        elif i % 97 == 0:
            caps.append("a photo with no entry at all")
        else:
            ents = rng.choice(ENTRIES, size=rng.integers(1, 3), p=p / p.sum())
            caps.append("a photo of " + " and ".join(f"e{e}" for e in ents) + f" number {i}")
    # "enlarge" (id ENTRIES): an entry of 15 rows, under t, so balance keeps every boilerplate row for align_text
    (tmp_path / "entries.txt").write_text("\n".join([f"e{i}" for i in range(ENTRIES)] + ["enlarge"]) + "\n")
    urls = [f"http://img.invalid/{i}.jpg" for i in range(N)]
    pq.write_table(pa.table({"url": urls, "caption": caps}), tmp_path / "urls.parquet")


def _job(tmp_path, out: str, runner: str, per_shard: int = 100, endpoint: str | None = None):
    job = {
        "input": {"paths": [str(tmp_path / "urls.parquet")]},
        "output": {"dir": out, "samples_per_shard": per_shard},
        "runner": runner,
        "stages": [
            {"name": "metadata_match", "entries": str(tmp_path / "entries.txt"), "word_boundaries": True},
            {"name": "balance", "t": T},
            {"name": "align_text", "max_caption_images": 10, "min_unigrams": 3},
            "shard",
        ],
    }
    if endpoint:
        job["storage"] = {"endpoint_url": endpoint}
    return load_job(job)


def _files(out, shards: int) -> dict:
    fns = (layout.shard_tar, layout.shard_parquet, layout.rejects_parquet)
    return {f"{f.__name__}/{s}": f(out, s).read_bytes() for s in range(shards) for f in fns}


def _rows(out, shards: int, which: str) -> pa.Table:
    f = layout.shard_parquet if which == "shards" else layout.rejects_parquet
    return pa.concat_tables([pq.read_table(f(out, s)) for s in range(shards)], promote_options="default")


@pytest.mark.slow
def test_both_runners_object_storage_resume_and_shard_size_give_the_same_rows(tmp_path, ray_local, s3, capsys):  # noqa: F811
    _url_list(tmp_path)
    shards = N // 100
    local = tmp_path / "local"
    man = run_job(_job(tmp_path, str(local), "local"))
    assert verify(local) == []
    dropped = {s["name"]: s["dropped"] for s in man["stages"]}
    assert dropped["metadata_match"] == {"no_metadata_match": 9}
    assert dropped["balance"]["balance_not_sampled"] > 100
    assert dropped["align_text"] == {"caption_shared": 15}

    # Ray, writing to S3: the same bytes
    out = f"s3://{BUCKET}/curation"
    run_job(_job(tmp_path, out, "ray", endpoint=s3[0]))
    from pairforge.manifests import storage

    s3_out = storage.path(out, storage.StorageConfig(endpoint_url=s3[0]))
    assert _files(s3_out, shards) == _files(local, shards)

    # a lost shard on S3, resumed on Ray: the same bytes again
    for f in (layout.shard_stats, layout.shard_tar, layout.shard_parquet, layout.rejects_parquet):
        f(s3_out, 3).unlink()
    again = run_job(_job(tmp_path, out, "ray", endpoint=s3[0]), resume=True)
    assert again["timing"]["resumed_shards"] == shards - 1
    assert _files(s3_out, shards) == _files(local, shards) and verify(s3_out) == []

    # another shard size numbers the rows anew: the same URLs are kept
    other = tmp_path / "other"
    run_job(_job(tmp_path, str(other), "local", per_shard=70))
    kept = set(_rows(local, shards, "shards").column("url").to_pylist())
    assert set(_rows(other, -(-N // 70), "shards").column("url").to_pylist()) == kept

    # the manifest's counts before and after balancing are the shards' own
    s = balancing.summary(next(f for f in man["fits"] if f["stage"] == "balance"))
    kept_rows = _rows(local, shards, "shards")
    rej = _rows(local, shards, "rejects")
    before, after = np.zeros(ENTRIES + 1, int), np.zeros(ENTRIES + 1, int)
    for ents in kept_rows.column("metadata_entries").to_pylist():
        before[ents] += 1
        after[ents] += 1
    alive = kept_rows.num_rows
    for ents, stage in zip(rej.column("metadata_entries").to_pylist(), rej.column("stage").to_pylist()):
        if stage in ("balance", "align_text"):  # alive at balance; align_text dropped it after
            before[ents] += 1
            after[ents] += stage == "align_text"
            alive += 1
    assert s["rows"] == alive
    for e, b, a in s["top"]:
        assert (b, a) == (before[e], after[e])
    assert s["entries_over_t"] == int((before > T).sum()) >= 3
    for d in rej.filter(pa.compute.equal(rej.column("reason"), "balance_not_sampled")).column("detail").to_pylist():
        assert all(c > T for c in json.loads(d)["counts"])

    from pairforge.cli import main as cli_main

    assert cli_main(["manifest", "show", str(local)]) == 0
    shown = capsys.readouterr().out
    e, b, a = s["top"][0]
    assert f"balance:  t={T}, {s['entries_used']} entries used" in shown and f"{e}: {b}->{a}" in shown

    from pairforge.manifests.report import write_report

    rep = write_report(local)
    assert (local / "report" / "entries.png").read_bytes()[:4] == b"\x89PNG"
    assert "Metadata entry counts" in (local / "report" / "index.html").read_text() and rep["plots"] >= 1
    assert read_manifest(local)["fits"][0]["stage"] == "balance"
