"""A run whose URL list and output are on S3: a real S3-compatible server
(moto's, on 127.0.0.1) and real clients (pyarrow's S3 filesystem, which the
pipeline uses; webdataset's tar reader; the ``pairforge manifest verify``
command). The round trip: a driver killed half-way writing to ``s3://``,
resumed with ``--resume`` on local Ray, gives byte for byte the shards of the
same job written to a local folder without interruption, and ``manifest
verify s3://...`` passes, then fails on a tampered object.

Nothing leaves loopback: the server binds 127.0.0.1, every client is given
its endpoint, and the session has dummy credentials and no EC2 metadata
lookup (``tests/conftest.py``)."""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from pairforge.cli import main as cli_main
from pairforge.manifests import layout, storage
from pairforge.manifests.manifest import read_manifest, verify
from pairforge.pipeline.checks import check_job
from pairforge.pipeline.config import ConfigError, load_job
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from pairforge.pipeline.raystart import loopback_env
from pairforge.pipeline.resume import rows_mark
from tests.shardkit import jpeg

BUCKET = "pairforge-test"
SHARDS, PER_SHARD = 6, 8


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, with one bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        endpoint = f"http://127.0.0.1:{port}"
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield endpoint, fs
    finally:
        server.stop()


def _root(s3, prefix: str) -> storage.ObjectPath:
    return storage.path(f"s3://{BUCKET}/{prefix}", storage.StorageConfig(endpoint_url=s3[0]))


# ------------------------------------------------------------ the storage layer


def test_objects_are_written_whole_listed_and_removed(s3):
    root = _root(s3, "unit")
    part = root / "a" / "x.parquet"
    storage.write_parquet(part, pa.table({"k": ["a", "b"]}))
    storage.write_atomic(root / "a" / "b" / "y.json", b"{}")
    assert part.is_file() and (root / "a").is_dir() and not (root / "nope").exists()
    assert storage.read_parquet(part, columns=["k"]).column("k").to_pylist() == ["a", "b"]
    assert [p.name for p in (root / "a").glob("*.parquet")] == ["x.parquet"]
    assert storage.expand(f"s3://{BUCKET}/unit/*/b/*.json", root.config) == [root / "a" / "b" / "y.json"]
    assert [str(p.relative_to(root)) for p in storage.walk_files(root)] == ["a/b/y.json", "a/x.parquet"]
    assert layout.temp_files(root) == []  # an upload goes to its final key: no temporary name
    with pytest.raises(FileNotFoundError):
        (root / "a" / "missing.json").read_text()
    with pytest.raises(ValueError, match="reading only"):
        part.open("wb")
    with pytest.raises(TypeError, match="not a local path"):
        open(part, "rb")  # noqa: SIM115 - a URI must never be taken for a local file name
    storage.rmtree(root / "a")
    assert list(storage.walk_files(root)) == []


def test_storage_options_and_locations_are_checked_naming_key_and_value(s3, tmp_path):
    base = {"input": {"paths": ["u.parquet"]}, "stages": ["shard"]}
    with pytest.raises(ConfigError, match=r"^storage.endpoint_url: expected http://HOST\[:PORT\].*'127.0.0.1:9000'"):
        load_job({**base, "output": {"dir": "s3://b/run"}, "storage": {"endpoint_url": "127.0.0.1:9000"}}, tmp_path)
    with pytest.raises(ConfigError, match="^storage.endpoint: unknown key"):
        load_job({**base, "output": {"dir": "s3://b/run"}, "storage": {"endpoint": "x"}}, tmp_path)
    with pytest.raises(ConfigError, match="^output.dir: 'ftp://h/run': scheme 'ftp' is not supported"):
        load_job({**base, "output": {"dir": "ftp://h/run"}}, tmp_path)
    pq.write_table(pa.table({"url": ["http://h/1"], "caption": ["c"]}), tmp_path / "u.parquet")
    prior = {
        **base,
        "output": {"dir": "out"},
        "stages": [{"name": "dedup_exact", "prior_build": "s3://b/old"}, "shard"],
    }
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\(dedup_exact\).prior_build: 's3://b/old': an earlier build on object"
    ):
        check_job(load_job(prior, tmp_path))
    job = {**base, "output": {"dir": "s3://no-such-bucket/run"}, "storage": {"endpoint_url": s3[0]}, "runner": "local"}
    with pytest.raises(
        ConfigError, match="^output.dir: 's3://no-such-bucket/run': bucket 'no-such-bucket' does not exist"
    ):
        run_job(load_job(job, tmp_path))


# ------------------------------------------------------------ the round trip


def _routes() -> dict:
    n = SHARDS * PER_SHARD  # copies at other URLs, so dedup_exact has work across shards
    return {f"/{i}.jpg": Route(jpeg(i % (n // 2), size=24), "image/jpeg", delay=0.1) for i in range(n)}


def _job(urls: str, out: str, endpoint: str, runner: str = "ray") -> dict:
    return {
        "input": {"paths": [urls]},
        "output": {"dir": out, "samples_per_shard": PER_SHARD},
        "storage": {"endpoint_url": endpoint},
        "runner": runner,
        "stages": [
            {"name": "download", "image_size": 16, "thread_count": 2, "allow_networks": ["127.0.0.1/32"]},
            {"name": "dedup_exact"},
            "shard",
        ],
    }


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_s3_run_killed_then_resumed_equals_a_local_run_and_verifies(s3, tmp_path, ray_local):
    endpoint, fs = s3
    out, urls = _root(s3, "run"), f"s3://{BUCKET}/lists/urls.parquet"
    with LocalHTTPServer(_routes()) as server:
        n = SHARDS * PER_SHARD
        table = pa.table(
            {"url": [server.url(f"/{i}.jpg") for i in range(n)], "caption": [f"c {i % 5}" for i in range(n)]}
        )
        pq.write_table(table, f"{BUCKET}/lists/urls.parquet", filesystem=fs)

        # the driver (in-process runner: no Ray of its own to start) is SIGKILLed half-way
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(_job(urls, str(out), endpoint, runner="local")))
        proc = subprocess.Popen(
            [sys.executable, "-m", "pairforge.cli", "run", str(job_file)],
            env={**os.environ, **loopback_env()},
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "driver.log", "w"),
            start_new_session=True,
        )
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if sum(rows_mark(out, s) is not None for s in range(SHARDS)) >= 2:
                    break
                time.sleep(0.05)
        finally:
            _kill(proc)
        finished = [s for s in range(SHARDS) if rows_mark(out, s) is not None]
        assert 2 <= len(finished) < SHARDS, (finished, (tmp_path / "driver.log").read_text()[-2000:])
        assert not layout.manifest_json(out).exists()

        # --resume on Ray (the runner is not part of what a resume compares)
        hits = sum(server.hits.values())
        man = run_job(load_job(_job(urls, str(out), endpoint)), resume=True)
        assert sum(server.hits.values()) - hits == (SHARDS - len(finished)) * PER_SHARD
        assert man["timing"]["resumed_rows_shards"] == len(finished)
        assert man["stages"][1]["dropped"] == {"duplicate_sha256": n // 2}

        local = tmp_path / "local"  # the same job, the same URL list on S3, written to a local folder
        run_job(load_job(_job(urls, str(local), endpoint)))

    assert layout.temp_files(out) == []
    for sid in range(SHARDS):
        for f in (layout.shard_tar, layout.shard_parquet, layout.rejects_parquet):
            assert f(out, sid).read_bytes() == f(local, sid).read_bytes(), f(out, sid)
    assert layout.sizes_json(out).read_bytes() == layout.sizes_json(local).read_bytes()
    assert (
        read_manifest(out)["counts"] == read_manifest(local)["counts"] == {"input": n, "ok": n // 2, "rejected": n // 2}
    )

    # real readers straight from the bucket: webdataset's tar reader, pyarrow's parquet reader
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with fs.open_input_stream(f"{BUCKET}/run/shards/00000.tar") as stream:
        samples = list(group_by_keys(tar_file_expander([{"url": "00000.tar", "stream": stream}])))
    keys = pq.read_table(f"{BUCKET}/run/shards/00000.parquet", filesystem=fs).column("key").to_pylist()
    assert [s["__key__"] for s in samples] == keys and all(s["jpg"][:2] == b"\xff\xd8" for s in samples)

    # pairforge manifest verify s3://...: whole, then one tampered object is named
    verify_cmd = ["manifest", "verify", str(out), "--endpoint-url", endpoint]
    assert verify(out) == [] and cli_main(verify_cmd) == 0
    tar = layout.shard_tar(out, 1)
    tar.write_bytes(tar.read_bytes()[:-1024] + b"\x01" * 1024)
    assert any("shards/00001.tar: checksum mismatch" in p for p in verify(out))
    assert cli_main(verify_cmd) == 1
