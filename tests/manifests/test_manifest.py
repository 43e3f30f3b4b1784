import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.cli import main as cli_main
from pairforge.manifests import layout
from pairforge.manifests.manifest import read_manifest, verify
from pairforge.pipeline.config import load_job
from pairforge.pipeline.job import JobError, run_job


@pytest.fixture()
def run_dir(tmp_path):
    pq.write_table(
        pa.table({"url": [f"http://h/{i}" for i in range(23)], "caption": ["c"] * 23}), tmp_path / "u.parquet"
    )
    job = load_job(
        {
            "input": {"paths": ["u.parquet"]},
            "output": {"dir": "out", "samples_per_shard": 10},
            "stages": ["shard"],
            "runner": "local",
        },
        base_dir=tmp_path,
    )
    run_job(job)
    return tmp_path / "out"


def test_manifest_contents(run_dir):
    man = read_manifest(run_dir)
    assert man["format"] == "pairforge-manifest/2"
    assert man["schema"] == [] and man["fits"] == [] and man["side_tables"] == {}  # the shard stage declares nothing
    assert man["counts"] == {"input": 23, "ok": 23, "rejected": 0}
    assert [s["samples"] for s in man["shards"]] == [10, 10, 3]
    assert man["stages"][-1] == {"name": "shard", "in": 23, "out": 23, "dropped": {}, "seconds": 0.0}
    assert man["versions"]["ray"] and man["versions"]["pyarrow"]
    assert man["job"]["output"]["samples_per_shard"] == 10
    assert json.loads(layout.sizes_json(run_dir).read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 3}
    assert verify(run_dir) == []


def test_verify_catches_an_altered_tar(run_dir, capsys):
    assert cli_main(["manifest", "verify", str(run_dir)]) == 0
    tar = layout.shard_tar(run_dir, 1)
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    problems = verify(run_dir)
    assert any("shards/00001.tar: checksum mismatch" in p for p in problems)
    assert cli_main(["manifest", "verify", str(run_dir)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_verify_reports_an_unreadable_tar_and_goes_on(run_dir, capsys, damage):
    """A cut or garbage shard is a problem line (a tar cut after a member
    reads as fewer keys; garbage cannot be read at all), and the other shards
    are still checked: ``verify`` does not stop with the reader's exception."""
    tar = layout.shard_tar(run_dir, 1)
    data = tar.read_bytes()
    tar.write_bytes(data[:1100] if damage == "cut" else b"\x00\xff not a tar " * 400)
    par = layout.shard_parquet(run_dir, 2)
    pq.write_table(pq.read_table(par).slice(0, 2), par)  # a problem in a later shard, seen too
    problems = verify(run_dir)
    said = "its files cannot be read" if damage == "garbage" else "tar and parquet hold different keys"
    assert any(p.startswith(f"shard 00001: {said}") for p in problems), problems
    assert any("shards/00001.tar: checksum mismatch" in p for p in problems)
    assert any(p.startswith("shard 00002: 2 parquet rows, manifest says 3") for p in problems), problems
    assert cli_main(["manifest", "verify", str(run_dir)]) == 1
    assert said in capsys.readouterr().err


def test_verify_catches_lost_rows(run_dir):
    rej = layout.rejects_parquet(run_dir, 2)
    par = layout.shard_parquet(run_dir, 2)
    t = pq.read_table(par)
    pq.write_table(t.slice(0, 2), par)
    problems = verify(run_dir)
    assert any("input had 23 rows but shards + rejects hold 22" in p for p in problems)
    assert any("00002.parquet: checksum mismatch" in p for p in problems)
    rej.unlink()
    assert any("rejects/00002.parquet: missing" in p for p in verify(run_dir))


def test_rerun_into_a_finished_run_needs_resume(run_dir):
    job = load_job(json.loads(json.dumps(read_manifest(run_dir)["job"])) | {"stages": ["shard"]})
    with pytest.raises(JobError, match="--resume"):
        run_job(job)
    man = run_job(job, resume=True)
    assert man["timing"]["resumed_shards"] == 3 and verify(run_dir) == []


def test_cli_show_and_verify_as_a_user_runs_them(run_dir):
    show = subprocess.run(
        [sys.executable, "-m", "pairforge.cli", "manifest", "show", str(run_dir)], capture_output=True, text=True
    )
    assert show.returncode == 0 and "23 in, 23 in shards, 0 rejected" in show.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pairforge.cli", "manifest", "verify", str(run_dir / "nope")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "no manifest" in bad.stderr


def test_cli_hands_train_its_own_flags(capsys):
    from pairforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--pretrained" in capsys.readouterr().out
