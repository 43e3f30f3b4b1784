"""A real two-node Ray cluster on this machine (`ray start --head`, then a
second `ray start --address`), and a job run on it with `--address`. The test
stops only the processes it started, by their session ids."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from manifests.manifest import read_manifest, verify
from pipeline.httpserver import LocalHTTPServer, Route
from pipeline.raystart import loopback_env
from tests.shardkit import jpeg

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
NODE = [
    "--node-ip-address=127.0.0.1",
    "--num-cpus=1",
    "--memory=2000000000",
    "--object-store-memory=200000000",
    "--block",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # every `ray start` and every driver must agree on auth (Ray 2.60 turns
    # token auth on by default for a local ray.init); loopback_env keeps the
    # head's dashboard from probing cloud metadata (pipeline/raystart.py)
    return {**os.environ, **loopback_env(), "RAY_AUTH_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _stop(procs) -> None:
    """SIGTERM each `ray start --block` session, then SIGKILL what is left of
    those sessions (raylet, gcs_server, workers): nothing else on the machine."""
    sids = {p.pid for p in procs}  # each was started with start_new_session=True
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    for line in out:
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) in sids:
            try:
                os.kill(int(parts[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture()
def two_node_cluster(tmp_path):
    port = _free_port()
    env = _env()
    log = open(tmp_path / "ray.log", "w")
    # Ray's Unix sockets live under --temp-dir, and a socket path must stay
    # under 108 bytes: pytest's tmp_path is too deep for that
    temp = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")
    procs = []
    try:
        head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *NODE],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(head)
        addr = f"127.0.0.1:{port}"
        _wait_nodes(addr, 1, env)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={addr}", *NODE],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(worker)
        _wait_nodes(addr, 2, env)
        yield addr
    finally:
        _stop(procs)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_nodes(addr: str, n: int, env: dict, timeout: float = 90) -> None:
    code = f"import ray; ray.init(address='{addr}', logging_level='ERROR'); print(sum(x['Alive'] for x in ray.nodes()))"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray cluster at {addr} did not reach {n} nodes")


def test_job_runs_on_a_two_node_cluster(tmp_path, two_node_cluster):
    routes = {f"/{i}.jpg": Route(jpeg(i), "image/jpeg") for i in range(12)}
    with LocalHTTPServer(routes) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(12)] + [server.url("/missing.jpg")]
        pq.write_table(pa.table({"url": urls, "caption": ["x y"] * 13}), tmp_path / "urls.parquet")
        job = {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": "out", "samples_per_shard": 4},
            "stages": [{"name": "download", "image_size": 16, "allow_networks": ["127.0.0.1/32"]}, "shard"],
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        r = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.yaml"), "--address", two_node_cluster],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr[-3000:]
    man = read_manifest(tmp_path / "out")
    assert man["ray"]["nodes"] == 2 and man["ray"]["resources"]["CPU"] == 2.0
    assert man["counts"] == {"input": 13, "ok": 12, "rejected": 1}
    assert verify(tmp_path / "out") == []
