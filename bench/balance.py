"""Benchmark of MetaCLIP's curation on this machine: entry matching and the
balance fit.

    python bench/balance.py                                # matching, then the fit at 1M and 10M rows
    python bench/balance.py --fit-sizes 1000000 --repeats 3 --json out.json
    python bench/balance.py --skip-fit                     # matching only (a minute)

**Matching** (``metadata_match``'s matcher over batches of 4,096 captions
as the stage calls it, one process: captions/s per core) with the WordNet entries ``make setup`` installs and with 500,000
synthetic entries (pseudo-words and bigrams of them), in both modes
(substring, word boundaries), against the naive loop over every entry
(MetaCLIP's original ``substr_matching``: ``entry in text`` per entry) on
the same captions; and the automaton's memory (pyahocorasick's own count,
and the process's RSS growth while building it). Captions: 6-16 words,
about a third of them entries, the rest common words. The naive loop is
timed on a slice of the captions (it runs ~10 captions/s at 500k entries).

**The balance fit** (``pipeline.fit.run_fit`` with ``RayLauncher``, local Ray
on every CPU) over synthetic fit files: 10,000 rows a shard, 1-3 entries a
row drawn from a Zipf law over 500,000 entries with the head entry in 30% of
the captions, ``t`` = 20,000 (``--per-shard`` sets the rows a shard: the
driver's state follows the number of shards, not of rows). The fit files are written directly (what the
per-row pass would leave), so the figures are the fit's own: wall time, the
driver's peak RSS (sampled every 50 ms), the largest task argument, rows
kept; then the 10M / 1M ratios (goal: driver RSS flat).

Every figure is the median of ``--repeats`` timed passes after an untimed
warm-up, with min-max; the load average is printed beside it (the machine's
2 cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.scale import PeakRSS
from pairforge.stages.common import metadata as md

COMMON = "a the of in on with and photo image picture my new for at by from to this is best free".split()
#: captions a matcher call gets: the stage's batch size
BATCH = 4096
SYL = "ka ro mi tes lan do ver qui sto ne pa lu zor bi fen gal hu jo wex yt ar el in ob um".split()


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load {a:.1f} {b:.1f} {c:.1f}"


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} [{min(xs):,.0f}-{max(xs):,.0f}]"


def synthetic_entries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        k = rng.integers(2, 5, size=4096)
        words = ["".join(rng.choice(SYL, size=j)) for j in k]
        for i, w in enumerate(words):
            out[w if i % 10 < 7 else f"{w} {words[i - 1]}"] = None
    return list(out)[:n]


def captions(entries: list[str], n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(entries), size=(n, 16))
    common = rng.integers(0, len(COMMON), size=(n, 16))
    is_entry = rng.random((n, 16)) < 0.33
    lens = rng.integers(6, 17, size=n)
    out = []
    for i in range(n):
        words = [entries[pick[i, j]] if is_entry[i, j] else COMMON[common[i, j]] for j in range(lens[i])]
        out.append(" ".join(words).capitalize())
    return out


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """(CPU seconds, wall seconds) of each timed pass after a warm-up. CPU
    time is this process's (one thread): captions per CPU second is the
    throughput of one core, which the shared machine's load barely moves;
    the wall time is printed beside it."""
    fn()  # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return cpu, wall


def bench_matching(name: str, raw: list[str], repeats: int, n_caps: int, n_naive: int) -> dict:
    entries = md.Entries(raw)
    caps = captions(raw, n_caps)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    built = {b: md.Matcher(entries, word_boundaries=b) for b in (False, True)}
    build_s = (time.perf_counter() - t0) / 2
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024 / 2
    res = {
        "entries": len(entries),
        "build_s": build_s,
        "automaton_bytes": built[False].memory(),
        "rss_growth": rss_growth,
    }
    for bounds, m in built.items():
        mode = "word_boundaries" if bounds else "substring"
        cpu, wall = timed(lambda m=m: [m.match_many(caps[i : i + BATCH]) for i in range(0, len(caps), BATCH)], repeats)
        ac, ac_wall = [n_caps / s for s in cpu], [n_caps / s for s in wall]
        sub = caps[:n_naive]
        cpu, wall = timed(lambda b=bounds, sub=sub: [md.match_naive(entries, c, b) for c in sub], repeats)
        naive, naive_wall = [n_naive / s for s in cpu], [n_naive / s for s in wall]
        same = [x.tolist() for x in m.match_many(sub)] == [md.match_naive(entries, c, bounds) for c in sub]
        hits = sum(len(x) for x in m.match_many(caps[:2000])) / 2000
        res[mode] = {
            "captions_per_cpu_s": ac,
            "captions_per_wall_s": ac_wall,
            "naive_captions_per_cpu_s": naive,
            "naive_captions_per_wall_s": naive_wall,
            "identical": same,
            "matches_per_caption": hits,
        }
        ratio = statistics.median(ac) / statistics.median(naive)
        print(
            f"{name:>9} {len(entries):>7,} entries, {mode:<15}: automaton {spread(ac)} captions/s a core "
            f"(wall {spread(ac_wall)}), naive loop {spread(naive)} (wall {spread(naive_wall)}) -> {ratio:,.0f}x; "
            f"{hits:.1f} matches a caption; identical on {n_naive} captions: {same}; {load()}",
            flush=True,
        )
    print(
        f"{name:>9} automaton: built in {build_s:.2f} s, {res['automaton_bytes'] / 2**20:,.0f} MiB "
        f"(pyahocorasick), RSS growth {rss_growth / 2**20:,.0f} MiB",
        flush=True,
    )
    return res


# ------------------------------------------------------------------ the fit


def write_fit_files(out: Path, n: int, per_shard: int, n_entries: int) -> list[int]:
    """The fit files of ``n`` synthetic rows, as the per-row pass leaves them
    (``key``, ``status``, ``stage``, ``url``, ``caption`` and the entry ids as
    ``list<int32>``), built as Arrow columns directly: writing 10M rows must
    not take longer than fitting them."""
    from pairforge.manifests import layout

    rest = 1.0 / np.arange(2, n_entries + 1)
    cdf = np.cumsum(np.concatenate([[0.3], 0.7 * rest / rest.sum()]))
    rng = np.random.default_rng(0)
    w = len(str(per_shard - 1))
    shard_ids = list(range(-(-n // per_shard)))
    for sid in shard_ids:
        m = min(per_shard, n - sid * per_shard)
        draws = np.sort(np.minimum(np.searchsorted(cdf, rng.random((m, 3))), n_entries - 1), axis=1)
        k = rng.integers(1, 4, size=m)
        keep = np.arange(3)[None, :] < k[:, None]  # the first k draws of a row
        keep[:, 1:] &= draws[:, 1:] != draws[:, :-1]  # each entry once (the draws are sorted)
        values = draws[keep].astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
        first = sid * per_shard
        table = pa.table(
            {
                "key": [f"{sid:05d}{i:0{w}d}" for i in range(m)],
                "status": pa.array(["ok"] * m),
                "stage": pa.array([""] * m),
                "reason": pa.array([""] * m),
                "url": [f"http://img.invalid/{first + i}.jpg" for i in range(m)],
                "caption": [f"a synthetic photo number {first + i} of something" for i in range(m)],
                "metadata_entries": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            }
        )
        folder = layout.rows_dir(out, sid)
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "part.fit.parquet")
        layout.atomic_write_bytes(layout.rows_done(out, sid), json.dumps({"rows": m, "parts": ["part"]}).encode())
    return shard_ids


def bench_fit(sizes: list[int], repeats: int, work: Path, t: int, n_entries: int, per_shard: int) -> dict:
    from pairforge.pipeline import plan
    from pairforge.pipeline.engine import RunSpec
    from pairforge.pipeline.fit import run_fit
    from pairforge.pipeline.raystart import init_local
    from pairforge.stages.balance import BalanceStage
    from pairforge.stages.balance import Config as BalanceConfig
    from pairforge.stages.metadata_match import Config as MatchConfig
    from pairforge.stages.metadata_match import MetadataMatchStage
    from pairforge.stages.shard import ShardStage

    init_local(num_cpus=os.cpu_count(), log_to_driver=False)
    import ray

    results = {}
    try:
        for n in [20_000, *sizes]:  # the first: an untimed warm-up of Ray and the code
            out = work / f"fit_{n}"
            entries = work / "entries.txt"
            entries.write_text("x\n")  # metadata_match only declares the column here; it never runs
            stages = (MetadataMatchStage(MatchConfig(entries=str(entries))), BalanceStage(BalanceConfig(t=t)))
            spec = RunSpec(str(out), stages, ShardStage(ShardStage.Config()), per_shard)
            t0 = time.perf_counter()
            shard_ids = write_fit_files(out, n, per_shard, n_entries)
            write_s = time.perf_counter() - t0
            runs = []
            for _ in range(1 if n == 20_000 else repeats):
                plan.ARG_BYTES["max"] = 0
                stage = BalanceStage(BalanceConfig(t=t))
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    info = run_fit(plan.RayLauncher(), spec, stage, shard_ids, n)
                    wall = time.perf_counter() - t0
                runs.append(
                    {
                        "wall_s": wall,
                        "driver_peak_rss": rss.peak,
                        "driver_peak_private": rss.peak_private,
                        "max_task_arg": plan.ARG_BYTES["max"],
                        "kept": info["counters"]["kept"],
                        "entries_over_t": info["counters"]["entries_over_t"],
                        "steps": info["steps"],
                        "load": load(),
                    }
                )
            shutil.rmtree(out, ignore_errors=True)
            if n == 20_000:
                continue
            results[n] = runs
            walls = [r["wall_s"] for r in runs]
            rsss = [r["driver_peak_rss"] / 2**20 for r in runs]
            priv = [r["driver_peak_private"] / 2**20 for r in runs]
            r0 = runs[0]
            print(
                f"fit {n:>11,} rows ({len(shard_ids)} shards, fit files written in {write_s:.0f} s): "
                f"wall {statistics.median(walls):.1f} s [{min(walls):.1f}-{max(walls):.1f}], "
                f"driver peak RSS {spread(rsss)} MiB (private {spread(priv)} MiB), "
                f"largest task argument {max(r['max_task_arg'] for r in runs):,} B; kept {r0['kept']:,} "
                f"({r0['entries_over_t']} entries over t); steps {r0['steps']}; {load()}",
                flush=True,
            )
        if len(results) >= 2:
            a, b = (results[s] for s in sorted(results)[-2:])
            med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
            print(
                f"{sorted(results)[-1]:,} / {sorted(results)[-2]:,} rows: wall {med(b, 'wall_s') / med(a, 'wall_s'):.2f}x, "
                f"driver peak RSS {med(b, 'driver_peak_rss') / med(a, 'driver_peak_rss'):.2f}x "
                f"(private {med(b, 'driver_peak_private') / med(a, 'driver_peak_private'):.2f}x; goal: flat)"
            )
    finally:
        ray.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--captions", type=int, default=20_000, help="captions per automaton pass")
    ap.add_argument("--naive-captions", type=int, default=20, help="captions per naive-loop pass (it is slow)")
    ap.add_argument("--synthetic-entries", type=int, default=500_000)
    ap.add_argument("--fit-sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--t", type=int, default=20_000)
    ap.add_argument("--per-shard", type=int, default=10_000, help="rows of one fit shard")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--skip-match", action="store_true", help="the fit only")
    ap.add_argument("--work", default=None, help="scratch folder for fit files (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"# bench/balance.py: {os.cpu_count()} CPUs, {load()}", flush=True)
    res: dict = {"matching": {}}
    wn = md.wordnet_path()
    if args.skip_match:
        pass
    elif wn.is_file():
        raw = md.parse_entries(wn.read_bytes(), wn.name)
        res["matching"]["wordnet"] = bench_matching("wordnet", raw, args.repeats, args.captions, 200)
    else:
        print(f"# no WordNet entries at {wn} (make setup): skipped", flush=True)
    if not args.skip_match:
        raw = synthetic_entries(args.synthetic_entries)
        res["matching"]["synthetic"] = bench_matching(
            "synthetic", raw, args.repeats, args.captions, args.naive_captions
        )
        del raw
    if not args.skip_fit and args.fit_sizes:
        work = Path(args.work or tempfile.mkdtemp(prefix="pf-balance-"))
        try:
            res["fit"] = bench_fit(args.fit_sizes, args.repeats, work, args.t, args.synthetic_entries, args.per_shard)
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
