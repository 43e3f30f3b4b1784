"""Issue 29, finding 1: the work folder is not trusted as code. Nothing under
``OUT/_work`` is unpickled; a fresh run refuses a non-empty ``_work`` (or
deletes it with ``clean_work``); a resume goes on only with a ``_work``
bound to the same job; part names read from a mark are a safe alphabet."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.cli import main as cli_main
from pairforge.manifests import layout
from pairforge.manifests.shards import to_arrow
from pairforge.pipeline import engine, resume, workdir
from pairforge.pipeline.config import load_job
from pairforge.pipeline.engine import RunSpec
from pairforge.pipeline.job import JobError, run_job
from pairforge.stages.shard import Config as ShardConfig
from pairforge.stages.shard import ShardStage


def _job(tmp_path, name: str, urls: list[str], out="out", **extra):
    pq.write_table(pa.table({"url": urls, "caption": [f"c {u}" for u in urls]}), tmp_path / f"{name}.parquet")
    return load_job(
        {
            "input": {"paths": [f"{name}.parquet"]},
            "output": {"dir": out, "samples_per_shard": 4},
            "stages": ["shard"],
            "runner": "local",
            **extra,
        },
        base_dir=tmp_path,
    )


class _Touch:
    """A pickle that creates a file when loaded (the review's probe)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(tmp_path, out, names=("x",), data: bytes | None = None):
    """The probe: a finished mark for input shard 0 naming a part whose rows
    file is a pickle that runs code (under the old and the new file name)."""
    folder = layout.rows_dir(out, 0)
    folder.mkdir(parents=True, exist_ok=True)
    evil = data if data is not None else pickle.dumps({"key": _Touch(tmp_path / "PWNED")})
    rows = {"key": np.array(["00000", "00001"], dtype=object), "status": np.array(["ok"] * 2, dtype=object)}
    rows["stage"] = np.array(["", ""], dtype=object)
    for name in names:
        for suffix in (".pkl", resume.PART_ROWS):
            (folder / f"{name}{suffix}").write_bytes(evil)
        pq.write_table(to_arrow(rows, list(rows)), folder / f"{name}{resume.PART_FIT}")
    layout.rows_done(out, 0).write_text(json.dumps({"rows": 2, "parts": list(names)}))


def test_a_planted_work_folder_runs_no_code_and_the_fresh_run_refuses_it(tmp_path):
    job = _job(tmp_path, "a", ["http://h/0", "http://h/1"])
    out = tmp_path / "out"
    _plant(tmp_path, out)
    with pytest.raises(JobError, match=r"_work holds files of no known job.*--clean-work"):
        run_job(job)
    assert not (tmp_path / "PWNED").exists()
    # deleted on request, then the run is this job's alone
    man = run_job(job, clean_work=True)
    assert man["counts"] == {"input": 2, "ok": 2, "rejected": 0}
    assert not (tmp_path / "PWNED").exists()


def test_a_planted_part_behind_a_matching_fingerprint_is_an_error_not_code(tmp_path):
    """Whoever can write under OUT can also write a matching run.json: the
    binding is against mistakes; a rows file that is not a batch file is
    still never run, and the resume ends in an error naming the file."""
    job = _job(tmp_path, "a", ["http://h/0", "http://h/1"])
    out = tmp_path / "out"
    workdir.bind_work(out, workdir.job_record(job), resume=False, clean=False)
    _plant(tmp_path, out)
    with pytest.raises(ValueError, match=r"rows\.arrow: not a pairforge batch file"):
        run_job(job, resume=True)
    assert not (tmp_path / "PWNED").exists()


def test_another_jobs_interrupted_work_is_refused_then_cleaned(tmp_path):
    old = _job(tmp_path, "old", [f"http://old/{i}" for i in range(6)])
    run_job(old)
    out = tmp_path / "out"
    for sid in (0, 1):  # interrupted before its shards: only _work is left
        for f in (layout.shard_stats(out, sid), layout.shard_tar(out, sid), layout.shard_parquet(out, sid)):
            f.unlink()
        layout.rejects_parquet(out, sid).unlink()
    layout.manifest_json(out).unlink()
    (out / "shards").rename(tmp_path / "gone")
    new = _job(tmp_path, "new", [f"http://new/{i}" for i in range(6)], out="out")
    with pytest.raises(JobError, match=r"holds the work of another job"):
        run_job(new)
    with pytest.raises(JobError, match=r"job changed since the interrupted run \(input\.paths"):
        run_job(new, resume=True)
    man = run_job(new, clean_work=True)
    urls = pa.concat_tables([pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))])
    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))])
    seen = urls.column("url").to_pylist() + rejects.column("url").to_pylist()
    assert sorted(seen) == [f"http://new/{i}" for i in range(6)], seen  # none of the old job's URLs
    assert man["counts"]["input"] == 6


def test_the_same_jobs_interrupted_work_needs_resume(tmp_path):
    job = _job(tmp_path, "a", [f"http://h/{i}" for i in range(6)])
    run_job(job)
    out = tmp_path / "out"
    layout.manifest_json(out).unlink()
    (out / "shards").rename(tmp_path / "gone")
    with pytest.raises(JobError, match=r"interrupted run of this job: pass --resume"):
        run_job(job)
    man = run_job(job, resume=True)
    assert man["counts"]["ok"] == 6
    with pytest.raises(JobError, match="give one"):
        run_job(job, resume=True, clean_work=True)


def test_resume_refuses_an_unbound_work_folder(tmp_path):
    job = _job(tmp_path, "a", ["http://h/0", "http://h/1"])
    _plant(tmp_path, tmp_path / "out")
    with pytest.raises(JobError, match="is not bound to a job"):
        run_job(job, resume=True)
    assert not (tmp_path / "PWNED").exists()


def test_the_cli_names_the_flag(tmp_path, capsys):
    job = _job(tmp_path, "a", ["http://h/0"])
    (tmp_path / "job.yaml").write_text(
        json.dumps(
            {"input": {"paths": ["a.parquet"]}, "output": {"dir": "out"}, "stages": ["shard"], "runner": "local"}
        )
    )
    _plant(tmp_path, tmp_path / "out")
    assert cli_main(["run", str(tmp_path / "job.yaml")]) == 2
    assert "--clean-work" in capsys.readouterr().err
    assert cli_main(["run", str(tmp_path / "job.yaml"), "--clean-work"]) == 0
    assert job.output.samples_per_shard == 4


@pytest.mark.parametrize("parts", [["../../../x"], ["/etc/passwd"], ["a b"], [""], [3], "x", ["x" * 65]])
def test_a_mark_naming_unsafe_parts_is_not_a_finished_shard(tmp_path, parts):
    out = tmp_path / "out"
    folder = layout.rows_dir(out, 0)
    folder.mkdir(parents=True)
    layout.rows_done(out, 0).write_text(json.dumps({"rows": 1, "parts": parts}))
    assert resume.rows_mark(out, 0, images=False) is None


def test_part_names_are_checked_on_write_and_read(tmp_path):
    spec = RunSpec(str(tmp_path), (), ShardStage(ShardConfig()), 10)
    rows = {"key": np.array(["0"], dtype=object), "status": np.array(["ok"], dtype=object)}
    with pytest.raises(ValueError, match="part name"):
        engine.write_part(tmp_path, "../x", rows, spec)
    with pytest.raises(ValueError, match="part name"):
        engine.read_part(tmp_path, "../x")
    engine.write_part(tmp_path, "p-1", rows, spec)
    assert engine.read_part(tmp_path, "p-1")["key"].tolist() == ["0"]
