"""A real two-node Ray cluster on this machine (`ray start --head`, then a
second `ray start --address`), and jobs run on it with `--address`: the
per-row pass spreads over both nodes, and a node killed while it downloads
costs no row and duplicates none (issue 14). The tests stop only the
processes they started, by their session ids."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pairforge.manifests import layout
from pairforge.manifests.manifest import read_manifest, verify
from pairforge.pipeline.config import load_job
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from pairforge.pipeline.raystart import loopback_env
from pairforge.pipeline.resume import rows_mark
from tests.hostsim import HostSim, Rule, addresses
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
    those sessions (raylet, gcs_server, workers): nothing else on the machine.
    The grace is short: `ray start --block` answers SIGTERM by asking the GCS
    to drain its node, and the GCS, terminated too, is gone; it waits ~30 s
    for it (measured here), so a 10 s grace was 10 s lost at every teardown."""
    sids = {p.pid for p in procs}  # each was started with start_new_session=True
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 2
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


class _Cluster:
    """The cluster of this module: its address, the `ray start` sessions
    (head first) and ``add_node()``, which starts a second 1-CPU node."""

    def __init__(self, addr: str, env: dict, log):
        self.addr, self.env, self.log = addr, env, log
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, nodes: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [RAY, "start", *args, *NODE],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        _wait_nodes(self.addr, nodes, self.env)
        return proc

    def add_node(self) -> subprocess.Popen:
        return self.start(f"--address={self.addr}", nodes=2)

    def nodes(self) -> int:
        return sum(p.poll() is None for p in self.procs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node cluster (1 CPU) for the whole module: each `ray start`
    costs 10-20 s here. Tests run in file order: the node-loss test kills
    the second node the first test added (or adds it when run alone)."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("ray") / "ray.log", "w")
    # Ray's Unix sockets live under --temp-dir, and a socket path must stay
    # under 108 bytes: pytest's tmp_path is too deep for that
    temp = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")
    c = _Cluster(f"127.0.0.1:{port}", _env(), log)
    try:
        # a dead node is declared dead after ~1.5 s instead of ~15 s (5 failed health checks, 3 s apart)
        c.env = {**c.env, "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
        c.start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", nodes=1)
        c.env = _env()
        yield c
    finally:
        _stop(c.procs)
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
        [sys.executable, "-m", "pairforge.cli", "run", str(tmp_path / f"{out}.yaml"), "--address", addr],
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
    addr = cluster.addr
    n = 480
    routes = {f"/{i}.jpg": Route(jpeg(i % 12), "image/jpeg", delay=0.05) for i in range(n)}
    with LocalHTTPServer(routes) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(n - 1)] + [server.url("/missing.jpg")]
        one = _run(tmp_path, addr, urls, "one")
        cluster.add_node()
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


# ------------------------------------------------------------------ politeness across nodes


def test_per_host_bounds_and_retry_after_hold_across_nodes(tmp_path, cluster):
    """Two nodes, 4 download threads a task: a host that counts requests in
    flight never sees more than ``per_host_connections`` (2) from the job,
    and a host that answers 429 + ``Retry-After: 3`` gets no request from
    any node until 3 s have passed (requests already on the wire when it
    answered, arriving within 0.2 s of it, are not counted)."""
    if cluster.nodes() < 2:
        cluster.add_node()
    hot, paused = addresses(2, second=91)
    rules = {hot: Rule(delay=0.05, limit=2), paused: Rule(delay=0.1, throttle_after=6, retry_after=3)}
    with HostSim(rules, jpeg(3), grace=0.2) as sim:
        urls = [sim.url(paused if i % 4 == 0 else hot, f"/img/{i}.jpg") for i in range(160)]
        pq.write_table(pa.table({"url": urls, "caption": ["x y"] * len(urls)}), tmp_path / "urls.parquet")
        job = {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": "polite", "samples_per_shard": 10},
            "stages": [
                {
                    "name": "download",
                    "image_size": 16,
                    "thread_count": 4,
                    "per_host_connections": 2,
                    "retries": 1,
                    "allow_networks": ["127.0.0.0/8"],
                },
                {"name": "tests.contract_stages:RaggedStage", "record_worker": True, "reject_digit": "x"},
                "shard",
            ],
        }
        (tmp_path / "polite.yaml").write_text(yaml.safe_dump(job))
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pairforge.cli",
                "run",
                str(tmp_path / "polite.yaml"),
                "--address",
                cluster.addr,
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr[-3000:]
    man = read_manifest(tmp_path / "polite")
    assert man["ray"]["nodes"] == 2 and man["counts"]["ok"] == 160, man["counts"]
    parents = set()
    for p in sorted((tmp_path / "polite" / "shards").glob("*.parquet")):
        parents |= set(pq.read_table(p, columns=["worker_parent"]).column(0).to_pylist())
    assert len(parents) == 2, parents  # both nodes downloaded
    h, p = sim.scores[hot], sim.scores[paused]
    assert h.max_in_flight <= 2 and h.over_limit == 0 and h.sent_429 == 0, (h.max_in_flight, h.over_limit)
    assert p.sent_429 == 1 and p.early == 0, [round(t - p.sent_429_at, 3) for t, _ in p.arrivals]
    after = [t for t, _ in p.arrivals if t > p.sent_429_at + sim.grace]
    assert after and min(after) >= p.sent_429_at + 3.0
    crawl = man["crawl"]["download"]["hosts"]
    assert crawl["http_429"] == 1 and crawl["pauses"] >= 1 and crawl["rows"] == 160


# ------------------------------------------------------------------ a node lost mid-run

LOSS_SHARDS, LOSS_PER_SHARD = 20, 20


def _session(sid: int) -> list[psutil.Process]:
    """The processes of one `ray start` session: its raylet, its workers, its agents."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def _client_ports(procs: list[psutil.Process], server_port: int) -> set[int]:
    """The local ports of the TCP connections these processes hold to the server."""
    ports = set()
    for p in procs:
        try:
            ports |= {c.laddr.port for c in p.net_connections(kind="tcp") if c.raddr and c.raddr.port == server_port}
        except psutil.Error:
            pass
    return ports


def _loss_job(tmp_path, out: str, runner: str) -> Path:
    job = {
        "input": {"paths": ["urls.parquet"]},
        "output": {"dir": out, "samples_per_shard": LOSS_PER_SHARD},
        "runner": runner,
        "stages": [
            # one fetch at a time per task, so a task is ~1 s of requests the server can see
            {"name": "download", "image_size": 16, "thread_count": 1, "allow_networks": ["127.0.0.1/32"]},
            "dedup_exact",  # a global stage: its fit and the writes run after the loss
            "shard",
        ],
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _keys(out: Path) -> Counter:
    keys: Counter = Counter()
    for folder in ("shards", "rejects"):
        for p in sorted((out / folder).glob("*.parquet")):
            keys.update(pq.read_table(p, columns=["key"]).column(0).to_pylist())
    return keys


def test_worker_node_killed_while_downloading_loses_and_duplicates_nothing(tmp_path, cluster):
    """SIGKILL the second node's whole `ray start` session (raylet, workers,
    agents) at a moment its workers have requests in flight at the server,
    a few shards into the per-row pass: Ray retries the lost tasks on the
    head, the job exits 0, every input row is in exactly one of shards or
    rejects, and the bytes are those of an in-process run."""
    if cluster.nodes() < 2:
        cluster.add_node()
    worker = cluster.procs[-1]
    n = LOSS_SHARDS * LOSS_PER_SHARD
    # /360.jpg on are copies of /0.jpg on (other shards; the last URL is a 404): dedup_exact has work
    fast = {f"/{i}.jpg": Route(jpeg(i % (n - 40)), "image/jpeg") for i in range(n)}
    urls = [f"/{i}.jpg" for i in range(n - 1)] + ["/missing.jpg"]
    with LocalHTTPServer(fast) as server:
        pq.write_table(
            pa.table({"url": [server.url(u) for u in urls], "caption": ["x y"] * n}), tmp_path / "urls.parquet"
        )
        run_job(load_job(_loss_job(tmp_path, "local", "local")))  # the reference, in process

        server.routes.update({p: Route(r.body, r.content_type, delay=0.05) for p, r in fast.items()})
        before = Counter(server.hits)
        out = tmp_path / "lost"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pairforge.cli",
                "run",
                str(_loss_job(tmp_path, "lost", "ray")),
                "--address",
                cluster.addr,
            ],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "driver.log", "w"),
        )
        hot: set[str] = set()
        deadline = time.time() + 120
        try:
            while not hot and proc.poll() is None and time.time() < deadline:
                if sum(rows_mark(out, s) is not None for s in range(LOSS_SHARDS)) >= 3:
                    procs = _session(worker.pid)
                    ports = _client_ports(procs, server.port)
                    # a request of the worker node's, not near its shard's end: the task has rows to go
                    hot = {
                        path
                        for (_, port), path in server.in_flight().items()
                        if port in ports
                        and path[1:-4].isdigit()
                        and int(path[1:-4]) % LOSS_PER_SHARD < LOSS_PER_SHARD - 5
                    }
                    if hot:
                        for p in procs:
                            try:
                                p.kill()
                            except psutil.NoSuchProcess:
                                pass
                time.sleep(0.02)
            assert hot, "the worker node never had a download in flight before the job ended"
            server.routes.update(fast)  # the delay was for the kill to find requests in flight; the rest need not wait
            done_at_kill = sum(rows_mark(out, s) is not None for s in range(LOSS_SHARDS))
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        log = (tmp_path / "driver.log").read_text()
        assert rc == 0, log[-3000:]
        assert worker.wait(timeout=10) is not None and not _session(worker.pid)
        again = {p: server.hits[p] - before[p] for p in hot}
        assert all(c >= 2 for c in again.values()), again  # the killed task's rows were fetched again
        refetched = sum(server.hits.values()) - sum(before.values()) - n
    print(f"killed the worker node with {done_at_kill}/{LOSS_SHARDS} shards done; {refetched} rows fetched twice")

    keys = _keys(out)
    expected = {f"{s:05d}{r:02d}" for s in range(LOSS_SHARDS) for r in range(LOSS_PER_SHARD)}
    assert set(keys) == expected and set(keys.values()) == {1}  # 0 lost, 0 duplicated
    local, lost = read_manifest(tmp_path / "local"), read_manifest(out)
    assert lost["counts"] == local["counts"] and lost["counts"]["rejected"] == 40
    assert lost["ray"]["nodes"] == 2 and verify(out) == []
    for sid in range(LOSS_SHARDS):
        for f in (layout.shard_parquet, layout.rejects_parquet, layout.shard_tar):
            assert f(out, sid).read_bytes() == f(tmp_path / "local", sid).read_bytes(), f(out, sid)
