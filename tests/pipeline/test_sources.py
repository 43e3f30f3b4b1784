"""PMD-style jobs: several sources, each with its own format and column
names, into one dataset with a ``source`` column, one key space, cross-source
dedup and counts per source in the manifest. Images come from the project's
local HTTP server; jobs run in process (``runner: local``), one on local Ray."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.manifests import layout
from pairforge.manifests.manifest import read_manifest, verify, write_manifest
from pairforge.pipeline.checks import check_job
from pairforge.pipeline.config import ConfigError, InputConfig, load_job, to_dict
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from pairforge.pipeline.reader import split_input
from tests.shardkit import jpeg

SHARED = jpeg(99, size=40)


@pytest.fixture(scope="module")
def server():
    routes = {f"/web/{i}.jpg": Route(jpeg(i, size=40), "image/jpeg") for i in range(4)}
    routes.update({f"/coco/{i}.jpg": Route(jpeg(10 + i, size=40), "image/jpeg") for i in range(3)})
    routes["/web/shared.jpg"] = Route(SHARED, "image/jpeg")
    routes["/coco/mirror.jpg"] = Route(SHARED, "image/jpeg")  # the same picture, elsewhere, captioned otherwise
    routes["/web/gone.jpg"] = Route(b"", status=404)
    with LocalHTTPServer(routes) as s:
        yield s


def _write_sources(tmp_path, server):
    """A CSV with its own column names (6 rows, one of them a 404) and a
    COCO captions file (5 captions of 4 images; image 0 has two)."""
    web = [f"/web/{i}.jpg" for i in range(4)] + ["/web/shared.jpg", "/web/gone.jpg"]
    lines = ["URL,TEXT,license"] + [f"{server.url(p)},web caption {i},cc-by" for i, p in enumerate(web)]
    (tmp_path / "web.csv").write_text("\n".join(lines) + "\n")
    images = [
        {"id": 1, "file_name": "a.jpg", "coco_url": server.url("/coco/0.jpg"), "flickr_url": "http://x/never"},
        {"id": 2, "file_name": "b.jpg", "flickr_url": server.url("/coco/1.jpg")},
        {"id": 3, "file_name": "c.jpg", "url": server.url("/coco/2.jpg")},
        {"id": 4, "file_name": "d.jpg", "coco_url": server.url("/coco/mirror.jpg")},
    ]
    anns = [{"id": 10 + i, "image_id": im, "caption": f"coco caption {i}"} for i, im in enumerate([1, 2, 3, 4, 1])]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))


def _job(tmp_path, out="out", runner="local", **web):
    sources = [
        {
            "paths": ["web.csv"],
            "columns": {"URL": "url", "TEXT": "caption"},
            "source": "web",
            **web,
        },
        {"paths": ["captions.json"], "format": "coco", "source": "coco"},
    ]
    stages = [
        {"name": "download", "image_size": 32, "allow_networks": ["127.0.0.1/32"], "timeout": 5.0, "retries": 0},
        "dedup_exact",
        "shard",
    ]
    return load_job(
        {"input": sources, "output": {"dir": out, "samples_per_shard": 4}, "runner": runner, "stages": stages},
        base_dir=tmp_path,
    )


def _tables(out, kind, n=4):
    return pa.concat_tables([pq.read_table(kind(out, s)) for s in range(n)], promote_options="permissive").to_pylist()


WANT_SOURCES = {
    "web": {"input": 6, "ok": 5, "rejected": 1, "rejects_by_stage": {"download": {"http_404": 1}}},
    # the mirror of web's shared image, and the second caption of image 1 (dedup_exact's default kinds)
    "coco": {"input": 5, "ok": 3, "rejected": 2, "rejects_by_stage": {"dedup_exact": {"duplicate_sha256": 2}}},
}


def test_two_sources_into_one_dataset(tmp_path, server):
    _write_sources(tmp_path, server)
    man = run_job(_job(tmp_path))
    out = tmp_path / "out"
    assert verify(out) == []
    assert man["sources"] == WANT_SOURCES
    assert list(man["sources"]) == ["web", "coco"]  # in input order
    assert man["counts"] == {"input": 11, "ok": 8, "rejected": 3}
    for k in ("input", "ok", "rejected"):
        assert sum(s[k] for s in man["sources"].values()) == man["counts"][k]
    # one shard numbering, source after source; each source starts a shard of its own
    assert man["input"]["shard_rows"] == {"0": 4, "1": 2, "2": 4, "3": 1}

    rows = _tables(out, layout.shard_parquet)
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows) == 8
    every = rows + _tables(out, layout.rejects_parquet)
    shard_sources = {(r["key"][:5], r["source"]) for r in every}
    assert sorted(shard_sources) == [("00000", "web"), ("00001", "web"), ("00002", "coco"), ("00003", "coco")]
    web_row = next(r for r in rows if r["source"] == "web")
    assert web_row["caption"].startswith("web caption") and web_row["license"] == "cc-by"
    coco = sorted((r for r in rows if r["source"] == "coco"), key=lambda r: r["key"])
    assert [r["url"].rsplit("/", 2)[-2:] for r in coco] == [["coco", "0.jpg"], ["coco", "1.jpg"], ["coco", "2.jpg"]]
    assert [(r["image_id"], r["id"], r["file_name"]) for r in coco] == [
        (1, 10, "a.jpg"),
        (2, 11, "b.jpg"),
        (3, 12, "c.jpg"),
    ]

    rejects = {r["key"]: r for r in _tables(out, layout.rejects_parquet)}
    shared = next(k for k, r in by_key.items() if r["url"].endswith("/web/shared.jpg"))
    mirror = next(r for r in rejects.values() if r["url"].endswith("/coco/mirror.jpg"))
    assert mirror["source"] == "coco" and mirror["reason"] == "duplicate_sha256"
    assert mirror["duplicate_of"] == shared  # web's row, the smaller key, survives

    man["sources"]["coco"]["ok"] = 4  # a manifest that does not match the files
    write_manifest(out, man)
    problems = verify(out)
    assert any(p.startswith("sources.coco: input 5 != ok 4 + rejected 2") for p in problems), problems
    assert any(p.startswith("sources.coco.ok: manifest says 4, the shards and rejects hold 3") for p in problems)


def test_sources_split_one_after_another_with_stable_keys(tmp_path, server):
    _write_sources(tmp_path, server)
    job = _job(tmp_path)
    split_input(job.input, tmp_path / "o", 4)
    first = [pq.read_table(layout.input_shard(tmp_path / "o", s)) for s in range(4)]
    again = tmp_path / "again"
    split_input(job.input, again, 4)
    assert [t.equals(pq.read_table(layout.input_shard(again, s))) for s, t in enumerate(first)] == [True] * 4
    rows = pa.concat_tables(first, promote_options="permissive").to_pylist()
    assert [r["key"] for r in rows] == ["00000" + str(i) for i in range(4)] + ["000010", "000011"] + [
        "00002" + str(i) for i in range(4)
    ] + ["000030"]
    # adding a source at the end leaves the keys of the others as they were
    split_input(job.input[:1], tmp_path / "one", 4)
    assert pq.read_table(layout.input_shard(tmp_path / "one", 1)).equals(first[1])
    coco = [r for r in rows if r["source"] == "coco"]
    assert [r["caption"] for r in coco] == [f"coco caption {i}" for i in range(5)]  # one row per caption
    assert coco[0]["url"].endswith("/coco/0.jpg")  # coco_url before flickr_url


def test_coco_annotation_without_its_image_is_a_row_with_no_url(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}))
    split_input((InputConfig(paths=(str(tmp_path / "c.json"),), format="coco"),), tmp_path / "o", 10)
    row = pq.read_table(layout.input_shard(tmp_path / "o", 0)).to_pylist()[0]
    assert (row["url"], row["caption"], row["image_id"], row["source"]) == ("", "x", 7, "c")


def test_single_input_form_is_unchanged(tmp_path):
    pq.write_table(pa.table({"url": [f"http://h/{i}" for i in range(5)], "caption": ["c"] * 5}), tmp_path / "u.parquet")
    raw = {"input": {"paths": ["u.parquet"]}, "output": {"dir": "out", "samples_per_shard": 3}, "runner": "local"}
    job = load_job({**raw, "stages": ["shard"]}, base_dir=tmp_path)
    assert isinstance(job.input, InputConfig) and job.input.columns == {}
    assert "columns" not in to_dict(job)["input"]  # the job record of a run is as before
    man = run_job(job)
    assert man["sources"] == {"u": {"input": 5, "ok": 5, "rejected": 0, "rejects_by_stage": {}}}
    keys = [r["key"] for r in _tables(tmp_path / "out", layout.shard_parquet, 2)]
    assert keys == ["000000", "000001", "000002", "000010", "000011"] and verify(tmp_path / "out") == []


@pytest.mark.parametrize(
    "source, error",
    [
        ({"format": "xml"}, r"^input\[1\]\.format: expected one of auto, parquet, csv, tsv, jsonl, coco, got 'xml'$"),
        ({"source": "web"}, r"^input\[1\]\.source: 'web' is input\[0\]'s too"),
        ({"colums": {}}, r"^input\[1\]\.colums: unknown key, given \{\} \(did you mean 'columns'\?\)$"),
        ({"columns": ["url"]}, r"^input\[1\]\.columns: expected a mapping"),
        ({"columns": {"TEXT": 3}}, r"^input\[1\]\.columns: expected column name: column name, got 'TEXT': 3$"),
    ],
)
def test_a_bad_source_names_its_key_and_value(tmp_path, source, error):
    raw = {
        "input": [{"paths": ["a.csv"], "source": "web"}, {"paths": ["b.json"], "format": "coco", **source}],
        "output": {"dir": "out"},
        "stages": ["shard"],
    }
    with pytest.raises(ConfigError, match=error):
        load_job(raw, base_dir=tmp_path)


def test_files_of_a_source_are_checked_before_ray_starts(tmp_path, server):
    _write_sources(tmp_path, server)
    (tmp_path / "bad.json").write_text("[1, 2]")
    checks = [
        ({"columns": {"URL": "url", "TXT": "caption"}}, r"input\[0\]\.columns: 'TXT' is not a column of .*web\.csv"),
        ({"columns": {"URL": "key"}}, r"input\[0\]\.columns: 'URL' -> 'key': 'key' is a column pairforge sets"),
        ({"columns": {"URL": "license"}}, r"input\[0\]\.columns: .*two columns 'license' after renaming"),
        ({"columns": {"URL": "link"}}, r"input\[0\]\.url_col: 'url' is not a column of .*web\.csv"),
        ({"paths": ["bad.json"], "format": "coco"}, r"input\[0\]\.paths: cannot read .*bad\.json.* as coco"),
    ]
    for web, error in checks:
        job = _job(tmp_path, runner="ray", **web)
        with pytest.raises(ConfigError, match=error):
            check_job(job)
        with pytest.raises(ConfigError, match=error):
            run_job(job)  # on the driver: no Ray, nothing written
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_both_runners_give_the_same_files(tmp_path, server, ray_local):
    _write_sources(tmp_path, server)
    run_job(_job(tmp_path, out="local"))
    man = run_job(_job(tmp_path, out="ray", runner="ray"))
    assert man["ray"]["runner"] == "ray" and man["sources"] == WANT_SOURCES
    for sid in range(4):
        for f in (layout.shard_parquet, layout.rejects_parquet, layout.shard_tar):
            assert f(tmp_path / "ray", sid).read_bytes() == f(tmp_path / "local", sid).read_bytes(), f(tmp_path, sid)
    assert verify(tmp_path / "ray") == []
    assert read_manifest(tmp_path / "ray")["sources"] == read_manifest(tmp_path / "local")["sources"]
