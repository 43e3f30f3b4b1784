"""Issue 29, finding 9: a custom stage (``module:Class``) is code. The job
loader checks only its name; its module is imported once the rest of the
job has passed the whole-job check, so a job that is wrong anywhere else
runs none of it."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.pipeline.checks import check_job
from pairforge.pipeline.config import ConfigError, load_job, to_dict
from pairforge.pipeline.job import run_job
from pairforge.pipeline.stagelist import CustomOptions

MODULE = """
import pathlib
pathlib.Path({mark!r}).write_text("imported")

from dataclasses import dataclass
from pairforge.stages.base import Stage


@dataclass(frozen=True)
class Config:
    factor: int = 1


class Noop(Stage):
    name = "noop_custom"
    Config = Config

    def process_batch(self, batch):
        return batch
"""


@pytest.fixture()
def custom(tmp_path, monkeypatch):
    name = f"pf_custom_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(MODULE.format(mark=str(tmp_path / "IMPORTED")))
    monkeypatch.syspath_prepend(str(tmp_path))
    pq.write_table(pa.table({"url": ["http://h/0"], "caption": ["c"]}), tmp_path / "u.parquet")
    yield name, tmp_path / "IMPORTED"
    sys.modules.pop(name, None)


def _job(tmp_path, stage: str, **more):
    return {
        "input": {"paths": ["u.parquet"]},
        "output": {"dir": "out"},
        "stages": [{"name": stage, "factor": 2}, "shard"],
        "runner": "local",
        **more,
    }


def test_loading_a_job_imports_no_custom_module(tmp_path, custom):
    name, mark = custom
    job = load_job(_job(tmp_path, f"{name}:Noop"), base_dir=tmp_path)
    assert isinstance(job.stages[0].config, CustomOptions) and not mark.exists()
    assert to_dict(job)["stages"][0] == {"name": f"{name}:Noop", "factor": 2}


def test_a_job_wrong_elsewhere_imports_no_custom_module(tmp_path, custom):
    """The review's probe: the module was imported by the loader, before
    anything was checked."""
    name, mark = custom
    bad = _job(tmp_path, f"{name}:Noop", input={"paths": ["missing.parquet"]})
    with pytest.raises(ConfigError, match="missing.parquet"):
        check_job(load_job(bad, base_dir=tmp_path))
    assert not mark.exists()


def test_a_right_job_imports_it_then_runs_it(tmp_path, custom):
    name, mark = custom
    man = run_job(load_job(_job(tmp_path, f"{name}:Noop"), base_dir=tmp_path))
    assert mark.exists() and [s["name"] for s in man["stages"]] == ["noop_custom", "shard"]
    assert man["job"]["stages"][0] == {"name": f"{name}:Noop", "factor": 2}


@pytest.mark.parametrize(
    "stage, message",
    [
        ("os.system; rm -rf /:X", "a stage of your own is named package.module:Class"),
        ("../evil:X", "a stage of your own is named package.module:Class"),
        ("a:b:c", "a stage of your own is named package.module:Class"),
    ],
)
def test_a_name_that_is_not_module_colon_class_is_refused_without_import(tmp_path, custom, stage, message):
    with pytest.raises(ConfigError, match=message):
        load_job(_job(tmp_path, stage), base_dir=tmp_path)


def test_custom_stage_errors_name_the_stage(tmp_path, custom):
    name, mark = custom
    with pytest.raises(ConfigError, match=r"stages\[0\]: stage 'pathlib:Path': pathlib:Path is not a Stage class"):
        check_job(load_job(_job(tmp_path, "pathlib:Path"), base_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"stages\[0\]\(.*:Noop\)\.nope: unknown key"):
        check_job(
            load_job(
                {**_job(tmp_path, f"{name}:Noop"), "stages": [{"name": f"{name}:Noop", "nope": 1}, "shard"]},
                base_dir=tmp_path,
            )
        )
    with pytest.raises(ConfigError, match=r"stages\[0\]: stage 'no_such_module_pf:X': cannot import"):
        check_job(load_job(_job(tmp_path, "no_such_module_pf:X"), base_dir=tmp_path))
