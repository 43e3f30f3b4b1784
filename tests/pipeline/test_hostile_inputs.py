"""Issue 29, findings 2, 4, 5, 6 and 7: a URL list is data from anywhere.
Deep JSON, long lines, huge captions, many columns, names of ours and
hostile extensions end as a clear error naming the file (and line) or as
a per-row status; the trainer opens shard names as files only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.manifests import layout
from pairforge.manifests.report import TEXT_CHARS, _text
from pairforge.manifests.shards import write_shard
from pairforge.pipeline.checks import check_job
from pairforge.pipeline.config import ConfigError, load_job
from pairforge.pipeline.inputlimits import InputLimits
from pairforge.pipeline.job import run_job
from pairforge.pipeline.reader import split_input
from tests import shardkit

ROOT = Path(__file__).resolve().parents[2]


def _job(tmp_path, name: str, stages=("shard",), **input_opts):
    return load_job(
        {
            "input": {"paths": [name], **input_opts},
            "output": {"dir": "out", "samples_per_shard": 10},
            "stages": list(stages),
            "runner": "local",
        },
        base_dir=tmp_path,
    )


def _rows(out) -> tuple[pa.Table, pa.Table]:
    shards = pa.concat_tables([pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))])
    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))])
    return shards, rejects


# ------------------------------------------------------------------ finding 2: deep JSON


def _deep_jsonl(path: Path, depth: int = 20_000) -> None:
    deep = "[" * depth + "]" * depth  # about 40 KB
    lines = [json.dumps({"url": "http://h/0.jpg", "caption": "fine"})]
    lines.append('{"url": "http://h/1.jpg", "caption": "a valid row", "extra": ' + deep + "}")
    path.write_text("\n".join(lines) + "\n")


def test_a_jsonl_line_nested_20000_deep_is_an_error_naming_the_line_not_a_segfault(tmp_path):
    """The review's probe: pyarrow's JSON reader segfaulted (exit 139) in the
    check before the run. Run in a child process, so that a crash shows as
    its exit status instead of taking pytest down."""
    _deep_jsonl(tmp_path / "deep.jsonl")
    code = (
        "import sys\n"
        "from pairforge.pipeline.checks import check_job\n"
        "from pairforge.pipeline.config import ConfigError, load_job\n"
        "from pairforge.pipeline.reader import split_input\n"
        f"job = load_job({{'input': {{'paths': ['deep.jsonl']}}, 'output': {{'dir': 'out'}}, 'stages': ['shard']}}, base_dir=__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "for step in (lambda: check_job(job), lambda: split_input(job.input, job.output.dir, 10)):\n"
        "    try:\n"
        "        step()\n"
        "    except ConfigError as e:\n"
        "        print('ConfigError:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("ConfigError:")]
    assert len(lines) == 2, done.stdout
    assert all(
        "deep.jsonl, line 2: nested more than 900 deep, more than input.limits.max_json_depth (32)" in line
        for line in lines
    )


def test_jsonl_bounds_name_the_file_and_line(tmp_path):
    ok = json.dumps({"url": "u", "caption": "c"})
    cases = {
        "depth": (
            ok + "\n" + json.dumps({"url": "u", "caption": "c", "x": [[[[[1]]]]]}) + "\n",
            "line 2: nested 6 deep",
        ),
        "long": (
            ok + "\n" + ok + "\n" + json.dumps({"url": "u", "caption": "c" * 5000}) + "\n",
            "line 3: longer than input.limits.max_line_bytes (4096)",
        ),
        "not json": (ok + "\n{not json\n", "line 2 (not JSON)"),
        "not an object": (ok + "\n[1, 2]\n", "line 2 (not a JSON object)"),
        "type changes": (ok + "\n" + json.dumps({"url": 3, "caption": "c"}) + "\n", "lines 1-2"),
    }
    limits = {"max_json_depth": 5, "max_line_bytes": 4096}
    for name, (text, expect) in cases.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
        job = _job(tmp_path, f"{name}.jsonl", limits=limits)
        for step in (check_job, lambda j: split_input(j.input, tmp_path / "o", 10)):
            with pytest.raises(ConfigError) as e:  # the check reads the head; the reader every line
                step(job)
            assert f"{name}.jsonl, {expect}" in str(e.value), (name, str(e.value))


def test_a_jsonl_file_over_the_size_bound_is_an_error(tmp_path):
    (tmp_path / "big.jsonl").write_text(
        "".join(json.dumps({"url": f"u{i}", "caption": "c"}) + "\n" for i in range(100))
    )
    job = _job(tmp_path, "big.jsonl", limits={"max_file_bytes": 1000})
    with pytest.raises(ConfigError, match=r"big.jsonl: larger than input.limits.max_file_bytes \(1000\)"):
        split_input(job.input, tmp_path / "o", 10)


def test_a_large_jsonl_file_is_read_in_chunks_with_every_row(tmp_path, monkeypatch):
    from pairforge.pipeline import reader_json

    monkeypatch.setattr(reader_json, "CHUNK_BYTES", 2000)  # many chunks of whole lines
    lines = [json.dumps({"url": f"http://h/{i}", "caption": f"c{i}", "n": i if i > 40 else None}) for i in range(300)]
    (tmp_path / "many.jsonl").write_text("\n".join(lines) + "\n")
    job = _job(tmp_path, "many.jsonl")
    index = split_input(job.input, tmp_path / "o", 64)
    assert index.total_rows == 300
    got = pa.concat_tables([pq.read_table(layout.input_shard(tmp_path / "o", s)) for s in sorted(index.shard_rows)])
    assert got.column("url").to_pylist() == [f"http://h/{i}" for i in range(300)]


def test_a_coco_file_nested_too_deep_is_a_clear_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text('{"images": [], "annotations": [], "info": ' + deep + "}")
    job = _job(tmp_path, "deep.json", format="coco")
    with pytest.raises(ConfigError, match="deep.json: not COCO captions JSON: nested deeper"):
        split_input(job.input, tmp_path / "o", 10)


@pytest.mark.parametrize(
    "annotation, where",
    [
        ({"id": 1, "image_id": 1, "caption": [[["x"]]]}, "annotations[0].caption is a list"),
        ({"id": {"a": 1}, "image_id": 1, "caption": "x"}, "annotations[0].id is a dict"),
    ],
)
def test_coco_fields_that_are_not_scalars_are_errors_naming_them(tmp_path, annotation, where):
    doc = {"images": [{"id": 1, "coco_url": "http://h/1.jpg"}], "annotations": [annotation]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=re.escape(f"c.json: not COCO captions JSON: {where}")):
        split_input(_job(tmp_path, "c.json", format="coco").input, tmp_path / "o", 10)


def test_a_coco_file_over_its_size_bound_is_an_error(tmp_path):
    doc = {"images": [], "annotations": [{"id": i, "image_id": 1, "caption": "x" * 50} for i in range(50)]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    job = _job(tmp_path, "c.json", format="coco", limits={"max_coco_bytes": 500})
    with pytest.raises(ConfigError, match=r"larger than input.limits.max_coco_bytes \(500\)"):
        split_input(job.input, tmp_path / "o", 10)


# ------------------------------------------------------------------ finding 6: unbounded input


def test_huge_captions_and_urls_are_rejected_rows_cut_to_the_bound(tmp_path):
    big = "w" * 2_000_000
    urls = ["http://h/0", "http://h/1", "http://h/" + "u" * 9000]
    pq.write_table(pa.table({"url": urls, "caption": ["fine", big, "fine"]}), tmp_path / "u.parquet")
    man = run_job(_job(tmp_path, "u.parquet"))
    shards, rejects = _rows(tmp_path / "out")
    assert shards.column("url").to_pylist() == ["http://h/0"]
    rej = {r["key"]: r for r in rejects.to_pylist()}
    assert [r["reason"] for r in rej.values()] == ["caption_too_long", "url_too_long"]
    cap = next(r for r in rej.values() if r["reason"] == "caption_too_long")
    assert cap["stage"] == "input" and len(cap["caption"]) == InputLimits().max_caption_chars
    assert json.loads(cap["detail"]) == {"chars": 2_000_000, "column": "caption", "max_chars": 16384}
    assert len(next(r for r in rej.values() if r["reason"] == "url_too_long")["url"]) == 8192
    assert man["stages"][0] == {
        "name": "input",
        "in": 3,
        "out": 1,
        "dropped": {"caption_too_long": 1, "url_too_long": 1},
        "seconds": 0.0,
    }
    assert man["counts"] == {"input": 3, "ok": 1, "rejected": 2}
    assert sum(f.stat().st_size for f in (tmp_path / "out").rglob("*.parquet")) < 200_000


def test_too_many_columns_is_an_error_before_the_run(tmp_path):
    cols = {"url": ["http://h/0"], "caption": ["c"], **{f"c{i}": [i] for i in range(2000)}}
    pq.write_table(pa.table(cols), tmp_path / "wide.parquet")
    with pytest.raises(ConfigError, match=r"wide.parquet: 2002 columns, more than input.limits.max_columns \(1024\)"):
        check_job(_job(tmp_path, "wide.parquet"))
    with pytest.raises(ConfigError, match="2002 columns"):
        split_input(_job(tmp_path, "wide.parquet").input, tmp_path / "o", 10)
    assert check_job(_job(tmp_path, "wide.parquet", limits={"max_columns": 3000})) == []


def test_the_report_cuts_long_values():
    assert _text("x" * 10) == "x" * 10
    long = _text("y" * 5_000_000)
    assert long.startswith("y" * TEXT_CHARS) and long.endswith("(5,000,000 characters)") and len(long) < TEXT_CHARS + 40


# ------------------------------------------------------------------ finding 5: names of ours


def test_input_columns_named_like_ours_are_carried_renamed(tmp_path):
    n = 4
    pq.write_table(
        pa.table(
            {
                "url": [f"http://h/{i}" for i in range(n)],
                "caption": ["c"] * n,
                "__t_shard": [86400.0] * n,  # was summed into the shard stage's seconds
                "__t_x": ["not a number"] * n,  # was summed too: a string killed the run
                "_private": ["kept"] * n,  # never reached the shard parquet, silently
                "__pf_scratch": [1] * n,
            }
        ),
        tmp_path / "u.parquet",
    )
    man = run_job(_job(tmp_path, "u.parquet"))
    shards, _ = _rows(tmp_path / "out")
    for name in ("input___t_shard", "input___t_x", "input__private", "input___pf_scratch"):
        assert name in shards.column_names, shards.column_names
    assert shards.column("input__private").to_pylist() == ["kept"] * n
    assert man["stages"][-1]["name"] == "shard" and man["stages"][-1]["seconds"] < 60
    stats = json.loads(layout.shard_stats(tmp_path / "out", 0).read_text())
    assert set(stats["stage_seconds"]) <= {"shard"}


def test_a_renamed_name_that_collides_or_a_columns_map_to_ours_is_an_error(tmp_path):
    pq.write_table(pa.table({"url": ["u"], "caption": ["c"], "_x": [1], "input__x": [2]}), tmp_path / "u.parquet")
    with pytest.raises(ConfigError, match="two columns would be carried as 'input__x'"):
        check_job(_job(tmp_path, "u.parquet"))
    pq.write_table(pa.table({"url": ["u"], "caption": ["c"], "y": [1]}), tmp_path / "v.parquet")
    with pytest.raises(ConfigError, match="'y' -> '__t_y': '__t_y' is a column pairforge sets itself"):
        check_job(_job(tmp_path, "v.parquet", columns={"y": "__t_y"}))


# ------------------------------------------------------------------ finding 4: member names


def test_an_input_image_ext_cannot_name_a_member_outside_the_tar(tmp_path):
    img = shardkit.jpeg(0)
    exts = ["jpg", "x/../../../../escape", "png", "a.b", "../x"]
    n = len(exts)
    table = pa.table(
        {"url": [f"http://h/{i}" for i in range(n)], "caption": ["c"] * n, "image": [img] * n, "image_ext": exts}
    )
    pq.write_table(table, tmp_path / "u.parquet")
    run_job(_job(tmp_path, "u.parquet"))
    shards, rejects = _rows(tmp_path / "out")
    assert sorted(shards.column("image_ext").to_pylist()) == ["jpg", "png"]
    assert set(rejects.column("reason").to_pylist()) == {"invalid_image_ext"}
    target = tmp_path / "a" / "b" / "extract"
    target.mkdir(parents=True)
    with tarfile.open(layout.shard_tar(tmp_path / "out", 0)) as tar:
        names = tar.getnames()
        tar.extractall(target, filter="data")
    assert all("/" not in m and ".." not in m for m in names), names
    assert not list((tmp_path / "a").glob("escape*")) and not (tmp_path / "escape").exists()


def test_the_shard_writer_rejects_a_sample_whose_member_name_is_unsafe(tmp_path):
    """Whatever stage set it (here: rows built by hand), a key or an
    ``image_ext`` outside the member alphabet is a reject, not a member."""
    rows = shardkit.rows(4)
    rows["image_ext"] = np.array(["jpg", "../../evil", "png", "jpg"], dtype=object)
    rows["key"] = np.array(["00000000", "00000001", "0000/0002", "00000003"], dtype=object)
    stats = write_shard(rows, tmp_path, 0)
    assert stats["rejects_by_stage"] == {"shard": {"invalid_member_name": 2}}
    with tarfile.open(layout.shard_tar(tmp_path, 0)) as tar:
        assert sorted({m.split(".")[0] for m in tar.getnames()}) == ["00000000", "00000003"]
    rej = pq.read_table(layout.rejects_parquet(tmp_path, 0)).to_pylist()
    assert {r["key"]: json.loads(r["detail"]).get("image_ext") for r in rej} == {
        "00000001": "../../evil",
        "0000/0002": "png",
    }


# ------------------------------------------------------------------ finding 7: the trainer opens files


def test_a_shard_named_like_a_pipe_is_opened_as_a_file(tmp_path, monkeypatch):
    from pairforge.trainer.data import find_shards, shard_samples

    rows = shardkit.rows(3)
    write_shard(rows, tmp_path / "run", 0)
    folder = tmp_path / "sub"
    folder.mkdir()
    name = "pipe:cd ..;touch X;true .tar"
    (folder / name).write_bytes(layout.shard_tar(tmp_path / "run", 0).read_bytes())
    monkeypatch.chdir(folder)
    shards = find_shards(["."])
    assert shards == [name]
    samples = list(shard_samples([{"url": s} for s in shards]))
    assert sorted(s["__key__"] for s in samples) == sorted(rows["key"].tolist())
    assert not (tmp_path / "X").exists() and not (folder / "X").exists()


def test_names_that_become_paths_are_checked(tmp_path):
    from pairforge.manifests.manifest import read_manifest, verify

    for bad in ("../x", "a/b", "..", "", "x\x00"):
        with pytest.raises(ValueError, match="a name that becomes part of a path"):
            layout.embedding_npy(tmp_path, bad, 0)
        with pytest.raises(ValueError, match="a name that becomes part of a path"):
            layout.side_table_dir(tmp_path, bad)
    assert layout.fit_dir(tmp_path, "dedup_semantic").name == "dedup_semantic"
    # a manifest is data: verify reads only files under OUT, and says so
    pq.write_table(pa.table({"url": ["http://h/0"], "caption": ["c"]}), tmp_path / "u.parquet")
    run_job(_job(tmp_path, "u.parquet"))
    out = tmp_path / "out"
    man = read_manifest(out)
    man["shards"][0]["files"]["/etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    man["shards"][0]["files"]["../u.parquet"] = {"bytes": 1, "sha256": "0" * 64}
    man["side_tables"] = {"../..": {"links": ["key"], "rows": 0, "files": {}}}
    layout.manifest_json(out).write_text(json.dumps(man))
    problems = verify(out)
    assert "'/etc/passwd': not a path inside the run (a manifest names files under OUT only)" in problems
    assert "'../u.parquet': not a path inside the run (a manifest names files under OUT only)" in problems
    assert any(p.startswith("side_tables: side table '../..'") for p in problems), problems
