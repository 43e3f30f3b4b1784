"""``pairforge manifest diff OLD NEW``: what changed between two runs."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.cli import main as cli_main
from pairforge.manifests.diff import diff_manifests, diff_runs, format_diff
from pairforge.manifests.manifest import read_manifest
from pairforge.pipeline.config import load_job
from pairforge.pipeline.job import run_job


def _run(tmp_path, name: str, rows: int, min_words: int) -> str:
    caps = [("one two three four" if i % 3 else "one") for i in range(rows)]
    pq.write_table(
        pa.table({"url": [f"http://h/{i}" for i in range(rows)], "caption": caps}), tmp_path / f"{rows}.parquet"
    )
    job = {
        "input": {"paths": [f"{rows}.parquet"], "source": "s"},
        "output": {"dir": name, "samples_per_shard": 10},
        "stages": [{"name": "basic_filter", "min_caption_words": min_words, "min_caption_chars": 0}, "shard"],
        "runner": "local",
    }
    run_job(load_job(job, base_dir=tmp_path))
    return str(tmp_path / name)


def test_identical_runs_have_no_differences(tmp_path, capsys):
    a, b = _run(tmp_path, "a", 25, 2), _run(tmp_path, "b", 25, 2)
    d = diff_runs(a, b)
    assert not d["changed"] and d["shards"]["unchanged"] == 3, d
    assert cli_main(["manifest", "diff", a, b]) == 0
    assert "no differences" in capsys.readouterr().out


def test_counts_reasons_settings_and_shards_by_checksum(tmp_path, capsys):
    old, new = _run(tmp_path, "old", 25, 2), _run(tmp_path, "new", 31, 1)
    d = diff_runs(old, new)
    assert d["changed"]
    assert d["counts"]["input"] == {"old": 25, "new": 31}
    bf = next(s for s in d["stages"] if s["name"] == "basic_filter")
    assert bf["dropped"] == {"caption_too_short": {"old": 9, "new": 0}}
    assert d["job"]["stages.basic_filter.min_caption_words"] == {"old": 2, "new": 1}
    assert d["shards"]["added"] == ["00003"] and d["shards"]["removed"] == []
    changed = {c["name"]: c for c in d["shards"]["changed"]}
    assert set(changed) == {"00000", "00001", "00002"}
    assert "shards/00000.parquet" in changed["00000"]["files"]
    assert not any(f.endswith("_stats.json") for c in changed.values() for f in c["files"])  # times, not data
    assert cli_main(["manifest", "diff", old, new]) == 1
    out = capsys.readouterr().out
    assert "stage basic_filter: in 25 -> 31, out 16 -> 31, caption_too_short 9 -> 0" in out
    assert "shards added: 00003" in out and "shards: 1 added, 0 removed, 3 changed, 0 unchanged" in out
    assert cli_main(["manifest", "diff", old, new, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["shards"]["added"] == ["00003"]


def test_a_folder_without_a_manifest_is_an_error(tmp_path, capsys):
    a = _run(tmp_path, "a", 5, 1)
    assert cli_main(["manifest", "diff", a, str(tmp_path / "nothing")]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_stages_are_paired_by_name_so_an_inserted_stage_is_one_line(tmp_path):
    """Issue 28: with stages paired by position, inserting one stage changed
    every later stage's settings (~50 lines)."""
    old = read_manifest(_run(tmp_path, "a", 12, 2))
    new = json.loads(json.dumps(old))
    inserted = {"name": "dedup_exact", "keep": "first", "prior_build": None}
    new["job"]["stages"].insert(0, inserted)
    new["job"]["stages"][1]["min_caption_words"] = 3  # basic_filter, now at position 1
    d = diff_manifests(old, new)
    assert d["job"] == {
        "stages.dedup_exact": {"old": "absent", "new": "stages[0]"},
        "stages.basic_filter.min_caption_words": {"old": 2, "new": 3},
    }
    lines = [line for line in format_diff(d).splitlines() if line.startswith("job ")]
    assert lines == [
        "job stages.dedup_exact: 'absent' -> 'stages[0]'",
        "job stages.basic_filter.min_caption_words: 2 -> 3",
    ]
    swapped = json.loads(json.dumps(new))  # the same stages in another order: one entry
    st = swapped["job"]["stages"]
    st[0], st[1] = st[1], st[0]
    assert diff_manifests(new, swapped)["job"] == {
        "stages.order": {
            "old": ["dedup_exact", "basic_filter", "shard"],
            "new": ["basic_filter", "dedup_exact", "shard"],
        }
    }
