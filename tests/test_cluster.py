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
def cluster(tmp_path):
    """A one-node cluster (1 CPU); calling ``add_node()`` adds a second one."""
    port = _free_port()
    env = _env()
    log = open(tmp_path / "ray.log", "w")
    # Ray's Unix sockets live under --temp-dir, and a socket path must stay
    # under 108 bytes: pytest's tmp_path is too deep for that
    temp = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")
    procs = []
    addr = f"127.0.0.1:{port}"

    def add_node():
        worker = subprocess.Popen(
            [RAY, "start", f"--address={addr}", *NODE],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(worker)
        _wait_nodes(addr, 2, env)

    try:
        head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *NODE],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(head)
        _wait_nodes(addr, 1, env)
        yield addr, add_node
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


def _run(tmp_path, addr: str, urls: list[str], out: str) -> dict:
    pq.write_table(pa.table({"url": urls, "caption": ["x y"] * len(urls)}), tmp_path / "urls.parquet")
    job = {
        "input": {"paths": ["urls.parquet"]},
        "output": {"dir": out, "samples_per_shard": 20},
        "stages": [
            # one fetch at a time per task: the run is bound by tasks in flight, i.e. by nodes
            {"name": "download", "image_size": 16, "thread_count": 1, "allow_networks": ["127.0.0.1/32"]},
            {"name": "tests.contract_stages:RaggedStage", "record_worker": True, "reject_digit": "x"},
            "shard",
        ],
    }
    (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(job))
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / f"{out}.yaml"), "--address", addr],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return read_manifest(tmp_path / out)


def test_rows_pass_spreads_over_every_node(tmp_path, cluster):
    """The same job on one node, then on two (1 CPU each) against a server
    that delays every image by 50 ms: tasks run on both nodes and the per-row
    pass finishes >= 1.7x faster."""
    addr, add_node = cluster
    n = 480
    routes = {f"/{i}.jpg": Route(jpeg(i % 12), "image/jpeg", delay=0.05) for i in range(n)}
    with LocalHTTPServer(routes) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(n - 1)] + [server.url("/missing.jpg")]
        one = _run(tmp_path, addr, urls, "one")
        add_node()
        two = _run(tmp_path, addr, urls, "two")
    assert one["ray"]["nodes"] == 1 and two["ray"]["nodes"] == 2 and two["ray"]["resources"]["CPU"] == 2.0
    assert two["counts"] == {"input": n, "ok": n - 1, "rejected": 1}
    assert verify(tmp_path / "two") == []
    parents = set()
    for p in sorted((tmp_path / "two" / "shards").glob("*.parquet")):
        parents |= set(pq.read_table(p, columns=["worker_parent"]).column(0).to_pylist())
    assert len(parents) == 2, parents  # rows were processed under both nodes' raylets
    speedup = one["timing"]["rows_seconds"] / two["timing"]["rows_seconds"]
    print(
        f"per-row pass: 1 node {one['timing']['rows_seconds']:.1f}s, 2 nodes {two['timing']['rows_seconds']:.1f}s, {speedup:.2f}x"
    )
    assert speedup >= 1.7, (one["timing"], two["timing"])
    for sid in range(n // 20):  # the same bytes either way (worker_parent aside: it names the node)
        a, b = (
            pq.read_table(tmp_path / o / "shards" / f"{sid:05d}.parquet").drop_columns(["worker_parent"])
            for o in ("one", "two")
        )
        assert a.equals(b)
