"""Benchmark of the confounders stage's nearest-neighbour search against
brute force, in the same run.

    python bench/confounders.py --n 30000                 # CPU (numpy)
    python bench/confounders.py --n 1000000 --device cuda # one GPU (torch, float16 products)
    python bench/confounders.py --n 30000 --data isotropic --json out.json

Data: ``n`` random 512-d embeddings stored as float16. ``clustered`` (the
default): rows around ``n / 500`` random centres with noise of twice a
centre's spread per dimension, like real CLIP embeddings, which cluster by
topic; ``isotropic``: plain Gaussian rows, the worst case for any
cell-based search (a neighbour is barely closer than any other row).

* brute force: :func:`stages.common.knn.best_partners` over all rows at once
  (blocked products, every pair), the exact answer;
* cells: what the stage does over a fit's buckets, here in one process:
  spherical k-means on 256 sampled rows a cell (``learn``), each row into its
  ``probes`` nearest of ``n / rows_per_cell`` cells (``bucket_rows``), and
  the exact search inside each cell for the rows whose nearest cell it is
  (``reduce_bucket``).

Each method runs once to warm up, then ``--passes`` timed passes: the
median and the spread (min-max) are printed, with the speed-up (brute
median / cells median) and recall@1 (a row's found neighbour is as similar
as the true one, within 1e-6). Figures taken on a shared machine are
provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from stages.common import knn


def embeddings(n: int, dim: int, data: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if data == "isotropic":
        return rng.normal(size=(n, dim)).astype(np.float16)
    centres = rng.normal(size=(max(1, n // 500), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 2.0 * rng.normal(size=(n, dim)).astype(np.float32)
    return x.astype(np.float16)


def cells_search(x: np.ndarray, args) -> tuple[np.ndarray, dict]:
    t0 = time.perf_counter()
    k = knn.auto_cells(len(x), args.rows_per_cell)
    sample = x[np.random.default_rng(1).permutation(len(x))[: min(args.sample, k * 256)]]  # the stage's learn
    centroids = knn.spherical_kmeans(sample, k, args.kmeans_iters, 0, args.device)
    t1 = time.perf_counter()
    _, sim, _ = knn.ivf_search(x, centroids, args.probes, device=args.device)
    t2 = time.perf_counter()
    return sim, {"learn": t1 - t0, "assign_and_search": t2 - t1, "cells": len(centroids)}


def timed(fn, passes: int) -> tuple[list[float], object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(passes):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=30000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--data", choices=("clustered", "isotropic"), default="clustered")
    p.add_argument("--probes", type=int, default=3)
    p.add_argument("--rows-per-cell", type=int, default=2000)
    p.add_argument("--sample", type=int, default=100_000)
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)

    raw = embeddings(args.n, args.dim, args.data)
    x, _ = knn.unit_rows(raw)
    print(f"[bench] {args.n} x {args.dim} float16 {args.data} rows, device {args.device}", flush=True)
    brute_t, (_, brute_sim, _) = timed(lambda: knn.best_partners(x, np.arange(len(x)), device=args.device), args.passes)
    print(f"[bench] brute force: {[round(t, 2) for t in brute_t]} s", flush=True)
    steps = []

    def cells():
        sim, step = cells_search(x, args)
        steps.append(step)
        return sim

    cell_t, cell_sim = timed(cells, args.passes)
    print(f"[bench] cells: {[round(t, 2) for t in cell_t]} s", flush=True)
    recall = float(np.mean(cell_sim >= brute_sim - 1e-6))
    med_b, med_c = statistics.median(brute_t), statistics.median(cell_t)
    out = {
        "n": args.n,
        "dim": args.dim,
        "data": args.data,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "probes": args.probes,
        "cells": steps[-1]["cells"],
        "brute_s": {"median": med_b, "min": min(brute_t), "max": max(brute_t)},
        "cells_s": {"median": med_c, "min": min(cell_t), "max": max(cell_t)},
        "cells_steps_s": {k: statistics.median(s[k] for s in steps[1:]) for k in ("learn", "assign_and_search")},
        "speedup": med_b / med_c,
        "recall_at_1": recall,
    }
    if args.device != "cpu":
        import torch

        out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(
        f"n={args.n} {args.data}: brute {med_b:.2f} s [{min(brute_t):.2f}-{max(brute_t):.2f}], "
        f"cells {med_c:.2f} s [{min(cell_t):.2f}-{max(cell_t):.2f}] ({out['cells']} cells, {args.probes} probes; "
        f"learn {out['cells_steps_s']['learn']:.2f} s), speed-up x{out['speedup']:.1f}, recall@1 {recall:.4f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
