"""How fast do opt-out and takedown lists load and match, against the
obvious implementation measured in the same run?

    python bench/blocklist.py                    # 1M-entry lists (about 3 min on 2 cores)
    python bench/blocklist.py --entries 100000   # smaller

Three workloads, each ours against a baseline:

* ``load``: a text list of ``--entries`` URLs (6 per host) read into the
  index (``Blocklists.load``: the lines normalised as Arrow columns), against
  a Python loop over the lines (``blocklist_norm.parse_entry``, the scalar
  normal form) into a ``set``.
* ``match``: ``--queries`` row URLs (one in ten listed) against that list
  with ``match_urls`` (one batch: normal forms as columns, one sorted-key
  lookup per kind the list holds, every hit confirmed and described by a
  ``Match``), against a Python ``set`` of the normal forms queried one URL
  at a time with the scalar normal form (exact URLs, a bool per row: less
  work than ours, in several times the memory: the ``memory`` line).
* ``phash``: ``--phash-queries`` hashes (a quarter within 8 bits of an
  entry) against ``--entries`` random pHash entries at ``max_distance``
  ``--distance``, multi-index hashing (``common.mih``) against
  ``common.dedup.HammingIndex`` (``d + 1`` bands, radius 0: the pigeonhole
  ``dedup_phash`` uses), which must give the same answers.

Method: each workload runs once untimed (warm-up), then ``--passes`` timed
passes, ours and the baseline alternating; the table shows the median rate
with min-max and the ratio of the medians, and the load average before and
after (the machine is shared: a high load makes every number slower).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pairforge.stages.common import blocklist as bl  # noqa: E402
from pairforge.stages.common.blocklist_norm import normalize_url, parse_entry  # noqa: E402
from pairforge.stages.common.dedup import HammingIndex  # noqa: E402
from pairforge.stages.common.mih import PhashIndex  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _row(name: str, n: int, ours: list[float], base: list[float], unit: str) -> str:
    r = [n / t for t in ours]
    b = [n / t for t in base]
    mo, mb = statistics.median(r), statistics.median(b)
    return (
        f"{name:<7} {mo:>12,.0f} [{min(r):,.0f}-{max(r):,.0f}]  {mb:>12,.0f} [{min(b):,.0f}-{max(b):,.0f}]  "
        f"{mo / mb:6.1f}x  {unit}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--phash-queries", type=int, default=2_000)
    ap.add_argument("--distance", type=int, default=8)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        urls = [f"https://cdn{i // 6}.site{i % 97}.example/img/{i:09d}.jpg" for i in range(args.entries)]
        path = os.path.join(tmp, "optouts.txt")
        Path(path).write_text("\n".join(urls) + "\n")

        def ours_load():
            bl._cached_build.cache_clear()
            bl.Blocklists([path]).load()

        def base_load():
            with open(path) as f:
                return {parse_entry(line)[1] for line in f if line.strip()}

        queries = [
            rng.choice(urls) if i % 10 == 0 else f"https://other{i}.example/p/{i}.jpg" for i in range(args.queries)
        ]
        lists = bl.Blocklists([path]).load()
        exact = base_load()

        def ours_match():
            return lists.match_urls(queries)

        def base_match():
            return [normalize_url(u) in exact for u in queries]

        assert [m is not None for m in ours_match()] == base_match()

        nprng = np.random.default_rng(0)
        hashes = nprng.integers(0, 2**63, args.entries, dtype=np.uint64) * np.uint64(2)
        q = []
        for i in range(args.phash_queries):
            h = int(hashes[nprng.integers(args.entries)])
            for b in nprng.choice(64, int(nprng.integers(0, args.distance + 1)), replace=False):
                h ^= 1 << int(b)
            q.append(h if i % 4 == 0 else int(nprng.integers(0, 2**63)) * 2)
        q = np.array(q, dtype=np.uint64)
        lines = list(range(1, args.entries + 1))
        mih = PhashIndex(hashes, lines, [""] * args.entries, args.distance)
        pigeon = HammingIndex(hashes, np.array([f"{n:012d}" for n in lines]), args.distance)
        assert np.array_equal(mih.nearest(q)[1], pigeon.nearest(q)[1])  # the same distances

        work = {
            "load": (ours_load, base_load, args.entries, "entries/s"),
            "match": (ours_match, base_match, args.queries, "URLs/s"),
            "phash": (lambda: mih.nearest(q), lambda: pigeon.nearest(q), args.phash_queries, "queries/s"),
        }
        times: dict = {k: ([], []) for k in work}
        for o, b, _, _ in work.values():  # warm-up
            o(), b()
        for p in range(args.passes):
            for k, (o, b, _, _) in work.items():
                first, second = (o, b) if p % 2 == 0 else (b, o)
                t1, t2 = _timed(first), _timed(second)
                times[k][0].append(t1 if p % 2 == 0 else t2)
                times[k][1].append(t2 if p % 2 == 0 else t1)
    print(
        f"bench/blocklist.py: {args.entries:,} entries, {args.queries:,} URL queries, {args.phash_queries:,} pHash "
        f"queries at d={args.distance} (MIH: {mih.bands} bands, radius {mih.radius}); {args.passes} passes, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f}, after {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}"
    )
    print(f"{'':<7} {'ours (median [min-max])':>34}  {'baseline':>30}  ratio")
    for k, (_, _, n, unit) in work.items():
        print(_row(k, n, *times[k], unit))
    idx = lists._index.strings["url"]
    ours_mb = (idx.keys.nbytes + idx.lists.nbytes + idx.lines.nbytes + idx.values.nbytes) / 2**20
    base_mb = (sys.getsizeof(exact) + sum(sys.getsizeof(u) for u in exact)) / 2**20
    print(f"memory  {ours_mb:>12,.0f} MiB index{'':>17}{base_mb:>10,.0f} MiB set  {base_mb / ours_mb:6.1f}x less")
    return 0


if __name__ == "__main__":
    sys.exit(main())
