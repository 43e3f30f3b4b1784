"""Politeness at no cost to throughput: a Zipf-skewed URL list over many
loopback hosts that push back, fetched by pairforge with a per-host bound,
by pairforge without one, and by img2dataset, in one run.

    python bench/polite.py              # 20,000 URLs over 200 hosts, 3 timed passes a plan
    python bench/polite.py --quick      # a smoke run (2,000 URLs, 1 pass)

The hosts (``tests/hostsim.py``, in a process of their own: 200 addresses
127.66.x.y, each its own listening socket) answer every image after 40 ms
and answer ``429`` + ``Retry-After: 1`` to a request that arrives while 2 of
theirs are in flight (nginx's ``limit_conn``). The list's shares: the top
host 20% of the rows, the top five 50%, the other 195 hosts the rest in a
Zipf law. The hottest host alone then takes at least its rows x 40 ms / 2
connections: the lower bound no polite crawler beats (the *bound*).

Per plan: wall time, rows fetched, 429s the hosts sent, requests that
arrived with a host's 2 already in flight (*over limit*), requests that
arrived before a ``Retry-After`` a host had sent was over (*early*; those
within 20 ms of the 429, already on the wire, are not counted). Goals
(issue 23) for ``pairforge`` (``per_host_connections: 2``): 0 over limit, 0
early, >= 99.9% of the rows fetched, wall <= 1.25x the bound.

Each plan gets an untimed warm-up pass over the first tenth of the list,
then ``--passes`` timed passes, the order of the plans rotating from pass to
pass; medians with min-max, and the load average before and after.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.parquet as pq

PLANS = ("pairforge", "pairforge-nolimit", "img2dataset")


def shares(hosts: int) -> list[float]:
    """Top host 20%, hosts 2-5 30% (Zipf among them), the rest 50% (Zipf)."""
    mid = [1 / k for k in range(2, 6)]
    tail = [1 / k for k in range(6, hosts + 1)]
    return [0.20] + [0.30 * w / sum(mid) for w in mid] + [0.50 * w / sum(tail) for w in tail]


def counts(n: int, weights: list[float]) -> list[int]:
    """``n`` rows split by ``weights`` (largest remainder: they sum to ``n``)."""
    raw = [n * w / sum(weights) for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: n - sum(out)]:
        out[i] += 1
    return out


def _serve(ips, image, delay, limit, retry_after, conn, port_q) -> None:
    from tests.hostsim import HostSim, Rule

    sim = HostSim({ip: Rule(delay=delay, limit=limit, retry_after=retry_after) for ip in ips}, image)
    port_q.put(sim.port)

    def answer():
        while True:
            if conn.recv() == "scores":
                fields = ("requests", "images", "sent_429", "over_limit", "early")
                conn.send({ip: {f: getattr(s, f) for f in fields} for ip, s in sim.scores.items()})

    threading.Thread(target=answer, daemon=True).start()
    sim.serve()


def totals(scores: dict) -> dict:
    return {f: sum(s[f] for s in scores.values()) for f in next(iter(scores.values()))}


def run_pairforge(args, urls: Path, out: Path, limit: int | None) -> int:
    from pairforge.pipeline.config import load_job
    from pairforge.pipeline.job import run_job

    job = {
        "input": {"paths": [str(urls)]},
        "output": {"dir": str(out), "samples_per_shard": args.per_shard},
        "ray": {"num_cpus": args.processes},
        "stages": [
            {
                "name": "download",
                "image_size": 64,
                "encode_quality": 95,
                "thread_count": args.threads,
                "batch_size": args.per_shard,
                "per_host_connections": limit,
                "allow_networks": ["127.0.0.0/8"],
            },
            "shard",
        ],
    }
    return int(run_job(load_job(job))["counts"]["ok"])


def run_img2dataset(args, urls: Path, out: Path) -> int:
    """img2dataset with bench/download.py's settings (64 px, no retries)."""
    from bench.download import run_img2dataset as run

    settings = argparse.Namespace(
        processes=args.processes,
        threads=args.threads,
        image_size=64,
        resize_mode="border",
        encode_format="jpg",
        encode_quality=95,
        timeout=10.0,
    )
    return run(settings, urls, out, args.per_shard)[1]


def one_pass(plan: str, args, urls: Path, out: Path, conn) -> dict:
    conn.send("scores")
    before = totals(conn.recv())
    t0 = time.perf_counter()
    if plan == "img2dataset":
        ok = run_img2dataset(args, urls, out)
    else:
        ok = run_pairforge(args, urls, out, 2 if plan == "pairforge" else None)
    wall = time.perf_counter() - t0
    conn.send("scores")
    after = totals(conn.recv())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "ok": ok, **{k: after[k] - before[k] for k in after}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--hosts", type=int, default=200)
    p.add_argument("--delay", type=float, default=0.04, help="seconds each host takes to answer")
    p.add_argument("--limit", type=int, default=2, help="requests in flight a host takes before 429")
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="Ray CPUs = img2dataset processes")
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.passes = 2000, 1
    plans = args.plans.split(",")

    from tests.hostsim import addresses
    from tests.shardkit import jpeg

    ips = addresses(args.hosts, second=66)
    per_host = counts(args.n, shares(args.hosts))
    host_of = [ip for ip, k in zip(ips, per_host) for _ in range(k)]
    random.Random(0).shuffle(host_of)
    bound = max(per_host) * args.delay / args.limit

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port_q = ctx.Queue()
    server = ctx.Process(
        target=_serve, args=(ips, jpeg(160, 120), args.delay, args.limit, args.retry_after, child, port_q), daemon=True
    )
    server.start()
    port = port_q.get(timeout=60)
    work = Path(tempfile.mkdtemp(prefix="pf-polite-"))
    urls = [f"http://{ip}:{port}/img/{i}.jpg" for i, ip in enumerate(host_of)]
    full, warm = work / "urls.parquet", work / "warm.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]}), full)
    k = max(1, len(urls) // 10)
    pq.write_table(pa.table({"url": urls[:k], "caption": ["photo"] * k}), warm)

    from pairforge.pipeline.raystart import init_local

    init_local(num_cpus=args.processes, log_to_driver=False)
    load0 = os.getloadavg()
    print(
        f"{args.n} URLs over {args.hosts} hosts (top host {max(per_host)} rows, top 5 "
        f"{sum(sorted(per_host)[-5:]) / args.n:.0%}); {args.delay * 1000:.0f} ms an answer, 429 over "
        f"{args.limit} in flight; bound {bound:.1f}s; {args.processes} CPUs x {args.threads} threads; "
        f"load {load0[0]:.2f}",
        flush=True,
    )
    results: dict[str, list[dict]] = {plan: [] for plan in plans}
    for plan in plans:  # untimed warm-up
        one_pass(plan, args, warm, work / "out", parent)
    for i in range(args.passes):
        for plan in plans[i % len(plans) :] + plans[: i % len(plans)]:
            r = one_pass(plan, args, full, work / "out", parent)
            results[plan].append(r)
            print(f"  pass {i + 1} {plan}: {r['wall']:.1f}s, {r['ok']} fetched, {r['sent_429']} 429s", flush=True)
    load1 = os.getloadavg()
    print(
        f"\n{'plan':18} {'wall s (median [min-max])':>28} {'x bound':>8} {'fetched':>9} {'429s':>6} "
        f"{'over limit':>10} {'early':>6}"
    )
    for plan, rs in results.items():
        walls = [r["wall"] for r in rs]
        med = statistics.median(walls)
        row = {k: statistics.median([r[k] for r in rs]) for k in ("ok", "sent_429", "over_limit", "early")}
        print(
            f"{plan:18} {med:>10.1f} [{min(walls):.1f}-{max(walls):.1f}]{'':>7} {med / bound:>8.2f} "
            f"{row['ok'] / args.n:>8.2%} {row['sent_429']:>6.0f} {row['over_limit']:>10.0f} {row['early']:>6.0f}"
        )
    if "pairforge" in results:
        rs = results["pairforge"]
        med = statistics.median(r["wall"] for r in rs)
        goals = {
            "0 over limit": all(r["over_limit"] == 0 for r in rs),
            "0 early": all(r["early"] == 0 for r in rs),
            ">= 99.9% fetched": all(r["ok"] >= 0.999 * args.n for r in rs),
            "wall <= 1.25x bound": med <= 1.25 * bound,
        }
        print("\npairforge goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
    print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    server.terminate()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
