"""The deferred retry pass: rows that failed for a transient reason get one
more try after the per-row pass, once their host's pause is over. A host
that fails (503) for 30 back-offs and then answers gives its rows back; the
manifest counts first tries, recoveries and final failures per reason.

Time in the Ray test is in units of the download's ``backoff``: at 0.25 s,
7.5 s of failures are the 30 s they would be at the default 1 s (the host is
down after 5 failures in a row, its pauses double from the second), at a
quarter of the wall time."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.manifests.manifest import verify
from pairforge.pipeline.config import load_job
from pairforge.pipeline.job import run_job
from tests.hostsim import HostSim, Rule, addresses
from tests.shardkit import jpeg

pytestmark = pytest.mark.slow


def _job(tmp_path, urls, runner: str, backoff: float) -> dict:
    pq.write_table(pa.table({"url": urls, "caption": [f"c {i}" for i in range(len(urls))]}), tmp_path / "u.parquet")
    return {
        "input": {"paths": [str(tmp_path / "u.parquet")]},
        "output": {"dir": str(tmp_path / f"out-{runner}"), "samples_per_shard": 10},
        "runner": runner,
        "ray": {"num_cpus": 2},
        "stages": [
            {"name": "download", "image_size": 16, "thread_count": 4, "allow_networks": ["127.0.0.0/8"],
             "backoff": backoff},
            "shard",
        ],
    }


def _run(tmp_path, runner: str, failing_for: float, second: int, backoff: float = 1.0):
    down, up = addresses(2, second=second)
    start = time.time()
    rules = {down: Rule(fail_first=failing_for), up: Rule(delay=0.01)}
    with HostSim(rules, jpeg(40, 30)) as sim:
        urls = [sim.url(down if i % 2 else up, f"/img/{i}.jpg") for i in range(60)]
        man = run_job(load_job(_job(tmp_path, urls, runner, backoff)))
    return man, sim.scores[down], time.time() - start


def _check(man, score, failing_for: float, took: float, out, min_tried: int, min_down: int = 0) -> None:
    retry = man["crawl"]["download"]["deferred_retry"]
    tried = sum(c["tried"] for c in retry.values())
    back = sum(c["recovered"] for c in retry.values())
    lost = sum(sum(c["failed"].values()) for c in retry.values())
    assert man["counts"]["input"] == 60 and man["counts"]["ok"] == 60 - lost, (man["counts"], retry)
    assert tried == back + lost and tried >= min_tried, retry
    assert lost <= 2, retry  # a probe or two may still have met the failure
    assert set(retry) <= {"http_503", "host_unavailable"}
    assert took >= failing_for and 0 < score.sent_503 < 30  # a down host is not hammered
    hosts = man["crawl"]["download"]["hosts"]
    assert hosts["hosts"] == 2 and hosts["down"] >= min_down and hosts["rows"] == 60
    assert verify(out) == []


def test_deferred_retry_in_process(tmp_path, capsys):
    man, score, took = _run(tmp_path, "local", failing_for=3.0, second=81)
    _check(man, score, 3.0, took, tmp_path / "out-local", min_tried=1)
    # the figures reach a person: `manifest show` and the report
    from pairforge.cli import main
    from pairforge.manifests.report import write_report

    assert main(["manifest", "show", str(tmp_path / "out-local")]) == 0
    shown = capsys.readouterr().out
    assert "download: 2 hosts" in shown and "deferred retry" in shown and "127.81.1.1" in shown
    page = Path(write_report(tmp_path / "out-local")["path"]).read_text()
    assert 'id="s-crawl"' in page and "127.81.1.1" in page and "Deferred retry" in page


def test_deferred_retry_recovers_a_host_that_fails_for_30_backoffs_on_ray(tmp_path, ray_local):
    man, score, took = _run(tmp_path, "ray", failing_for=7.5, second=82, backoff=0.25)
    _check(man, score, 7.5, took, tmp_path / "out-ray", min_tried=28, min_down=1)  # all its rows but a first wave
    print(f"deferred retry on Ray: {took:.1f}s, {man['crawl']['download']['deferred_retry']}")
