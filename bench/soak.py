"""The reliability soak of issue 14: a long pairforge run (download +
basic_filter + shard on local Ray) against local servers that mix good
images with every failure a web URL list holds (``bench/soakserver.py``:
404s, 500s, slow bodies and trickled headers past the deadline, connection
resets, gzip and pixel bombs, non-images, cut transfers), to show that it
keeps its pace and its memory and accounts for every row.

    python bench/soak.py                 # 100k URLs (~10-20 min on 2 cores)
    python bench/soak.py --quick         # a smoke run (5000 URLs)

It prints and writes to ``bench/results/soak-N-DATE.json``:

* rows/s of the whole per-row pass, and per segment: the pass cut into 10
  segments of equal rows (input shards in the order they finished; each
  shard's finish time is its ``_done.json`` mark), median and spread of the
  10. One long run after an untimed warm-up run (4 shards per task slot, on
  the same Ray, so every worker has imported and built its pools), not 3
  timed passes: a soak is one run, and its segments are its repeats.
* RSS every ``--every`` s (psutil) of the driver (this process) and the sum
  over the Ray worker processes (``ray::`` titles), with their private
  (anonymous) part; over the per-row pass, the mean of the last 10% of the
  samples against the first 10%: flat when within 10%.
* lost rows (input rows in neither shards nor rejects) and duplicated ones.
* per reason, the rows planted against those observed, and the rows whose
  reason is not the one planted for them (should be 0).

Timings on a shared or small machine are not figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.soakserver import KINDS, MIX, plant, start_servers, urls  # noqa: E402
from pairforge.manifests import layout  # noqa: E402

MIB = 1 << 20


def _anon(pid: int) -> int:
    """The private (anonymous) resident bytes of a process: RSS less the
    shared pages (libraries, object-store memory it touched)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler:
    """Every ``every`` seconds, in a thread: the driver's RSS, the Ray worker
    processes' (count and summed RSS), the other Ray processes' (raylet,
    GCS, agents), and the input shards whose rows are done."""

    def __init__(self, out: Path, every: float, servers: list[int]):
        self.out, self.every = out, every
        self._servers = [psutil.Process(pid) for pid in servers]
        self.samples: list[dict] = []
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict:
        s = {
            "t": time.time(),
            "cpu_percent": psutil.cpu_percent(),
            "driver_rss": self._me.memory_info().rss,
            "driver_anon": _anon(self._me.pid),
        }
        workers = [0, 0, 0]  # count, rss, anon
        system = 0
        # CPU seconds so far (user + system), by who spent them
        cpu = {"driver": sum(self._me.cpu_times()[:2]), "workers": 0.0, "ray_system": 0.0, "servers": 0.0}
        for p in self._servers:
            cpu["servers"] += sum(p.cpu_times()[:2])
        for p in self._me.children(recursive=True):
            try:
                title = (p.cmdline() or [""])[0]
                rss, used = p.memory_info().rss, sum(p.cpu_times()[:2])
            except psutil.Error:
                continue
            if p in self._servers:
                continue
            if title.startswith("ray::"):
                workers[0] += 1
                workers[1] += rss
                workers[2] += _anon(p.pid)
                cpu["workers"] += used
            else:
                system += rss
                cpu["ray_system"] += used
        s.update(workers=workers[0], workers_rss=workers[1], workers_anon=workers[2], ray_system_rss=system, cpu=cpu)
        rows = layout.work_dir(self.out) / "rows"
        s["shards_done"] = sum(1 for _ in rows.glob("*/_done.json")) if rows.exists() else 0
        return s

    def _loop(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.every):
                return


def write_input(path: Path, url_list: list[str], kinds) -> None:
    n = len(url_list)
    pq.write_table(
        pa.table(
            {
                "url": url_list,
                "caption": [f"a photo of a thing numbered {i}" for i in range(n)],
                "plant": [KINDS[int(k)] for k in kinds],
                "i": list(range(n)),
            }
        ),
        path,
    )


def job_dict(urls_path: Path, out: Path, per_shard: int, args) -> dict:
    return {
        "input": {"paths": [str(urls_path)]},
        "output": {"dir": str(out), "samples_per_shard": per_shard},
        "stages": [
            {
                "name": "download",
                "image_size": 128,
                "timeout": args.timeout,
                "deadline": args.deadline,
                "retries": 0,
                "max_bytes": 2_000_000,
                "thread_count": args.threads,
                "batch_size": per_shard,  # one chunk a task: one deadline tail a shard, not one per chunk
                "allow_networks": ["127.0.0.1/32"],
            },
            "basic_filter",
            "shard",
        ],
    }


def segments(out: Path, t0: float, parts: int = 10) -> list[dict]:
    """Rows/s of ``parts`` segments of (near) equal shard counts, shards
    taken in the order their rows finished (their marks' mtimes); the first
    segment starts at ``t0``, the job's start."""
    marks = sorted(
        (m.stat().st_mtime, json.loads(m.read_text())["rows"])
        for m in (layout.work_dir(out) / "rows").glob("*/_done.json")
    )
    segs, start = [], t0
    for idx in np.array_split(np.arange(len(marks)), min(parts, len(marks))):
        end, rows = marks[idx[-1]][0], sum(marks[i][1] for i in idx)
        segs.append({"rows": rows, "seconds": end - start, "rows_per_s": rows / max(end - start, 1e-9)})
        start = end
    return segs


def flatness(samples: list[dict], key: str) -> dict:
    """Mean of the first and last 10% of the samples, and their ratio."""
    v = [s[key] for s in samples]
    k = max(1, len(v) // 10)
    first, last = statistics.fmean(v[:k]), statistics.fmean(v[-k:])
    ratio = last / first if first else float("nan")
    return {"first_mib": first / MIB, "last_mib": last / MIB, "ratio": ratio, "flat": abs(ratio - 1) <= 0.10}


def account(out: Path, n: int, kinds) -> dict:
    """Every input row in exactly one of shards or rejects, and its reason
    against the one planted for it (the first 20 rows that differ, with
    their detail)."""
    seen: Counter = Counter()
    observed: Counter = Counter()
    wrong: Counter = Counter()
    examples: list[dict] = []
    for folder, cols in (("shards", ["i", "plant"]), ("rejects", ["i", "plant", "stage", "reason", "detail"])):
        for p in sorted((out / folder).glob("*.parquet")):
            t = pq.read_table(p, columns=cols).to_pydict()
            blank = [""] * len(t["i"])
            for i, kind, st, reason, detail in zip(
                t["i"], t["plant"], t.get("stage", blank), t.get("reason", blank), t.get("detail", blank)
            ):
                seen[i] += 1
                observed[(st, reason)] += 1
                if (st, reason) != MIX[kind][1:]:
                    wrong[(kind, st, reason)] += 1
                    if len(examples) < 20:
                        examples.append({"i": i, "planted": kind, "stage": st, "reason": reason, "detail": detail})
    planted = Counter(MIX[KINDS[int(k)]][1:] for k in kinds)
    table = [
        {"stage": st or "-", "reason": r or "ok", "planted": planted[(st, r)], "observed": observed[(st, r)]}
        for st, r in sorted(set(planted) | set(observed))
    ]
    return {
        "lost": sum(1 for i in range(n) if seen[i] == 0),
        "duplicated": sum(c - 1 for c in seen.values() if c > 1),
        "reasons": table,
        "not_as_planted": {f"{k} -> {s or '-'}/{r or 'ok'}": c for (k, s, r), c in sorted(wrong.items())},
        "not_as_planted_rows": examples,
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="URLs in the timed run")
    p.add_argument("--quick", action="store_true", help="smoke run: 5000 URLs")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    p.add_argument("--threads", type=int, default=32, help="download threads per task")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--deadline", type=float, default=3.0)
    p.add_argument("--server-procs", type=int, default=2)
    p.add_argument("--every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the output folder")
    args = p.parse_args(argv)
    n = 5000 if args.quick else args.n
    per_shard = max(250, n // 100)
    slots = args.cpus  # one task a CPU: basic_filter, fused with download into one task, asks for 1
    warm_n = min(n, 4 * slots * per_shard)

    t0 = time.perf_counter()
    servers, ports = start_servers(n, args.seed, args.server_procs)
    kinds = plant(n, args.seed)
    print(f"{n} planted URLs on {len(ports)} server processes ({time.perf_counter() - t0:.1f}s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="pf-soak-"))
    url_list = urls(n, args.seed, ports)
    write_input(work / "urls.parquet", url_list, kinds)
    write_input(work / "warm.parquet", url_list[:warm_n], kinds[:warm_n])
    out = work / "out"
    try:
        import ray

        from pairforge.pipeline.config import load_job
        from pairforge.pipeline.job import run_job
        from pairforge.pipeline.raystart import init_local

        init_local(num_cpus=args.cpus, log_to_driver=False)
        t0 = time.perf_counter()
        run_job(load_job(job_dict(work / "warm.parquet", work / "warm", per_shard, args)), progress_every=60)
        print(f"warm-up: {warm_n} rows in {time.perf_counter() - t0:.1f}s (not timed)", flush=True)
        shutil.rmtree(work / "warm", ignore_errors=True)

        job = load_job(job_dict(work / "urls.parquet", out, per_shard, args))
        with Sampler(out, args.every, [sp.pid for sp in servers]) as sampler:
            t_start = time.time()
            man = run_job(job, progress_every=60)
        ray.shutdown()
        result = report(args, n, per_shard, man, sampler.samples, segments(out, t_start), account(out, n, kinds))
    finally:
        for s in servers:
            s.terminate()
        if args.keep:
            print(f"output kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    path = ROOT / "bench" / "results" / f"soak-{n}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nresults: {path}")
    ok = result["lost"] == 0 and result["duplicated"] == 0 and not result["not_as_planted"]
    return 0 if ok and result["rss"]["driver_rss"]["flat"] and result["rss"]["workers_rss"]["flat"] else 1


def report(args, n, per_shard, man, samples, segs, acc) -> dict:
    rows_s = man["timing"]["rows_seconds"]
    end_rows = max((s["t"] for s in samples if s["shards_done"] >= max(x["shards_done"] for x in samples)), default=0)
    window = [s for s in samples if s["t"] <= end_rows] or samples
    rss = {k: flatness(window, k) for k in ("driver_rss", "driver_anon", "workers_rss", "workers_anon")}
    rates = [s["rows_per_s"] for s in segs]
    print(
        f"\n{n} rows ({per_shard} a shard), {args.cpus} CPUs, 1 CPU x {args.threads} threads a task, "
        f"timeout {args.timeout}s / deadline {args.deadline}s, retries 0"
    )
    print(f"per-row pass: {rows_s:.1f}s = {n / rows_s:.1f} rows/s; whole job {man['timing']['wall_seconds']:.1f}s")
    sp = _spread(rates)
    print(
        f"rows/s per segment (one run after an untimed warm-up; {len(segs)} segments of equal rows, the segments are "
        f"the repeats): median {sp['median']:.1f}, min {sp['min']:.1f}, max {sp['max']:.1f}"
    )
    print("  " + " ".join(f"{r:.0f}" for r in rates))
    print(f"\nRSS over the per-row pass ({len(window)} samples every {args.every}s): first 10% -> last 10% mean")
    for k, f in rss.items():
        print(f"  {k:14} {f['first_mib']:8.1f} -> {f['last_mib']:8.1f} MiB  x{f['ratio']:.3f}  {'flat' if f['flat'] else 'NOT FLAT'}")  # fmt: skip
    workers = Counter(s["workers"] for s in window)
    print(f"  Ray worker processes per sample: {dict(sorted(workers.items()))}")
    cpu = statistics.fmean(s["cpu_percent"] for s in window[1:]) if len(window) > 1 else float("nan")
    used = {k: window[-1]["cpu"][k] - window[0]["cpu"][k] for k in window[0]["cpu"]}
    print(
        f"  machine CPU busy over the pass: {cpu:.0f}%; CPU ms a row: "
        + ", ".join(f"{k} {1000 * v / n:.1f}" for k, v in used.items())
        + " (workers: only those alive at both ends)"
    )
    print(f"\nlost rows: {acc['lost']}   duplicated rows: {acc['duplicated']}")
    print(f"\n{'stage':14} {'reason':18} {'planted':>8} {'observed':>9}")
    for r in acc["reasons"]:
        print(f"{r['stage']:14} {r['reason']:18} {r['planted']:8d} {r['observed']:9d}")
    print(
        f"rows whose reason is not the planted one: {sum(acc['not_as_planted'].values())} {acc['not_as_planted'] or ''}"
    )
    return {
        "n": n,
        "settings": vars(args) | {"samples_per_shard": per_shard},
        "rows_seconds": rows_s,
        "rows_per_s": n / rows_s,
        "wall_seconds": man["timing"]["wall_seconds"],
        "segments": segs,
        "segment_rows_per_s": sp,
        "rss": rss,
        "samples": samples,
        "manifest_counts": man["counts"],
        "download_dropped": man["stages"][0]["dropped"],
        **acc,
    }


if __name__ == "__main__":
    raise SystemExit(main())
