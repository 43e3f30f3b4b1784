"""The Python API (``import pairforge``): configs checked on construction as
a job file's are, stage objects, a job from objects, option docs in
``help()`` and ``pairforge stages``, and ``pairforge.ray_map`` inside a plain
``ray.data`` pipeline."""

import dataclasses
import json
import os
import pydoc
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

import pairforge
from pairforge.cli import main as cli_main
from pairforge.pipeline.config import ConfigError, load_job
from pairforge.stages import STAGES, class_name, download, stage_class
from pairforge.stages.options_doc import describe

ROOT = Path(__file__).resolve().parent.parent


def test_import_pairforge_imports_neither_torch_nor_ray():
    code = (
        "import sys, pairforge\n"
        "from pairforge.stages import Download, DedupExact, Shard\n"
        "pairforge.Job, pairforge.load_job, pairforge.run, pairforge.ray_map, pairforge.ConfigError\n"
        "job = pairforge.Job(input='u.parquet', output='out', stages=[Download(), DedupExact(), Shard()])\n"
        "print(sorted(m for m in ('torch', 'ray', 'open_clip', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_config_takes_python_lists_and_is_usable():
    cfg = download.Config(allow_networks=["127.0.0.1/32"], disallowed_header_directives=["noai"])
    assert cfg.allow_networks == ("127.0.0.1/32",) and isinstance(cfg.disallowed_header_directives, tuple)
    hash(cfg)  # the Ray plan caches set-up stages by config: a list made this fail in setup()
    st = download.DownloadStage(cfg)
    st.setup()
    st.teardown()
    assert download.Config(timeout=3).timeout == 3.0 and type(download.Config(timeout=3).timeout) is float


@pytest.mark.parametrize(
    "options",
    [
        {"retries": "3"},
        {"retries": -3},
        {"timeout": "10"},
        {"allow_networks": [3]},
        {"allow_networks": ["not a network"]},
        {"resize_mode": "squash"},
        {"image_size": True},
        {"no_such_option": 1},
    ],
)
def test_python_and_yaml_refuse_the_same_values_with_the_same_words(tmp_path, options):
    job = {"input": {"paths": ["u.parquet"]}, "output": {"dir": "out"}, "stages": [{"name": "download", **options}, "shard"]}
    with pytest.raises(ConfigError) as from_yaml:
        load_job(job, base_dir=tmp_path)
    with pytest.raises(ConfigError) as from_python:
        pairforge.stages.Download(**options)
    assert str(from_yaml.value).startswith("stages[0](download)")
    assert str(from_python.value).startswith("download")
    assert str(from_yaml.value).removeprefix("stages[0](download)") == str(from_python.value).removeprefix("download")
    key = next(iter(options))
    if key != "no_such_option":  # the config itself says the same, naming the key and the value
        with pytest.raises(ValueError) as from_config:
            download.Config(**options)
        assert str(from_config.value).startswith(key) and repr(options[key]).strip("[]") in str(from_config.value)
        assert str(from_python.value) == f"download.{from_config.value}"


def test_a_stage_takes_its_config_a_mapping_or_keywords():
    a = pairforge.stages.Download(image_size=128, allow_networks="127.0.0.0/8")
    b = pairforge.stages.Download({"image_size": 128, "allow_networks": ["127.0.0.0/8"]})
    c = pairforge.stages.Download(download.Config(image_size=128, allow_networks=("127.0.0.0/8",)))
    assert a.config == b.config == c.config and type(a) is download.DownloadStage
    assert pairforge.stages.Download(c.config, timeout=2).config == dataclasses.replace(c.config, timeout=2.0)
    regions = pairforge.stages.Regions(detectors=[{"model": "pf-tiny"}, {"model": "mtcnn"}], features=[])
    assert [d.model for d in regions.config.detectors] == ["pf-tiny", "mtcnn"]
    with pytest.raises(AttributeError):
        pairforge.stages.NoSuchStage  # noqa: B018


def test_every_option_of_every_stage_has_a_doc_that_help_shows():
    for name in STAGES:
        cls = stage_class(name)
        assert getattr(pairforge.stages, class_name(name)) is cls
        opts = describe(cls.Config)
        assert opts and all(o.doc for o in opts), (name, [o.name for o in opts if not o.doc])
        shown = pydoc.render_doc(cls.Config, renderer=pydoc.plaintext)
        stage_help = pydoc.render_doc(cls, renderer=pydoc.plaintext)
        for o in opts:
            assert f"{o.name} ({o.type}" in shown and f"{o.name} ({o.type}" in stage_help, (name, o.name)
            assert o.doc.split()[0] in shown
    assert "CIDRs allowed although not global" in pydoc.render_doc(download.Config, renderer=pydoc.plaintext)


def test_stages_command_lists_every_option(capsys):
    assert cli_main(["stages"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing and class_name(name) in listing for name in STAGES)
    for name in ("download", "dedup_exact", "shard"):
        assert cli_main(["stages", name]) == 0
        text = capsys.readouterr().out
        for o in describe(stage_class(name).Config):
            assert f"  {o.name}: {o.type}, default {o.default}" in text, (name, o.name)
    assert cli_main(["stages", "no_such_stage"]) == 2
    assert "unknown stage 'no_such_stage'" in capsys.readouterr().err


def test_a_job_from_objects_is_the_job_the_yaml_makes(tmp_path, monkeypatch):
    from pairforge.demo import demo_job

    (tmp_path / "job.yaml").write_text(DEMO_YAML.format(cpus=os.cpu_count()))
    from_yaml = load_job(tmp_path / "job.yaml")
    from_objects = demo_job(tmp_path / "input" / "urls.parquet", tmp_path / "run", runner="local")
    assert from_objects == from_yaml
    monkeypatch.chdir(tmp_path)  # relative paths in Python are the current folder's, as a job file's are its folder's
    short = pairforge.Job(input="input/urls.parquet", output="run", stages=["download", pairforge.stages.Shard()])
    assert short.input.paths == (str(tmp_path / "input" / "urls.parquet"),) and short.output.dir == str(tmp_path / "run")
    with pytest.raises(ConfigError, match="the last stage must be 'shard'"):
        pairforge.Job(input="u.parquet", output="out", stages=[pairforge.stages.Download()])
    with pytest.raises(ConfigError, match=r"runner: expected 'ray' or 'local', got 'spark'"):
        pairforge.Job(input="u.parquet", output="out", stages=["shard"], runner="spark")


#: the demo's job as a job file writes it (docs/getting-started.md shows the same)
DEMO_YAML = """
input:
  paths: [input/urls.parquet]
  source: pairforge-demo
output:
  dir: run
  samples_per_shard: 100
ray:
  num_cpus: {cpus}
runner: local
stages:
  - name: download
    image_size: 128
    timeout: 1.0
    retries: 0
    allow_networks: [127.0.0.1/32]
  - name: basic_filter
    min_image_size: 64
    min_caption_words: 2
  - dedup_exact
  - dedup_phash
  - name: clip_score
    model: pf-tiny
    pretrained: pf-tiny-scorer
    threshold: 0.6
  - name: dedup_semantic
    eps: 0.002
  - name: regions
    detectors: [{{model: pf-tiny}}, {{model: mtcnn}}]
    batch_size: 64
    micro_batch: 8
  - confounders
  - shard
"""


@pytest.mark.slow
def test_the_demo_job_from_objects_writes_the_bytes_of_the_yaml_run(tmp_path, demo_run):
    """``pairforge demo`` runs the demo's job built from objects
    (``demo_job``); the session runs it once (``demo_run``, which other tests
    read too), and here the YAML of the same job runs on the same URL list,
    its corpus served again on the port its URLs name (URLs are in the
    shards' bytes). Should that port be taken meanwhile, the job from objects
    runs here too, beside the YAML, on a new port."""
    from pairforge.demo import build_corpus, demo_job, write_url_list
    from pairforge.manifests.manifest import read_manifest
    from pairforge.pipeline.httpserver import LocalHTTPServer

    rc, object_run = demo_run
    assert rc == 0
    urls = object_run.parent / "input" / "urls.parquet"
    port = urlsplit(pq.read_table(urls, columns=["url"]).column(0)[0].as_py()).port
    (tmp_path / "job.yaml").write_text(DEMO_YAML.format(cpus=os.cpu_count()))
    (tmp_path / "input").mkdir()
    routes, rows = build_corpus()
    try:
        server = LocalHTTPServer(routes, port=port)
        shutil.copy(urls, tmp_path / "input" / "urls.parquet")
    except OSError:
        server = LocalHTTPServer(routes)
        write_url_list(server, rows, tmp_path / "input" / "urls.parquet")
        object_run = None
    with server:
        from_yaml = pairforge.run(tmp_path / "job.yaml")
        if object_run is None:
            object_run = tmp_path / "objects"
            pairforge.run(demo_job(tmp_path / "input" / "urls.parquet", object_run, "local"))
    assert from_yaml["counts"] == read_manifest(object_run)["counts"] and from_yaml["counts"]["rejected"] > 0
    yaml_run = tmp_path / "run"

    def written(run: Path) -> list[Path]:  # the data files: not the manifest, timings, the work folder or the report
        names = (p.relative_to(run) for p in run.rglob("*") if p.is_file())
        return sorted(
            p
            for p in names
            if p.parts[0] not in ("_work", "report") and p.name != "manifest.json" and "_stats" not in p.name
        )

    files = written(yaml_run)
    assert {f.parts[0] for f in files} >= {"shards", "rejects", "embeddings", "arrays", "confounders"}
    assert written(object_run) == files
    for f in files:
        assert (yaml_run / f).read_bytes() == (object_run / f).read_bytes(), f


# ------------------------------------------------------------------ ray_map


def test_ray_map_refuses_what_needs_the_whole_dataset():
    for stage in (pairforge.stages.DedupExact(), pairforge.stages.Shard()):
        with pytest.raises(ValueError, match="ray_map: stage"):
            pairforge.ray_map(None, stage)
    with pytest.raises(ValueError, match="whole dataset"):
        pairforge.ray_map(None, pairforge.stages.ClipScore(pretrained="x.pt", top_fraction=0.3))
    with pytest.raises(TypeError, match="expected a stage"):
        pairforge.ray_map(None, download.Config())


@pytest.mark.slow
def test_download_and_clip_score_in_a_plain_ray_data_pipeline(ray_local):
    import ray

    from pairforge.pipeline.httpserver import LocalHTTPServer, Route
    from pairforge.pipeline.local import map_stage
    from pairforge.pipeline.raymap import with_identity
    from pairforge.stages import ClipScore, Download
    from tests.shardkit import jpeg

    routes = {f"/img/{i}.jpg": Route(jpeg(i, size=64), "image/jpeg") for i in range(12)}
    routes["/gone.jpg"] = Route(b"", status=404)
    routes["/page.jpg"] = Route(b"<html></html>", "text/html")
    with LocalHTTPServer(routes) as server:
        urls = [server.url(p) for p in routes] + [f"http://127.0.0.2:{server.port}/img/0.jpg", "not a url"]
        items = [{"url": u, "caption": f"a photo of thing {i}"} for i, u in enumerate(urls)]
        down = Download(image_size=48, allow_networks=["127.0.0.1/32"], timeout=5, thread_count=4)
        scorer = {"model": "pf-tiny", "pretrained": "pf-tiny-scorer", "device": "cpu", "batch_size": 8}  # the shipped one
        # the same rows in process, for the reference scores and a threshold that drops some
        cols = {k: np.array([it[k] for it in items], dtype=object) for k in ("url", "caption")}
        local = map_stage(ClipScore(scorer), map_stage(down, with_identity(cols)))
        ok = local["status"] == "ok"
        threshold = float(np.median(local["clip_score"][ok]))
        local = map_stage(ClipScore(scorer, threshold=threshold), map_stage(down, with_identity(cols)))

        ds = ray.data.from_items(items, override_num_blocks=3)
        ds = pairforge.ray_map(ds, down)
        ds = pairforge.ray_map(ds, ClipScore(scorer, threshold=threshold))
        got = {r["url"]: r for r in ds.take_all()}

    assert len(got) == len(items)  # every row is there, failed and dropped ones too
    want = {u: i for i, u in enumerate(local["url"])}
    reasons = {}
    for url, row in got.items():
        i = want[url]
        assert (row["status"], row["stage"], row["reason"]) == (local["status"][i], local["stage"][i], local["reason"][i])
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        assert not any(k.startswith("__") for k in row)
        if row["status"] == "ok":
            assert row["clip_score"] >= threshold and np.isclose(row["clip_score"], local["clip_score"][i], atol=1e-5)
            assert np.asarray(row["img_emb"]).shape == local["img_emb"][i].shape
            assert row["image"][:2] == b"\xff\xd8"
        elif row["stage"] == "download":
            assert row["image"] is None and json.loads(row["detail"])["url"] == url
            assert np.array_equal([row["clip_score"]], [local["clip_score"][i]], equal_nan=True)  # the declared default
    assert reasons["http_404"] == 1 and reasons["decode_error"] == 1 and reasons["blocked_address"] == 1
    assert reasons["invalid_url"] == 1 and reasons["clip_score_below_threshold"] >= 4 and reasons[""] >= 4
