"""Resume at the granularity of input shards: a driver killed with SIGKILL
half-way through the per-row pass, then ``--resume``, downloads only the
rows of input shards that had not finished (counted at the local HTTP
server) and writes the same bytes as an uninterrupted run. The grain within
a shard is ``tests/pipeline/test_resume_chunks.py``'s."""

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pairforge.manifests import layout
from pairforge.manifests.manifest import verify
from pairforge.pipeline.config import load_job
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from pairforge.pipeline.resume import rows_mark
from tests.killkit import kill_session, start_driver
from tests.shardkit import jpeg

pytestmark = pytest.mark.slow
SHARDS, PER_SHARD = 16, 8


def _job_dict(urls_path, out: str) -> dict:
    return {
        "input": {"paths": [str(urls_path)]},
        "output": {"dir": out, "samples_per_shard": PER_SHARD},
        "ray": {"num_cpus": 2},
        "stages": [
            {"name": "download", "image_size": 16, "thread_count": 2, "allow_networks": ["127.0.0.1/32"]},
            {"name": "dedup_exact"},
            "shard",
        ],
    }


def _routes(delay: float = 0.15) -> dict:
    """The images, each answered after ``delay`` s: slow enough for the driver
    to be cut mid-run; the resumes and the reference runs take them at once."""
    n = SHARDS * PER_SHARD  # copies at other URLs, so the global stage has work across shards
    return {f"/{i}.jpg": Route(jpeg(i % (n // 2)), "image/jpeg", delay=delay) for i in range(n)}


def _start_driver(tmp_path, server, stderr) -> subprocess.Popen:
    """Write the URL list and the job, then run ``pairforge run`` in a process session of its own."""
    n = SHARDS * PER_SHARD
    urls = [server.url(f"/{i}.jpg") for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"c {i % 7}" for i in range(n)]}), tmp_path / "urls.parquet")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_job_dict(tmp_path / "urls.parquet", str(tmp_path / "cut"))))
    return start_driver(tmp_path / "job.yaml", stderr)


def test_sigkill_half_way_then_resume_downloads_only_the_rest(tmp_path, ray_local):
    with LocalHTTPServer(_routes()) as server:
        proc = _start_driver(tmp_path, server, open(tmp_path / "driver.log", "w"))
        cut = tmp_path / "cut"
        deadline = time.time() + 240
        try:
            while time.time() < deadline and proc.poll() is None:
                if sum(rows_mark(cut, s) is not None for s in range(SHARDS)) >= SHARDS // 2:
                    break
                time.sleep(0.05)
        finally:
            kill_session(proc)
        finished = [s for s in range(SHARDS) if rows_mark(cut, s) is not None]
        assert SHARDS // 2 <= len(finished) < SHARDS, (finished, (tmp_path / "driver.log").read_text()[-2000:])
        assert not layout.manifest_json(cut).exists()

        server.routes.update(_routes(delay=0.0))
        before = sum(server.hits.values())
        man = run_job(load_job(tmp_path / "job.yaml"), resume=True)
        resumed_hits = sum(server.hits.values()) - before
        assert man["timing"]["resumed_rows_shards"] == len(finished)
        # only the unfinished shards' rows, less those a shard saved before its mark was written
        assert resumed_hits == (SHARDS - len(finished)) * PER_SHARD - man["timing"]["resumed_saved_rows"]

        run_job(load_job(_job_dict(tmp_path / "urls.parquet", str(tmp_path / "full"))))
    full = tmp_path / "full"
    for sid in range(SHARDS):
        for f in (layout.shard_parquet, layout.rejects_parquet, layout.shard_tar):
            assert f(cut, sid).read_bytes() == f(full, sid).read_bytes(), f(cut, sid)
    assert verify(cut) == []
    assert man["stages"][1]["dropped"], "the planted copies were not found"


def _interrupt(tmp_path, server, name: str, after: float | None = None, requests: int = 0) -> None:
    """Start ``pairforge run`` into ``tmp_path/name``, send it SIGINT (as
    Ctrl-C in a terminal does: to the whole process group) ``after`` seconds
    after the driver says the per-row pass begins (Ray starting, Ray Data
    planning and starting its executor), or else once the server has answered
    ``requests`` more requests; and check that it leaves as an interrupted
    run should: exit 130, the line saying how to resume, no traceback, no
    crash at exit."""
    job_dir = tmp_path / name
    job_dir.mkdir()
    proc = _start_driver(job_dir, server, subprocess.PIPE)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if " rows in " in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    hits0 = sum(server.hits.values())
    try:
        if after is not None:
            assert started.wait(240), "".join(lines)[-3000:]
            time.sleep(after)
        else:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and sum(server.hits.values()) - hits0 < requests:
                time.sleep(0.02)
        assert proc.poll() is None, ("the run ended before it could be interrupted", "".join(lines)[-3000:])
        assert sum(server.hits.values()) - hits0 < SHARDS * PER_SHARD, "the run fetched everything first"
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # say where the driver is stuck (pairforge.cli: SIGUSR2 prints stacks)
            os.kill(proc.pid, signal.SIGUSR2)
            time.sleep(3)
            raise AssertionError((name, "still running 60 s after SIGINT", "".join(lines)[-6000:])) from None
    finally:
        kill_session(proc) if proc.poll() is None else None
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 130, (name, proc.returncode, err[-3000:])
    last = [line for line in err.splitlines() if line.startswith("pairforge:")]
    assert last and "interrupted" in last[-1] and "--resume" in last[-1], err[-3000:]
    # what Ray Data's executor printed when torn down at interpreter exit ("Exception ignored in ...")
    assert "Traceback" not in err and "Exception ignored" not in err, (name, err[-3000:])
    # the command left by itself, not through its 30 s watchdog (pairforge.cli_signals), whose stacks say where it hung
    assert "still running" not in err, (name, err[-6000:])


def test_sigint_stops_cleanly_and_resume_cleans_up(tmp_path, ray_local):
    """Ctrl-C at four moments with a CPU burner beside the driver: three
    while Ray starts and Ray Data plans and starts (0.5, 4 and 8 s into the
    per-row pass), one with downloads in flight. Where the interrupt lands in
    Ray's or Ray Data's driver code is a matter of timing; what it left
    half-made, torn down at interpreter exit, printed tracebacks or crashed
    the process (SIGSEGV, SIGINT) for about one interrupt in seven in that
    window before the CLI left with ``os._exit``. The last cut is resumed."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(5))
    try:
        with LocalHTTPServer(_routes()) as server:
            for after in (0.5, 4.0, 8.0):
                _interrupt(tmp_path, server, f"after_{after}s", after=after)
            # while downloads are in flight (requests counted at the server): rows marks
            # can land in a burst at the end of the per-row pass, too late to interrupt it
            _interrupt(tmp_path, server, "in_flight", requests=2 * PER_SHARD)
            cut = tmp_path / "in_flight" / "cut"
            stale = layout.shards_dir(cut) / ".00003.tar.tmp-4242"  # as an interrupted write leaves it
            stale.parent.mkdir(parents=True, exist_ok=True)
            stale.write_bytes(b"half")
            server.routes.update(_routes(delay=0.0))
            run_job(load_job(tmp_path / "in_flight" / "job.yaml"), resume=True)
            assert not stale.exists()
            assert verify(cut) == []
            run_job(load_job(_job_dict(tmp_path / "in_flight" / "urls.parquet", str(tmp_path / "full"))))
    finally:
        burner.kill()
        burner.wait()
    for sid in range(SHARDS):
        for f in (layout.shard_parquet, layout.rejects_parquet, layout.shard_tar):
            assert f(cut, sid).read_bytes() == f(tmp_path / "full", sid).read_bytes(), f(cut, sid)
    (layout.shards_dir(cut) / ".00001.parquet.tmp-7").write_bytes(b"x")
    assert any("temporary file" in p for p in verify(cut))
