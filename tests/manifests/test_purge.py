"""``pairforge purge`` on a real build: the demo (every stage, in process),
built once for the session, copied for each test. A list names one survivor
of a duplicate cluster, one confounder partner and a URL prefix; exactly
those rows leave the tars, parquet, embeddings, arrays and side tables,
become tombstones in the rejects, ``manifest verify`` passes, every other
file keeps its bytes, ``manifest diff`` reports the purge, webdataset,
pyarrow and open_clip's ``sizes.json`` reader read the rewritten shards, and
a second purge changes nothing. The same on a real S3 server (moto, on
127.0.0.1) gives the same bytes. An interrupted purge is finished by the
next ``pairforge purge``."""

import hashlib
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pairforge.cli import main as cli_main
from pairforge.manifests import layout, storage
from pairforge.manifests.diff import diff_runs, format_diff
from pairforge.manifests.manifest import read_manifest, verify
from pairforge.manifests.purge import plan_path
from pairforge.stages.common.blocklist_norm import normalize_url

pytestmark = pytest.mark.slow
BUCKET = "pairforge-purge"
#: files a purge rewrites beyond the affected shards' own (and the side tables')
BOOKKEEPING = ("manifest.json", "shards/sizes.json")


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run[1]  # built once a session (tests/conftest.py), shared with tests/test_demo.py


def _copy(demo, dest):
    shutil.copytree(demo, dest)
    return dest


def _digests(root) -> dict[str, str]:
    root = storage.path(root)
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in storage.walk_files(root)}


def _table(root, pattern: str, columns=None) -> pa.Table:
    root = storage.path(root)
    folder, _, glob = pattern.rpartition("/")
    return pa.concat_tables([storage.read_parquet(p, columns) for p in sorted((root / folder).glob(glob))])


def _choose(run, tmp_path) -> tuple[str, dict]:
    """The list (one survivor of a duplicate cluster, one confounder
    partner, a URL prefix) and the keys it must remove."""
    samples = _table(run, "shards/0*.parquet", ["key", "url"]).to_pylist()
    rejects = _table(run, "rejects/0*.parquet", ["key", "url", "duplicate_of"]).to_pylist()
    url = {r["key"]: r["url"] for r in samples}
    survivors = sorted({r["duplicate_of"] for r in rejects if r["duplicate_of"]} & set(url))
    conf = _table(run, "confounders/0*.parquet").to_pylist()
    partners = sorted(
        {r["partner_key"] for r in conf if r["kind"] == "word_order" and r["partner_key"]} - set(survivors)
    )
    survivor, partner = survivors[0], partners[0]
    host = url[survivor].split("/")[2]
    prefix = f"http://{host}/composite/1"  # composite/1, /10 ... /19: samples and rejects
    under = lambda u: (normalize_url(u) or "").startswith(prefix)  # noqa: E731
    want = {
        "samples": {survivor, partner} | {r["key"] for r in samples if under(r["url"])},
        "rejects": {r["key"] for r in rejects if under(r["url"])},
        "survivor": survivor,
        "partner": partner,
    }
    assert want["rejects"] and len(want["samples"]) > 2, want  # the prefix reaches both
    path = tmp_path / "takedowns.txt"
    path.write_text(
        "# a survivor of a duplicate cluster, written loosely (case, default port, fragment)\n"
        f"{url[survivor].replace('http://', 'HTTP://')}#frag\n"
        f"{url[partner]}  # a confounder partner\n\n"
        f"prefix:{prefix}\n"
    )
    return str(path), want


def _same(a: dict, b: dict) -> bool:
    """Rows equal as written (NaN, the score of a row never scored, equals itself)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _changed(before: dict, after: dict) -> set[str]:
    return {f for f in set(before) | set(after) if before.get(f) != after.get(f)}


def _check_purged(run, original, want: dict, before: dict) -> dict:
    """Everything the purge must have done to ``run`` (a copy of ``original``)."""
    assert verify(run) == []
    after = _digests(run)
    gone = want["samples"]
    man = read_manifest(run)
    [entry] = man["purges"]
    touched = set(entry["shards"])
    assert touched and len(touched) < len(man["shards"])
    # every other file keeps its bytes: only the affected shards' own files, the side tables, the
    # run's own state, sizes.json and the manifest change (and the report, which is removed)
    allowed = {
        f for sh in read_manifest(original)["shards"] + man["shards"] if sh["name"] in touched for f in sh["files"]
    }
    allowed |= {
        f for f in set(before) | set(after) if f.startswith(("confounders/", "confounder_skips/", "report/", "_work/"))
    }
    allowed |= set(BOOKKEEPING)
    assert _changed(before, after) <= allowed, sorted(_changed(before, after) - allowed)
    assert not any(f.startswith("report/") for f in after)  # the report quoted purged captions

    # exactly the listed rows left the samples; they are tombstones in the rejects
    keys_before = set(_table(original, "shards/0*.parquet", ["key"]).column("key").to_pylist())
    keys_after = set(_table(run, "shards/0*.parquet", ["key"]).column("key").to_pylist())
    assert keys_before - keys_after == gone and keys_after <= keys_before
    rej = {r["key"]: r for r in _table(run, "rejects/0*.parquet").to_pylist()}
    for k in gone:
        r = rej[k]
        assert (r["status"], r["stage"], r["reason"]) == ("dropped", "purge", "opted_out")
        assert r["url"] is None and r["caption"] is None and r["sha256"] is None and r["source"] == "pairforge-demo"
        d = json.loads(r["detail"])
        assert d["list"] == "takedowns" and d["kind"] in ("url", "prefix") and "entry" not in d
    old_rej = {r["key"]: r for r in _table(original, "rejects/0*.parquet").to_pylist()}
    for k in want["rejects"]:  # a purged reject keeps its fate, loses its data
        r = rej[k]
        assert (r["stage"], r["reason"], r["status"]) == (
            old_rej[k]["stage"],
            old_rej[k]["reason"],
            old_rej[k]["status"],
        )
        assert r["url"] is None and r["caption"] is None and json.loads(r["detail"])["purged"]["line"] == 5
    others = set(old_rej) - want["rejects"]
    assert all(_same(rej[k], old_rej[k]) for k in others)
    assert sum(entry["by_kind"]["prefix"].values()) + entry["by_kind"]["url"]["samples"] == len(gone) + len(
        want["rejects"]
    )

    # per shard: tar members, embeddings, arrays, rejects' embeddings, sizes.json, stats
    root = storage.path(run)
    sizes = json.loads(layout.sizes_json(root).read_text())
    for sh in man["shards"]:
        sid, name = sh["shard_id"], sh["name"]
        par = storage.read_parquet(layout.shard_parquet(root, sid))
        keys = par.column("key").to_pylist()
        assert sizes[f"{name}.tar"] == len(keys) == sh["samples"]
        tar = layout.shard_tar(root, sid).read_bytes()
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            members = {m.name.split(".", 1)[0] for m in t.getmembers()}
        assert members == set(keys)
        old_keys = storage.read_parquet(layout.shard_parquet(storage.path(original), sid)).column("key").to_pylist()
        pos = [old_keys.index(k) for k in keys]
        for col in ("img_emb", "text_emb"):
            new = np.load(io.BytesIO(layout.embedding_npy(root, col, sid).read_bytes()))
            old = np.load(io.BytesIO(layout.embedding_npy(storage.path(original), col, sid).read_bytes()))
            assert np.array_equal(new, old[pos])
            rkeys = storage.read_parquet(layout.rejects_parquet(root, sid), ["key"]).column("key").to_pylist()
            remb = np.load(io.BytesIO(layout.rejects_embedding_npy(root, col, sid).read_bytes()))
            assert len(remb) == len(rkeys)
            for i, k in enumerate(rkeys):
                if k in gone or k in want["rejects"]:
                    assert not remb[i].any()
        offs = np.load(io.BytesIO(layout.array_offsets(root, "region_feats", sid).read_bytes()))
        flat = np.load(io.BytesIO(layout.array_npy(root, "region_feats", sid).read_bytes()))
        o_offs = np.load(io.BytesIO(layout.array_offsets(storage.path(original), "region_feats", sid).read_bytes()))
        o_flat = np.load(io.BytesIO(layout.array_npy(storage.path(original), "region_feats", sid).read_bytes()))
        assert len(offs) == len(keys) + 1 and offs[-1] == len(flat)
        for i, p in enumerate(pos):
            assert np.array_equal(flat[offs[i] : offs[i + 1]], o_flat[o_offs[p] : o_offs[p + 1]])
        meta = storage.read_parquet(layout.embedding_metadata(root, sid))
        assert meta.equals(par)

    # side tables: exactly the rows that link a purged sample went
    for table in ("confounders", "confounder_skips"):
        links = man["side_tables"][table]["links"]
        old_rows = _table(original, f"{table}/0*.parquet").to_pylist()
        new_rows = _table(run, f"{table}/0*.parquet").to_pylist()
        keep = [r for r in old_rows if not any(r[c] in gone for c in links)]
        assert sorted(map(json.dumps, keep)) == sorted(map(json.dumps, new_rows)), table
        assert man["side_tables"][table]["rows"] == len(new_rows)
    assert entry["side_tables"]["confounders"] > 0

    # the run's own copies: the URL list keeps the purged rows' keys, not their URLs or captions
    inp = _table(run, "_work/input/0*.parquet").to_pylist()
    purged = gone | want["rejects"]
    assert all(r["url"] is None and r["caption"] is None for r in inp if r["key"] in purged)
    assert all(r["url"] is not None for r in inp if r["key"] not in purged)
    assert not plan_path(run).exists()

    d = diff_runs(original, run)
    assert d["changed"] and d["counts"]["ok"] == {"old": man["counts"]["ok"] + len(gone), "new": man["counts"]["ok"]}
    [p] = d["purges"]
    assert p["samples"] == len(gone) and p["rejects"] == len(want["rejects"]) and p["lists"][0]["name"] == "takedowns"
    assert f"purge {entry['id']}: {len(gone)} samples" in format_diff(d)
    return after


def test_purge_removes_exactly_the_listed_rows_everywhere(demo, tmp_path):
    run = _copy(demo, tmp_path / "run")
    before = _digests(run)
    lst, want = _choose(run, tmp_path)
    assert cli_main(["purge", str(run), "--list", lst, "--reason", "opted_out", "--dry-run"]) == 0
    assert _digests(run) == before  # a dry run changes nothing
    assert cli_main(["purge", str(run), "--list", lst, "--reason", "opted_out"]) == 0
    after = _check_purged(run, demo, want, before)
    man = read_manifest(run)
    assert man["stages"][-1]["name"] == "purge" and man["stages"][-1]["dropped"] == {"opted_out": len(want["samples"])}
    assert man["purges"][0]["lists"][0]["sha256"] == hashlib.sha256(open(lst, "rb").read()).hexdigest()

    # real readers: webdataset on the rewritten tar, open_clip's sizes.json reader
    import webdataset as wds
    from open_clip_train.data import get_dataset_size

    for sid in range(len(man["shards"])):
        keys = pq.read_table(layout.shard_parquet(run, sid), columns=["key"]).column("key").to_pylist()
        got = [s["__key__"] for s in wds.WebDataset(str(layout.shard_tar(run, sid)), shardshuffle=False)]
        assert got == keys
    n = len(man["shards"])
    assert get_dataset_size(str(run / "shards" / f"{{00000..{n - 1:05d}}}.tar"))[0] == man["counts"]["ok"]

    # the same lists again: nothing left to remove, not a byte changes
    assert cli_main(["purge", str(run), "--list", lst, "--reason", "opted_out"]) == 0
    assert _digests(run) == after

    # a resumed run rebuilds the manifest from the shards' stats: the purge stays recorded
    from pairforge.pipeline.config import load_job
    from pairforge.pipeline.job import run_job

    job = json.loads((run / "_work" / "job.json").read_text())
    again = run_job(load_job({**job, "output": {**job["output"], "dir": str(run)}, "runner": "local"}), resume=True)
    assert again["stages"][-1] == {**man["stages"][-1], "seconds": 0.0} and again["purges"] == man["purges"]
    assert again["counts"] == man["counts"] and verify(run) == []


def test_an_interrupted_purge_is_finished_by_the_next_one(demo, tmp_path, capsys):
    straight = _copy(demo, tmp_path / "straight")
    lst, want = _choose(straight, tmp_path)
    assert cli_main(["purge", str(straight), "--list", lst, "--workers", "1"]) == 0
    man = read_manifest(straight)
    last = sorted(man["purges"][0]["shards"])[-1]

    run = _copy(demo, tmp_path / "run")
    before = _digests(run)
    tar = run / "shards" / f"{last}.tar"
    good = tar.read_bytes()
    tar.write_bytes(good[:-1] + b"\x01")  # damage the last shard the purge reaches: it stops there
    assert cli_main(["purge", str(run), "--list", lst, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"shards/{last}.tar does not match the manifest" in err
    assert plan_path(run).exists() and verify(run) != []  # half done, and it says so
    assert cli_main(["purge", str(run), "--list", lst, "--dry-run"]) == 0
    assert "is pending: a purge without --dry-run finishes it first" in capsys.readouterr().out
    tar.write_bytes(good)
    assert cli_main(["purge", str(run)]) == 0  # no list: finish what is pending
    assert "finished the interrupted purge" in capsys.readouterr().out
    assert verify(run) == [] and not plan_path(run).exists()
    a, b = _digests(straight), _digests(run)
    data = [f for f in a if not f.endswith(("_stats.json", "manifest.json")) and not f.startswith("_work/purge")]
    assert {f: a[f] for f in data} == {f: b.get(f) for f in data}  # the same bytes as one uninterrupted purge
    assert read_manifest(run)["counts"] == man["counts"] and len(read_manifest(run)["purges"]) == 1
    assert _changed(before, b)  # it did change the build


def test_bad_lists_and_no_list_are_clear_errors(demo, tmp_path, capsys):
    run = demo  # nothing here writes
    bad = tmp_path / "bad.txt"
    bad.write_text("http://ok.example/a\nnot an entry\n")
    assert cli_main(["purge", str(run), "--list", str(bad)]) == 2
    assert f"{bad}:2: 'not an entry'" in capsys.readouterr().err
    assert cli_main(["purge", str(run)]) == 2
    assert "--list: expected at least one list file" in capsys.readouterr().err
    assert cli_main(["purge", str(run), "--list", str(bad), "--max-distance", "40"]) == 2
    assert "max_distance: expected an integer in 0..16, got 40" in capsys.readouterr().err


# ------------------------------------------------------------ on object storage


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, with one bucket (as tests/pipeline/test_object_storage.py)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield f"http://127.0.0.1:{port}", fs
    finally:
        server.stop()


def test_purge_on_s3_gives_the_bytes_of_a_local_purge(demo, tmp_path, s3):
    endpoint, fs = s3
    pafs.copy_files(str(demo), f"{BUCKET}/run", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    local = _copy(demo, tmp_path / "local")
    lst, want = _choose(local, tmp_path)
    with fs.open_output_stream(f"{BUCKET}/lists/takedowns.txt") as f:
        f.write(open(lst, "rb").read())
    uri = f"s3://{BUCKET}/run"
    flags = ["--endpoint-url", endpoint, "--reason", "opted_out"]
    before = _digests(storage.path(uri, storage.StorageConfig(endpoint_url=endpoint)))
    assert cli_main(["purge", uri, "--list", f"s3://{BUCKET}/lists/takedowns.txt", *flags]) == 0
    assert cli_main(["purge", str(local), "--list", lst, "--reason", "opted_out"]) == 0
    assert cli_main(["manifest", "verify", uri, "--endpoint-url", endpoint]) == 0
    root = storage.path(uri, storage.StorageConfig(endpoint_url=endpoint))
    on_s3 = _check_purged(root, demo, want, before)
    here = _digests(local)
    same = [f for f in here if not f.endswith(("_stats.json", "manifest.json"))]
    assert {f: here[f] for f in same} == {f: on_s3.get(f) for f in same}
    assert read_manifest(root)["purges"][0]["lists"][0]["path"] == f"s3://{BUCKET}/lists/takedowns.txt"
    assert cli_main(["purge", uri, "--list", f"s3://{BUCKET}/lists/takedowns.txt", *flags]) == 0
    assert _digests(root) == on_s3  # purging twice changes nothing


def test_signal_summaries_are_recounted_without_the_purged_rows(tmp_path):
    """A declared summary column (the language stage's ``lang_prob``): the
    shard's and the manifest's summaries count only rows that still have a value."""
    from pairforge.manifests.manifest import sum_columns
    from pairforge.pipeline.config import load_job
    from pairforge.pipeline.httpserver import LocalHTTPServer, Route
    from pairforge.pipeline.job import run_job
    from tests.shardkit import jpeg

    captions = ["a red car parked on the street", "ein rotes Auto auf der Straße", "une voiture rouge dans la rue"] * 4
    routes = {f"/{i}.jpg": Route(jpeg(i, size=32), "image/jpeg") for i in range(len(captions))}
    routes["/gone.jpg"] = Route(b"", status=404)
    with LocalHTTPServer(routes) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(len(captions))] + [server.url("/gone.jpg")]
        pq.write_table(pa.table({"url": urls, "caption": [*captions, "a lost picture"]}), tmp_path / "urls.parquet")
        job = {
            "input": {"paths": [str(tmp_path / "urls.parquet")]},
            "output": {"dir": str(tmp_path / "out"), "samples_per_shard": 5},
            "runner": "local",
            "stages": [{"name": "download", "image_size": 16, "allow_networks": ["127.0.0.1/32"]}, "language", "shard"],
        }
        run_job(load_job(job))
    out = tmp_path / "out"
    before = read_manifest(out)
    assert before["columns"]["lang_prob"]["rows"] == len(captions)
    (tmp_path / "l.txt").write_text(f"{urls[1]}\n{urls[7]}\n")
    assert cli_main(["purge", str(out), "--list", str(tmp_path / "l.txt")]) == 0
    assert verify(out) == []
    man = read_manifest(out)
    stats = [json.loads(layout.shard_stats(out, sh["shard_id"]).read_text()) for sh in man["shards"]]
    assert man["columns"] == sum_columns(stats)
    probs = np.concatenate(
        [
            pq.read_table(p, columns=["lang_prob"]).column("lang_prob").to_numpy(zero_copy_only=False)
            for folder in ("shards", "rejects")
            for p in sorted((out / folder).glob("0*.parquet"))
        ]
    ).astype(np.float64)
    probs = probs[np.isfinite(probs)]
    col = man["columns"]["lang_prob"]
    assert col["rows"] == len(probs) == len(captions) - 2
    assert col["sum"] == pytest.approx(probs.sum()) and col["max"] == pytest.approx(probs.max())
