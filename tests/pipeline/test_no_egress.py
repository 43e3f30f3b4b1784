"""Starting Ray the way pairforge does sends nothing off loopback.

A child process runs in private user, network, mount and PID namespaces
(``unshare``): the only interface is ``lo``, every IPv4 address is routed to
it (``ip route add local 0.0.0.0/0 dev lo``), and ``/etc/hosts`` maps
metadata.google.internal and usage-stats.ray.io to 169.254.169.254. A counter
in the child listens on TCP 80 and 443 and UDP 53 of every address, so a
cloud metadata probe, a usage report or a DNS query made by any process in
there is recorded. The child then

1. calls Ray's own probe (``usage_lib.get_cluster_config_to_report`` on a
   missing file) to show the counter sees it (3 requests: Azure, GCP, AWS);
2. starts Ray with :func:`pipeline.raystart.init_local`, waits until the
   dashboard's ``UsageStatsHead`` has run, shuts Ray down;
3. starts a head node with ``ray start --head --block`` in the environment
   :func:`pipeline.raystart.loopback_env` gives, waits the same way, stops it.

Steps 2 and 3 must record nothing. The PID namespace ends every process the
child started when it exits.

Without the fix (``PAIRFORGE_EGRESS_UNFIXED=1 pytest tests/pipeline/test_no_egress.py``:
step 2 is a plain ``ray.init(num_cpus=1, include_dashboard=False)``, step 3 a
``ray start`` with only ``RAY_USAGE_STATS_ENABLED=0``) the test fails; measured
with Ray 2.60: step 2 made 3 requests (GET 169.254.169.254/metadata/instance,
GET metadata.google.internal/computeMetadata/v1, GET
169.254.169.254/latest/meta-data/), step 3 the same 3 plus a TLS connection
to usage-stats.ray.io:443 (the "usage stats disabled" report).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pairforge.pipeline.raystart import SITE_DIR, apply_loopback_env, loopback_env

ROOT = Path(__file__).resolve().parents[2]
UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc"]
# $1: a folder for the hosts file; the rest: the command to run in the namespaces
SETUP = """set -e
ip link set lo up
ip route add local 0.0.0.0/0 dev lo
{ cat /etc/hosts; echo '169.254.169.254 metadata.google.internal usage-stats.ray.io'; } > "$1/hosts"
mount --bind "$1/hosts" /etc/hosts
shift
"$@"
"""

CHILD = r'''
import glob, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path

FIXED = sys.argv[1] == "fixed"
BASE_ENV = dict(os.environ)
hits, lock = [], threading.Lock()


def record(what):
    with lock:
        hits.append(what)


def serve_tcp(sock):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def answer(conn):
    ip, port = conn.getsockname()[:2]
    conn.settimeout(2)
    try:
        head = conn.recv(4096)
        if port == 80:
            conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    except OSError:
        head = b""
    finally:
        conn.close()
    lines = head.decode("latin-1").split("\r\n")
    host = next((h.split(":", 1)[1].strip() for h in lines[1:] if h.lower().startswith("host:")), "")
    what = lines[0] if port == 80 else "TLS" if head[:1] == b"\x16" else repr(head[:20])
    record(f"tcp {ip}:{port} {what} {host}")


def serve_dns(sock):
    while True:
        data, peer = sock.recvfrom(2048)
        labels, i = [], 12
        while i < len(data) and data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode("latin-1"))
            i += 1 + data[i]
        record(f"dns query {'.'.join(labels)} from {peer[0]}")


for port in (80, 443):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    threading.Thread(target=serve_tcp, args=(s,), daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 53))
threading.Thread(target=serve_dns, args=(u,), daemon=True).start()


def take():
    time.sleep(0.5)  # let the counter threads finish what was accepted
    with lock:
        out = list(hits)
        hits.clear()
    return out


def wait_log(temp, needles, timeout=60):
    """Wait until the dashboard log under ``temp`` holds every needle."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in glob.glob(f"{temp}/session_*/logs/dashboard.log"):
            text = Path(path).read_text(errors="replace")
            if all(n in text for n in needles):
                return True
        time.sleep(0.2)
    return False


RAN = "Usage reporting is disabled."  # logged right after the cloud probe
NO_PROBE = "pairforge: skipped Ray's cloud metadata probe"
NO_REPORT = "pairforge: did not send the usage report"
res = {}

# 1. the counter sees Ray's probe when it runs
from ray._common.usage import usage_lib

usage_lib.get_cluster_config_to_report("/nonexistent/ray_bootstrap_config.yaml")
res["probe"] = {"hits": take()}

# 2. ray.init, as pairforge runs it
import ray

temp = tempfile.mkdtemp(prefix="pf-egress-", dir="/tmp")
t0 = time.time()
if FIXED:
    from pairforge.pipeline.raystart import init_local

    init_local(num_cpus=1, object_store_memory=100_000_000, log_to_driver=False, _temp_dir=temp)
else:
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100_000_000, log_to_driver=False, _temp_dir=temp)
ok = wait_log(temp, [RAN, NO_PROBE] if FIXED else [RAN])
time.sleep(1)
ray.shutdown()
res["ray_init"] = {"hits": take(), "dashboard_ran": ok, "seconds": round(time.time() - t0, 1)}
shutil.rmtree(temp, ignore_errors=True)

# 3. ray start --head --block, in the environment pairforge gives it
from pairforge.pipeline.raystart import loopback_env

env = {**BASE_ENV, **loopback_env(BASE_ENV)} if FIXED else {**BASE_ENV, "RAY_USAGE_STATS_ENABLED": "0"}
temp = tempfile.mkdtemp(prefix="pf-egress-", dir="/tmp")
t0 = time.time()
head = subprocess.Popen(
    [str(Path(sys.executable).with_name("ray")), "start", "--head", "--port=6379", "--include-dashboard=false",
     "--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp}",
     "--block"],
    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
)
ok = wait_log(temp, [RAN, NO_PROBE, NO_REPORT] if FIXED else [RAN])
time.sleep(1 if FIXED else 3)  # unfixed: the disabled-usage report follows RAN
os.killpg(head.pid, signal.SIGTERM)
try:
    head.wait(10)
except subprocess.TimeoutExpired:
    os.killpg(head.pid, signal.SIGKILL)
res["ray_start"] = {"hits": take(), "dashboard_ran": ok, "seconds": round(time.time() - t0, 1)}
shutil.rmtree(temp, ignore_errors=True)
print(json.dumps(res))
'''


def _namespaces_or_skip(tmp_path: Path) -> None:
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} to build a private network namespace")
    try:
        r = subprocess.run(
            [*UNSHARE, "sh", "-c", SETUP, "setup", str(tmp_path), "true"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run unshare: {e}")
    if r.returncode != 0:
        pytest.skip(f"private user/network/mount/PID namespaces are not permitted here: {r.stderr.strip()[-500:]}")


def test_loopback_env_forces_usage_stats_off_and_puts_the_shim_first_once(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/a", SITE_DIR, "/b"]))
    apply_loopback_env()
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["PYTHONPATH"] == os.pathsep.join([SITE_DIR, "/a", "/b"])
    assert loopback_env() == {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.environ["PYTHONPATH"]}
    assert loopback_env({})["PYTHONPATH"] == SITE_DIR


def test_the_shim_patches_rays_dashboard_and_nothing_else(tmp_path):
    """The same script, once at a path ending in ray/dashboard/dashboard.py
    and once elsewhere: only the first sees the patched usage_lib."""
    code = (
        "from ray._common.usage import usage_lib as u\n"
        "print(u.get_cloud_from_metadata_requests.__module__, u.UsageReportClient.report_usage_data.__module__)\n"
    )
    dash = tmp_path / "ray" / "dashboard" / "dashboard.py"
    dash.parent.mkdir(parents=True)
    dash.write_text(code)
    (tmp_path / "other.py").write_text(code)
    env = {**os.environ, **loopback_env()}
    out = [
        subprocess.run([sys.executable, str(p)], env=env, capture_output=True, text=True, timeout=120, check=True)
        for p in (dash, tmp_path / "other.py")
    ]
    assert out[0].stdout.split() == ["sitecustomize", "sitecustomize"], out[0].stderr
    assert out[1].stdout.split() == ["ray._common.usage.usage_lib"] * 2, out[1].stderr


@pytest.mark.slow
def test_ray_starts_stay_on_loopback(tmp_path):
    _namespaces_or_skip(tmp_path)
    mode = "unfixed" if os.environ.get("PAIRFORGE_EGRESS_UNFIXED") else "fixed"
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    t0 = time.time()
    r = subprocess.run(
        [*UNSHARE, "sh", "-c", SETUP, "setup", str(tmp_path), sys.executable, str(tmp_path / "child.py"), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{mode}: {time.time() - t0:.1f}s", json.dumps(res, indent=1))
    # the counter sees Ray's probe: Azure and AWS at 169.254.169.254, GCP by name
    assert len(res["probe"]["hits"]) == 3, res["probe"]
    assert res["ray_init"]["hits"] == [], res["ray_init"]
    assert res["ray_start"]["hits"] == [], res["ray_start"]
    # UsageStatsHead ran, with the patch in place, before Ray was stopped
    assert res["ray_init"]["dashboard_ran"] and res["ray_start"]["dashboard_ran"], res
