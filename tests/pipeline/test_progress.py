"""pairforge's own progress of the per-row pass (``pipeline.progress``)."""

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.manifests import layout
from pairforge.pipeline.engine import RunSpec
from pairforge.pipeline.progress import ProgressTracker, duration, quiet_ray
from pairforge.stages.shard import Config as ShardConfig
from pairforge.stages.shard import ShardStage


def _part(out, sid: int, name: str, stages: list[str]) -> dict:
    folder = layout.rows_dir(out, sid)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(stages)
    keys = [f"{sid:05d}{i}" for i in range(n)]
    status = ["ok" if not s else "failed" for s in stages]
    pq.write_table(pa.table({"key": keys, "status": status, "stage": stages}), folder / f"{name}.fit.parquet")
    (folder / f"{name}.rows.arrow").write_bytes(b"")
    return {"shard_id": np.array([sid]), "rows": np.array([n]), "part": np.array([name], dtype=object)}


def test_lines_count_rows_rate_eta_and_drops_by_stage(tmp_path, capsys):
    spec = RunSpec(str(tmp_path), (), ShardStage(ShardConfig()), 10)
    tracker = ProgressTracker(spec, {0: 4, 1: 6}, every=0.05, tty=False)
    tracker.add(_part(tmp_path, 0, "a", ["", "download", "", "basic_filter"]))
    time.sleep(0.2)  # the heartbeat prints while no part lands
    err = capsys.readouterr().err.splitlines()
    assert err and err[-1].startswith("[pairforge] rows 4/10 (40%)")
    assert "rows/s  ETA " in err[-1] and err[-1].endswith("dropped: basic_filter=1 download=1")
    tracker.add(_part(tmp_path, 1, "b", ["download"] * 2 + [""] * 4))
    tracker.close()
    last = capsys.readouterr().err.splitlines()[-1]
    assert "rows 10/10 (100%)" in last and "ETA 0s" in last and "dropped: basic_filter=1 download=3" in last
    assert sorted(tracker.finished) == [0, 1]  # still the RowsTracker: shards are marked done
    assert layout.rows_done(tmp_path, 1).exists()
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # closed: the heartbeat stopped


def test_duration_reads_like_an_eta():
    assert [duration(s) for s in (4.4, 75, 3725)] == ["4s", "1m15s", "1h02m"]


def test_quiet_ray_turns_ray_data_progress_and_info_off_and_verbose_back_on():
    import ray.data

    quiet_ray(False)
    ctx = ray.data.DataContext.get_current()
    console = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    assert console and not ctx.enable_progress_bars and console[0].level == logging.WARNING
    rec = logging.LogRecord("ray.data", logging.WARNING, "", 0, "Progress bars disabled. To enable, ...", (), None)
    assert not console[0].filter(rec)
    quiet_ray(True)
    assert ctx.enable_progress_bars and console[0].level == logging.INFO and console[0].filter(rec)
    quiet_ray(False)
