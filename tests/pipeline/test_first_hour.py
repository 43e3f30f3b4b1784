"""A user's first hour (issue 28): loud failures, every config problem at
once, fast answers when the network or the cluster is missing, and a
refused ``--resume`` that leaves the run as it was.

Each case runs ``pairforge`` as a user does, in a fresh process (runner
``local`` where a run happens, so no Ray is started), against real files
and a real HTTP server on loopback, and checks the exit code, the lines a
person reads (key and value named), that Ray was never imported where it
should not be, and the time it took.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pairforge.pipeline import outcome
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.open_clip_local import hub_unreachable
from pairforge.stages.basic_filter import BasicFilterStage
from pairforge.stages.common.address_warning import literal_address, url_warning
from pairforge.stages.download import DownloadStage
from tests.shardkit import jpeg

ROOT = Path(__file__).resolve().parents[2]
N = 6

#: runs ``pairforge ARGS`` in this fresh process and says what happened
PROBE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from pairforge.cli import main
    rc = main(sys.argv[1:])
    seconds = time.perf_counter() - t0
    ray = sys.modules.get("ray")
    up = bool(ray is not None and ray.is_initialized())
    print(json.dumps({"rc": rc, "seconds": seconds, "ray_imported": ray is not None, "ray_up": up}))
    """
)


def pairforge(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 180) -> tuple[dict, list[str]]:
    """``pairforge ARGS`` in a fresh process: what the probe saw, and the stderr lines."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.splitlines()


def errors(lines: list[str]) -> list[str]:
    return [line[len("pairforge: error: ") :] for line in lines if line.startswith("pairforge: error: ")]


@pytest.fixture(scope="module")
def server():
    with LocalHTTPServer({f"/{i}.jpg": Route(jpeg(i), "image/jpeg") for i in range(N + 2)}) as s:
        yield s


def write_job(tmp_path: Path, urls: list, captions: list | None = None, **job) -> Path:
    captions = captions if captions is not None else [f"a photo of thing {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())}),
                   tmp_path / "urls.parquet")  # fmt: skip
    d = {
        "input": {"paths": ["urls.parquet"]},
        "output": {"dir": "out", "samples_per_shard": 4},
        "runner": "local",
        "stages": [{"name": "download", "image_size": 16, "thread_count": 2}, "shard"],
        **job,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------ finding 1: silent total failure


def test_urls_the_job_does_not_allow_warn_before_the_run_and_end_it_loudly(tmp_path, server):
    job = write_job(tmp_path, [server.url(f"/{i}.jpg") for i in range(N)])  # 127.0.0.1, not allowed
    got, lines = pairforge(["run", str(job)], tmp_path)
    assert got["rc"] == outcome.EXIT_NO_SAMPLES == 3
    assert not got["ray_imported"]
    warning = next(i for i, line in enumerate(lines) if "point at addresses download refuses" in line)
    assert f"{N} of the first {N} URLs" in lines[warning] and "loopback 6" in lines[warning]
    assert "stages[0](download).allow_networks: ['127.0.0.0/8']" in lines[warning]
    assert warning < next(i for i, line in enumerate(lines) if "rows in" in line)  # before the run
    last = lines[-1]
    assert last.startswith("[pairforge] done in") and f": 0 samples in 2 shards, {N} rejected" in last
    assert f"download/blocked_address {N}" in last and "allow_networks" in last
    assert "No row reached a shard (exit 3)" in last
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["counts"] == {"input": N, "ok": 0, "rejected": N}


def test_an_allowed_run_exits_0_and_counts_null_captions(tmp_path, server):
    urls = [server.url(f"/{i}.jpg") for i in range(N)]
    captions = ["a red square", None, "a blue square", None, "a green square", "a grey square"]
    dl = {"name": "download", "image_size": 16, "thread_count": 2, "allow_networks": ["127.0.0.0/8"]}
    job = write_job(tmp_path, urls, captions, stages=[dl, "shard"])
    got, lines = pairforge(["run", str(job)], tmp_path)
    assert got["rc"] == 0 and not got["ray_imported"]
    assert not any("refuses" in line for line in lines)
    assert lines[-1].startswith("[pairforge] done in") and f"{N} samples" in lines[-1]
    assert "2 row(s) had no caption" in lines[-1] and "download/" not in lines[-1]  # few rejects: no reasons
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [f["null_captions"] for f in man["input"]["files"]] == [2]
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / "shards").glob("*.parquet"))])
    assert sorted(rows.column("caption").to_pylist()) == sorted(c or "" for c in captions)  # kept, as ""


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_an_empty_url_list_exits_4_before_ray(tmp_path, fmt):
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), path)
    else:
        path.write_text("url,caption\n")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": {"paths": [path.name]}, "output": {"dir": "out"},
                                   "stages": ["download", "shard"]}))  # fmt: skip
    got, lines = pairforge(["run", str(job)], tmp_path)
    assert got["rc"] == outcome.EXIT_EMPTY_INPUT == 4
    assert errors(lines) == [f"input: the URL lists hold no rows: {path} (0 rows); nothing to run"]
    assert not got["ray_imported"] and got["seconds"] < 5
    assert not (tmp_path / "out" / "shards").exists()


def test_no_input_file_is_a_config_error(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": {"paths": []}, "output": {"dir": "out"}, "stages": ["shard"]}))
    got, lines = pairforge(["run", str(job)], tmp_path)
    assert got["rc"] == 2 and errors(lines) == ["input.paths: expected at least one file or glob, got []"]


def test_the_warning_judges_literal_addresses_and_localhost_only():
    assert str(literal_address("http://localhost:8000/a.jpg")) == "127.0.0.1"
    assert str(literal_address("http://[::1]/a.jpg")) == "::1"
    assert literal_address("http://example.com/a.jpg") is None  # never looked up
    assert literal_address(None) is None and literal_address("not a url") is None
    urls = ["http://10.1.2.3/a.jpg", "http://example.com/b.jpg", "http://127.0.0.1:9/c.jpg"]
    line = url_warning(urls, (), "stages[0](download)")
    assert line.startswith("2 of the first 3 URLs") and "private 1 (e.g. http://10.1.2.3/a.jpg)" in line
    assert "['10.1.2.3/32', '127.0.0.0/8']" in line
    assert url_warning(urls, ("10.0.0.0/8", "127.0.0.0/8"), "x") is None


def test_the_last_line_names_reasons_only_when_most_rows_were_rejected():
    def manifest(ok: int, dropped: dict) -> dict:
        rejected = sum(dropped.values())
        stages = [{"name": "download", "dropped": {k: v for k, v in dropped.items() if k != "caption_too_short"}},
                  {"name": "basic_filter", "dropped": {k: v for k, v in dropped.items() if k == "caption_too_short"}}]  # fmt: skip
        return {"counts": {"input": ok + rejected, "ok": ok, "rejected": rejected}, "stages": stages}

    few = manifest(60, {"timeout": 40})
    assert outcome.summary(few, 1.0, 2) == "done in 1.0s: 60 samples in 2 shards, 40 rejected"
    assert outcome.exit_code(few) == 0
    most = manifest(10, {"caption_too_short": 50, "timeout": 40})
    # the advice comes from what the stages declare, not from pipeline/
    advice = outcome.advice_of([DownloadStage(), BasicFilterStage()])
    line = outcome.summary(most, 1.0, 2, advice)
    assert "(basic_filter/caption_too_short 50, download/timeout 40): captions are shorter" in line
    bare = outcome.summary(most, 1.0, 2)
    assert line.startswith(bare) and "captions are shorter" not in bare
    assert outcome.exit_code(most) == 0 and "exit 3" not in line
    assert outcome.exit_code(manifest(0, {"timeout": 5})) == 3


# ------------------------------------------------------------------ finding 2: every config problem at once


def test_every_config_problem_is_reported_at_once_with_key_and_value(tmp_path):
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a cat"]}), tmp_path / "urls.parquet")
    bad = {
        "input": {"paths": ["urls.parquet"], "url_coll": "link"},
        "ouput": {"dir": "out"},
        "runner": "rey",
        "stages": [
            {"name": "download", "retries": -3, "timeout": "10"},
            {"name": "clip_score", "model": "pf-tiny", "pretrained": "random", "threshold": "0.3"},
            {"name": "download"},
            "shard",
        ],
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(bad))
    got, lines = pairforge(["run", "job.yaml"], tmp_path)
    assert got["rc"] == 2 and not got["ray_imported"] and got["seconds"] < 5
    want = [
        "ouput: unknown key, given {'dir': 'out'} (did you mean 'output'?)",
        "output: missing (required)",
        "input.url_coll: unknown key, given 'link' (did you mean 'url_col'?)",
        "runner: expected 'ray' or 'local', got 'rey' (did you mean 'ray'?)",
        "stages[0](download).timeout: expected a number, got '10' (a string)",
        "stages[0](download).retries: expected >= 0, got -3",
        "stages[1](clip_score).threshold: expected a number, got '0.3' (a string)",
        "stages[2](download): 'download' is already stages[0]; a stage may appear once",
    ]
    found = errors(lines)
    assert len(found) == len(want), found
    for line in want:
        assert any(f.startswith(line) for f in found), (line, found)
    assert "would collide" in found[-1]
    assert not (tmp_path / "out").exists()


def test_a_value_out_of_range_names_key_and_value(tmp_path):
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a cat"]}), tmp_path / "urls.parquet")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        {"input": {"paths": ["urls.parquet"]}, "output": {"dir": "out", "samples_per_shard": 0}, "stages": ["shard"]}
    ))  # fmt: skip
    got, lines = pairforge(["run", "job.yaml"], tmp_path)
    assert got["rc"] == 2 and errors(lines) == ["output.samples_per_shard: expected >= 1, got 0"]


# ------------------------------------------------------------------ finding 3: no network, no cluster


def test_a_pretrained_tag_whose_hub_does_not_resolve_fails_in_seconds_before_ray(tmp_path):
    """A real DNS lookup that fails: the hub is an ``.invalid`` name (RFC 6761:
    never resolves anywhere), set the way a user points at a mirror."""
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a cat"]}), tmp_path / "urls.parquet")
    clip = {"name": "clip_score", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        {"input": {"paths": ["urls.parquet"]}, "output": {"dir": "out"}, "stages": ["download", clip, "shard"]}
    ))  # fmt: skip
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://pairforge-hub.invalid", "HF_HOME": str(tmp_path / "hf")}
    got, lines = pairforge(["run", "job.yaml"], tmp_path, env)
    assert got["rc"] == 2 and not got["ray_imported"] and got["seconds"] < 10, got
    (line,) = errors(lines)
    assert line.startswith("stages[1](clip_score).pretrained: 'laion2b_s34b_b79k': the weights of ViT-B-32")
    assert "pairforge-hub.invalid cannot be resolved" in line or "no route to the internet" in line, line
    assert "pretrained: /path/to/weights" in line and "pretrained: pf-tiny-scorer" in line


def test_the_hub_probe_says_why_it_cannot_download():
    assert hub_unreachable("https://pairforge-hub.invalid", timeout=2).startswith(
        "pairforge-hub.invalid cannot be resolved"
    )
    why = hub_unreachable("http://127.0.0.1:1", timeout=2)
    assert why.startswith("127.0.0.1 (127.0.0.1) cannot be reached on port 1 (Connection refused")


def test_an_unreachable_cluster_address_fails_fast_naming_it(tmp_path, server):
    dl = {"name": "download", "image_size": 16, "allow_networks": ["127.0.0.0/8"]}
    job = write_job(tmp_path, [server.url("/0.jpg")], runner="ray", stages=[dl, "shard"])
    got, lines = pairforge(["run", str(job), "--address", "127.0.0.1:1"], tmp_path)
    assert got["rc"] == outcome.EXIT_UNREACHABLE == 5
    (line,) = errors(lines)
    assert line.startswith("--address '127.0.0.1:1': no Ray cluster answers at 127.0.0.1:1 (Connection refused)")
    assert got["seconds"] < 15 and not got["ray_imported"] and not got["ray_up"]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ finding 4: a refused resume


def test_a_refused_resume_changes_nothing_on_disk(tmp_path, server):
    urls = [server.url(f"/{i}.jpg") for i in range(N)]
    dl = {"name": "download", "image_size": 16, "thread_count": 2, "allow_networks": ["127.0.0.0/8"]}
    job = write_job(tmp_path, urls, stages=[dl, "shard"])
    got, _ = pairforge(["run", str(job)], tmp_path)
    assert got["rc"] == 0
    out = tmp_path / "out"
    before = snapshot(out)
    assert any(k.startswith("_work/input/") for k in before)

    other = tmp_path / "other.yaml"  # the same job with another shard size
    d = yaml.safe_load(job.read_text())
    d["output"]["samples_per_shard"] = 2
    other.write_text(yaml.safe_dump(d))
    got, lines = pairforge(["run", str(other), "--resume"], tmp_path)
    assert got["rc"] == 2 and not got["ray_imported"]
    (line,) = errors(lines)
    assert "the job changed since the interrupted run (output.samples_per_shard: 4 -> 2)" in line
    assert "nothing was changed on disk" in line
    assert snapshot(out) == before

    grown = [*urls, server.url(f"/{N}.jpg")]  # the same job, a URL list with one row more
    saved = (tmp_path / "urls.parquet").read_bytes()
    write_job(tmp_path, grown, stages=[dl, "shard"])
    got, lines = pairforge(["run", str(job), "--resume"], tmp_path)
    assert got["rc"] == 2
    assert (
        f"the URL lists changed since the interrupted run ({tmp_path / 'urls.parquet'}: {N} -> {N + 1} rows)"
        in errors(lines)[0]
    )
    assert snapshot(out) == before

    (tmp_path / "urls.parquet").write_bytes(saved)  # the original job's own resume is still accepted
    got, lines = pairforge(["run", str(job), "--resume"], tmp_path)
    assert got["rc"] == 0, lines
    assert {k: v for k, v in snapshot(out).items() if "manifest" not in k} == {
        k: v for k, v in before.items() if "manifest" not in k
    }
