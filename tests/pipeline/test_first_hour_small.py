"""The small things of issue 28's finding 6, each as a user meets it:
``pairforge --version``, an example in every help text, ``train --help``
without markup and with its choices, short names for the shipped weights,
``regions`` with ``detectors: [mtcnn]``, ``duplicate_of`` null on kept
rows, and ``ray.data.read_webdataset`` over a run's ``shards/`` folder."""

import argparse
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.cli import _parser
from pairforge.pipeline import checks
from pairforge.pipeline.config import load_job
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from pairforge.stages.common.assets import SHIPPED, resolve
from tests.shardkit import jpeg

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pairforge", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip


def test_version_names_pairforge_python_and_ray():
    got = _cli("--version")
    assert got.returncode == 0 and got.stdout.startswith("pairforge ") and ", ray 2." in got.stdout


def _commands(parser: argparse.ArgumentParser, path=("pairforge",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_help_text_has_an_example():
    commands = list(_commands(_parser()))
    assert len(commands) >= 10
    for path, parser in commands:
        if path[-1] == "train":  # the trainer owns its help: below
            continue
        text = parser.format_help()
        assert "examples:\n  pairforge " in text, path
    assert "3 no row reached a shard" in _parser().format_help()


def test_train_help_is_plain_text_with_choices_and_examples():
    got = _cli("train", "--help")
    assert got.returncode == 0
    assert "``" not in got.stdout and ":mod:" not in got.stdout
    assert "{auto,bf16,fp32}" in got.stdout and "{auto,device,worker}" in got.stdout
    assert "examples:\n  pairforge train out/ --out train/" in got.stdout
    assert "--json FILE" in got.stdout


def test_shipped_weights_have_short_names(tmp_path):
    assert all(p.is_file() for p in SHIPPED.values())
    assert resolve("pf-tiny-scorer") == str(SHIPPED["pf-tiny-scorer"]) and resolve("x.pt") == "x.pt"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a cat"]}), tmp_path / "u.parquet")
    clip = {"name": "clip_score", "model": "pf-tiny", "pretrained": "pf-tiny-scorer"}
    regions = {"name": "regions", "detectors": [{"model": "pf-tiny", "weights": "pf-tiny-detector"}]}
    job = load_job({"input": {"paths": ["u.parquet"]}, "output": {"dir": "out"},
                    "stages": ["download", clip, regions, "shard"]}, tmp_path)  # fmt: skip
    assert job.stages[1].config.pretrained == "pf-tiny-scorer"  # the job keeps the name; loaders resolve it
    assert checks.check_job(job) == []


def test_the_shipped_scorer_loads_by_its_short_name():
    from pairforge.stages.common import clip

    loaded = clip.load("pf-tiny", "pf-tiny-scorer", "cpu")
    assert loaded.identity["sha256"] == clip.file_sha256(str(SHIPPED["pf-tiny-scorer"]))
    assert clip.model_identity("pf-tiny", "pf-tiny-scorer")["sha256"] == loaded.identity["sha256"]


def test_regions_takes_a_detector_by_name_and_features_that_fit_it(tmp_path):
    def regions(**opts):
        job = {"input": {"paths": ["u.parquet"]}, "output": {"dir": "out"},
               "stages": ["download", {"name": "regions", **opts}, "shard"]}  # fmt: skip
        return load_job(job, tmp_path).stages[1].config

    faces = regions(detectors=["mtcnn"])
    assert faces.detectors[0].model == "mtcnn" and faces.features == ()  # MTCNN has no map to pool from
    assert regions(detectors=[{"model": "mtcnn"}]).features == ()
    assert regions(detectors="mtcnn").detectors[0].model == "mtcnn"
    both = regions(detectors=["pf-tiny", "mtcnn"])
    assert [d.model for d in both.detectors] == ["pf-tiny", "mtcnn"] and both.features == ("roi",)
    with pytest.raises(Exception, match=r"stages\[1\]\(regions\)\.features: expected no 'roi' when the first "
                                        r"detector is mtcnn.*, got \['roi'\]"):  # fmt: skip
        regions(detectors=["mtcnn"], features=["roi"])


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory):
    """A local run of 6 rows, two pairs of them the same image at two URLs."""
    tmp = tmp_path_factory.mktemp("dedup")
    routes = {f"/{i}.jpg": Route(jpeg(i % 4), "image/jpeg") for i in range(6)}
    with LocalHTTPServer(routes) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(6)]
        pq.write_table(pa.table({"url": urls, "caption": [f"photo number {i}" for i in range(6)]}), tmp / "u.parquet")
        dl = {"name": "download", "image_size": 16, "thread_count": 2, "allow_networks": ["127.0.0.0/8"]}
        job = {"input": {"paths": ["u.parquet"]}, "output": {"dir": "out", "samples_per_shard": 3},
               "runner": "local", "stages": [dl, "dedup_exact", "shard"]}  # fmt: skip
        manifest = run_job(load_job(job, tmp))
    return tmp / "out", manifest


def test_duplicate_of_is_null_on_kept_rows(dedup_run):
    out, manifest = dedup_run
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))])
    gone = pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))])
    assert kept.num_rows == 4 and gone.num_rows == 2
    assert kept.column("duplicate_of").null_count == 4 and kept.schema.field("duplicate_of").type == pa.string()
    assert set(gone.column("duplicate_of").to_pylist()) <= set(kept.column("key").to_pylist())
    assert {"name": "duplicate_of", "kind": "string", "nullable": True, "stage": "dedup_exact"} in manifest["schema"]
    with tarfile.open(sorted((out / "shards").glob("*.tar"))[0]) as tar:
        meta = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert meta and all(m["duplicate_of"] is None for m in meta)


def test_ray_reads_the_shards_folder_as_webdataset_with_file_extensions(dedup_run, ray_local):
    """``shards/`` holds ``.parquet`` and ``_stats.json`` files beside the
    tars: ``read_webdataset`` must be told to read the tars only."""
    import ray

    out, _ = dedup_run
    shards = str(out / "shards")
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the tar reader's error in its own types
        ray.data.read_webdataset(shards).take_all()
    got = ray.data.read_webdataset(shards, file_extensions=["tar"]).take_all()
    assert len(got) == 4 and all(row["jpg"] is not None for row in got)
    keys = [k for p in sorted((out / "shards").glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]
    assert sorted(row["__key__"] for row in got) == sorted(keys)


def test_the_decoder_sees_real_images(dedup_run):
    from PIL import Image

    out, _ = dedup_run
    with tarfile.open(sorted((out / "shards").glob("*.tar"))[0]) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert jpgs and Image.open(io.BytesIO(jpgs[0])).size == (16, 16)
