"""How the global stages scale: synthetic rows (``bench/scalekit.py``: 2 KB
images, 10% exact, 5% URL and 5% near copies, 64-d embeddings) through
``dedup_exact`` + ``dedup_phash`` + ``dedup_semantic`` + ``shard`` on local
Ray, at several sizes in one run.

Per size it prints the wall time, the driver's peak RSS (sampled), bytes the
object store spilled, the largest task argument pairforge submitted, the
image bytes, and rows per second; then what grows, step by step: the peak
memory of the largest task of each step (``pipeline.taskmem``: the worker's
peak RSS, and its growth above the task's start) and the largest argument of
each step (an argument shared through the object store counts). Then the
ratios issue 30 sets goals on (from the second-largest size to the largest:
wall <= 3.2x for 3x the rows, driver private and peak RSS <= 1.1x, the
largest task argument and the largest task's peak <= 1.2x, 0 bytes
spilled). A small untimed warm-up run goes first; with ``--repeats R`` each
size runs R times and the median is reported with the spread. The URL lists
are written by a child process, so the driver's memory is the run's alone.

    python bench/scale.py                          # 300k, 1M, 3M (about 20 min on 2 cores)
    python bench/scale.py --sizes 20000 100000     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pairforge.pipeline import taskmem  # noqa: E402
from pairforge.pipeline.config import load_job  # noqa: E402
from pairforge.pipeline.job import run_job  # noqa: E402

SAMPLES_PER_SHARD = 10_000


def _rss() -> tuple[int, int]:
    """(resident, of it private) bytes of this process. The resident figure
    also counts object-store pages the driver touched (shared memory)."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got.get("VmRSS", 0), got.get("RssAnon", 0)


class PeakRSS:
    """Samples this process's RSS every 50 ms while in the ``with`` block."""

    def __enter__(self):
        self.peak, self.peak_private = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.05):
            rss, anon = _rss()
            self.peak, self.peak_private = max(self.peak, rss), max(self.peak_private, anon)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class SpillMeter:
    """Bytes the object store spilled to its folder: every file seen there,
    at its largest (Ray deletes spilled files once their objects are freed,
    so the folder is sampled every 50 ms)."""

    def __init__(self, folder: Path):
        self.folder, self.seen = folder, {}
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self._stop.wait(0.05):
            for root, _, files in os.walk(self.folder):
                for f in files:
                    p = os.path.join(root, f)
                    try:
                        self.seen[p] = max(self.seen.get(p, 0), os.path.getsize(p))
                    except OSError:
                        pass

    def total(self) -> int:
        return sum(self.seen.values())


def job_dict(urls: str, out: str, n: int) -> dict:
    return {
        "input": {"paths": [urls]},
        "output": {"dir": out, "samples_per_shard": SAMPLES_PER_SHARD},
        "stages": [
            {"name": "bench.scalekit:SyntheticRows", "rows": n, "samples_per_shard": SAMPLES_PER_SHARD},
            {"name": "dedup_exact"},
            {"name": "dedup_phash", "hash_column": "synthetic_phash"},
            # SemDeDup's cluster count grows with N (~50k clusters for 440M rows): here ~2,000 rows a cluster
            {"name": "dedup_semantic", "eps": 0.002, "n_clusters": max(8, n // 2000), "kmeans_iters": 10},
            "shard",
        ],
    }


def run_size(n: int, work: Path, spill: SpillMeter) -> dict:
    from pairforge.pipeline import plan

    urls = work / f"urls_{n}.parquet"
    if not urls.exists():  # in a child: a URL list's strings would stay in this driver's heap
        code = f"from bench.scalekit import write_urls; write_urls({str(urls)!r}, {n})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))
    out = work / f"out_{n}"
    shutil.rmtree(out, ignore_errors=True)
    plan.ARG_BYTES.update(max=0, steps={})
    spill0 = spill.total()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        man = run_job(load_job(job_dict(str(urls), str(out), n)))
        wall = time.perf_counter() - t0
    image_bytes = n * 2048
    res = {
        "rows": n,
        "wall_s": wall,
        "rows_s": man["timing"]["rows_seconds"],
        "driver_peak_rss": rss.peak,
        "driver_peak_private": rss.peak_private,
        "spilled": spill.total() - spill0,
        "max_task_arg": plan.ARG_BYTES["max"],
        "image_bytes": image_bytes,
        "kept": man["counts"]["ok"],
        "dropped": {s["name"]: sum(s["dropped"].values()) for s in man["stages"] if s["dropped"]},
        "fit_s": {f["stage"]: f["steps"] for f in man["fits"]},
        "components": {f["stage"]: f["components"] for f in man["fits"] if f.get("components")},
        "task_memory": taskmem.largest(out),
        "step_args": dict(plan.ARG_BYTES["steps"]),
    }
    shutil.rmtree(out, ignore_errors=True)
    return res


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def _print_steps(r: dict) -> None:
    """Per step: the largest task's peak RSS and its growth above the task's
    start, the tasks that ran, and the step's largest argument."""
    mem, args = r["task_memory"], r["step_args"]
    for step in sorted(set(mem) | set(args)):
        m = mem.get(step)
        task = f"largest task peak {_mb(m['peak'])} (+{_mb(m['growth'])}) of {m['tasks']} tasks" if m else "-"
        print(f"    {step:<32} {task:<44} largest argument {args.get(step, 0):>10,} B")


def _largest_task(r: dict) -> tuple[str, int]:
    mem = r["task_memory"]
    step = max(mem, key=lambda s: mem[s]["peak"]) if mem else ""
    return step, mem[step]["peak"] if mem else 0


def _print_ratios(a: dict, b: dict) -> None:
    """From the second-largest size ``a`` to the largest ``b``: issue 30's goals."""

    def x(key, goal):
        va, vb = a[key], b[key]
        ratio = vb / va if va else float("inf")
        return f"{key} {ratio:.2f}x (goal <= {goal}x{', met' if ratio <= goal else ', NOT met'})"

    step_a, peak_a = _largest_task(a)
    step_b, peak_b = _largest_task(b)
    task = peak_b / peak_a if peak_a else float("inf")
    print(f"{b['rows']:,} / {a['rows']:,} rows ({b['rows'] / a['rows']:.1f}x):")
    print(f"    {x('wall_s', 3.2)}; {x('driver_peak_private', 1.1)}; {x('driver_peak_rss', 1.1)}")
    print(f"    {x('max_task_arg', 1.2)}; spilled {_mb(b['spilled'])} (goal 0)")
    print(
        f"    largest task peak {_mb(peak_a)} ({step_a}) -> {_mb(peak_b)} ({step_b}): {task:.2f}x "
        f"(goal <= 1.2x{', met' if task <= 1.2 else ', NOT met'})"
    )
    for step in sorted(set(a["task_memory"]) & set(b["task_memory"])):
        ga, gb = a["task_memory"][step]["growth"], b["task_memory"][step]["growth"]
        pa, pb = a["task_memory"][step]["peak"], b["task_memory"][step]["peak"]
        aa, ab = a["step_args"].get(step, 0), b["step_args"].get(step, 0)
        print(
            f"    {step:<32} peak {pb / pa:.2f}x, growth above start {_mb(ga)} -> {_mb(gb)}"
            + (f", argument {ab / aa:.2f}x" if aa else "")
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[300_000, 1_000_000, 3_000_000])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20_000, help="rows of the untimed warm-up run (0: none)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = ap.parse_args()

    from pairforge.pipeline.raystart import init_local

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ[taskmem.ENV] = "1"  # before Ray starts: its workers inherit it
    work = Path(args.work or tempfile.mkdtemp(prefix="pf-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    spill_dir = work / "spill"
    spill_dir.mkdir(exist_ok=True)
    cfg = {"type": "filesystem", "params": {"directory_path": str(spill_dir)}}
    init_local(num_cpus=os.cpu_count(), log_to_driver=False, _system_config={"object_spilling_config": json.dumps(cfg)})
    import ray

    spill = SpillMeter(spill_dir)
    print(
        f"# bench/scale.py: {os.cpu_count()} CPUs, object store {_mb(ray.cluster_resources()['object_store_memory'])}"
    )
    try:
        if args.warmup:
            run_size(args.warmup, work, spill)
        results = {}
        for n in args.sizes:
            runs = [run_size(n, work, spill) for _ in range(args.repeats)]
            walls = [r["wall_s"] for r in runs]
            best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run
            results[n] = best
            spread = f" (min {min(walls):.1f}, max {max(walls):.1f}, {len(walls)} runs)" if len(walls) > 1 else ""
            print(
                f"{n:>10,} rows: wall {best['wall_s']:7.1f} s{spread}, per-row pass {best['rows_s']:.1f} s, "
                f"{n / best['wall_s']:,.0f} rows/s; driver peak RSS {_mb(best['driver_peak_rss'])} "
                f"(private {_mb(best['driver_peak_private'])}); "
                f"spilled {_mb(best['spilled'])} of {_mb(best['image_bytes'])} image bytes; "
                f"largest task argument {best['max_task_arg']:,} B; kept {best['kept']:,}; dropped {best['dropped']}; "
                f"fit seconds {best['fit_s']}; components {best['components']}",
                flush=True,
            )
            _print_steps(best)
        sizes = sorted(results)
        if len(sizes) >= 2:
            _print_ratios(results[sizes[-2]], results[sizes[-1]])
        print("# results " + json.dumps({str(n): r for n, r in results.items()}, sort_keys=True), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
