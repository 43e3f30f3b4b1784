"""Benchmark of the confounders stage's nearest-neighbour search (k-means
cells, a calibrated margin, exact search inside a cell) against brute
force, recall and time measured in the same run.

    python bench/confounders.py --quick                    # 20k rows, CPU, a few minutes on 2 cores
    python bench/confounders.py --quick --device cuda      # 200k rows, one GPU, under a minute
    python bench/confounders.py --n 300000                 # CPU (numpy, float32 products)
    python bench/confounders.py --n 1000000 --device cuda  # one GPU (torch, float16 then float32)
    python bench/confounders.py --n 100000 --data blobs --json out.json

Both searches of the stage run, with its bounds: ``swap_image`` (nearest
image whose caption's similarity is below ``--max-text-similarity``) and
``swap_text`` (nearest caption below ``--max-text-similarity`` whose
image's similarity is below ``--max-image-similarity``). The bounds are
set where they reject a share of the nearest rows of this data, as the
stage's 0.85 does for real CLIP models.

Data (``--data``): ``cliplike`` (default, ``bench/cliplike.py``: a cone,
topics, groups cut by cells, a 24-d local structure; why it looks like CLIP
is said there), ``blobs`` (the first generator of this benchmark: a
neighbour at cosine 0.3, its whole cluster at 0.2; a stress case) or
``isotropic`` (no structure: the worst case of any cell search).

* brute force: :func:`stages.common.knn.best_partners` over all ``n`` rows
  for ``--queries`` sampled rows (every row with ``--queries 0``); its cost
  is linear in the queries (each one scans all rows), so the time for all
  rows is the measured time times ``n / queries``; its answers are the
  truth recall@1 is measured on.
* cells: what the stage does, in one process: ``learn`` (spherical k-means
  on 256 sampled rows a cell, ``n / rows_per_cell`` cells; the margin a row
  joins cells within, calibrated on the ``--fit-sample`` sample to
  ``--target-recall``), then each row into its cells and the exact search
  in each cell for every row (``bucket_rows`` / ``reduce_bucket``).

Each method runs once to warm up, then ``--passes`` timed passes: the
median and the spread (min-max) are printed. recall@1: a query's partner
is as similar as brute force's within 1e-6 (both scored in float64, so
exact ties count as found), or neither has one. Figures taken on a
shared machine are provisional.
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

from bench import cliplike
from pairforge.stages.common import knn

KMEANS_ROWS_PER_CELL, KMEANS_MIN_ROWS_PER_CELL = 256, 40  # as stages/confounders.py


def make_data(args) -> tuple[np.ndarray, np.ndarray]:
    """Unit float32 image and text rows (stored as float16 first, like the stage's columns)."""
    if args.data == "cliplike":
        img, txt, _ = cliplike.pairs(args.n, args.dim, args.seed)
    elif args.data == "blobs":
        img, txt = cliplike.blobs(args.n, args.dim, args.seed), cliplike.blobs(args.n, args.dim, args.seed + 1)
    else:
        rng = np.random.default_rng(args.seed)
        img, txt = (rng.standard_normal((args.n, args.dim), dtype=np.float32).astype(np.float16) for _ in range(2))
    return knn.unit_rows(img)[0], knn.unit_rows(txt)[0]


def searches(img, txt, args) -> dict:
    """kind -> (primary, secondary, bound on the secondary, bound on the primary)."""
    return {
        "swap_image": (img, txt, args.max_text_similarity, np.inf),
        "swap_text": (txt, img, args.max_image_similarity, args.max_text_similarity),
    }


def cells_search(p, s, bound, top, args, seed: int):
    """The stage's learn and search over all rows; returns (partner, similarity, figures)."""
    n = len(p)
    t0 = time.perf_counter()
    perm = np.random.default_rng(seed).permutation(n)  # the stage: the smallest key hashes
    sample = np.sort(perm[: args.fit_sample])
    k = min(knn.auto_cells(n, args.rows_per_cell), -(-len(sample) // KMEANS_MIN_ROWS_PER_CELL))
    fit = np.sort(perm[: k * KMEANS_ROWS_PER_CELL])  # a random part of the sample (rows come grouped)
    centroids = knn.spherical_kmeans(p[fit], k, args.kmeans_iters, seed, args.device)
    margin, cal = np.inf, None
    if args.target_recall > 0:
        cal = knn.calibrate(
            p[sample], centroids, args.probes, args.target_recall, args.query_probes, s[sample], bound,
            max_primary=top, device=args.device, queries=args.calibration_queries, seed=seed,
        )  # fmt: skip
        margin = cal.margin
    t1 = time.perf_counter()
    stats: dict = {}
    best, sim, _ = knn.ivf_search(
        p, centroids, args.probes, s, bound, device=args.device, query_probes=args.query_probes, margin=margin,
        max_primary=top, stats=stats,
    )  # fmt: skip
    t2 = time.perf_counter()
    figures = {
        "cells": k,
        "learn_s": t1 - t0,
        "search_s": t2 - t1,
        "margin": margin,
        "sample_recall": cal.recall if cal else None,
        "cells_per_row": stats["cells_per_row"],
        "pairs_per_brute_pair": stats["pairs"] / (n * n),
    }
    return best, sim, figures


def timed(fn, passes: int) -> tuple[list[float], object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(passes):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def spread(times: list[float], scale: float = 1.0) -> dict:
    return {"median": statistics.median(times) * scale, "min": min(times) * scale, "max": max(times) * scale}


def recall_at_1(truth, truth_sim, best, sim) -> float:
    has = truth >= 0
    ok = np.where(has, (best >= 0) & (np.nan_to_num(sim, nan=-np.inf) >= truth_sim - 1e-6), best < 0)
    return float(np.mean(ok))


def run_kind(kind: str, p, s, bound, top, queries, args, seed: int) -> dict:
    n = len(p)
    brute_t, (truth, truth_sim, _) = timed(
        lambda: knn.best_partners(p, queries, s, bound, device=args.device, max_primary=top), args.passes
    )
    scale = n / len(queries)
    print(f"[bench] {kind} brute force, {len(queries)} queries: {[round(t, 2) for t in brute_t]} s", flush=True)
    figures: list[dict] = []

    def cells():
        best, sim, fig = cells_search(p, s, bound, top, args, seed)
        figures.append(fig)
        return best, sim

    cell_t, (best, sim) = timed(cells, args.passes)
    print(f"[bench] {kind} cells: {[round(t, 2) for t in cell_t]} s", flush=True)
    fig = figures[-1]
    rec = recall_at_1(truth, truth_sim, best[queries], sim[queries])
    better = int(np.sum((truth >= 0) & (np.nan_to_num(sim[queries], nan=-np.inf) > truth_sim + 1e-9)))
    out = {
        "brute_s": spread(brute_t),
        "brute_all_rows_s": spread(brute_t, scale),
        "cells_s": spread(cell_t),
        "cells_steps_s": {k: statistics.median(f[k] for f in figures[1:]) for k in ("learn_s", "search_s")},
        "speedup": statistics.median(brute_t) * scale / statistics.median(cell_t),
        "recall_at_1": rec,
        "recall_queries": len(queries),
        "better_than_brute": better,  # must be 0: the cells search a subset
        "share_with_partner": float(np.mean(truth >= 0)),
        **{k: fig[k] for k in ("cells", "margin", "sample_recall", "cells_per_row", "pairs_per_brute_pair")},
    }
    b, c = out["brute_all_rows_s"], out["cells_s"]
    print(
        f"{kind:<10} n={n:,} {args.data}: recall@1 {rec:.4f} ({len(queries):,} queries); "
        f"brute {b['median']:.2f} s [{b['min']:.2f}-{b['max']:.2f}]{' (x n/queries)' if scale > 1 else ''}, "
        f"cells {c['median']:.2f} s [{c['min']:.2f}-{c['max']:.2f}] "
        f"(learn {out['cells_steps_s']['learn_s']:.2f} s); brute/cells x{out['speedup']:.1f}; "
        f"{fig['cells']} cells, {fig['cells_per_row']:.2f} a row (margin {fig['margin']:.4f}, at most {args.probes}), "
        f"pairs {fig['pairs_per_brute_pair']:.4f} of brute's, sample recall {fig['sample_recall'] or float('nan'):.3f}",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="rows (default 100,000; --quick: 20,000, cuda 200,000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--data", choices=("cliplike", "blobs", "isotropic"), default="cliplike")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="20,000 rows, 2,000 queries: a smoke run")
    p.add_argument(
        "--queries", type=int, default=None, help="brute-force queries (0: all rows; default 2,048, cuda 262,144)"
    )
    p.add_argument("--rows-per-cell", type=int, default=None, help="default 2,000 (cpu), 20,000 (cuda)")
    p.add_argument("--probes", type=int, default=16, help="the most cells a row joins")
    p.add_argument(
        "--target-recall", type=float, default=0.98, help="calibrated on the sample; 0: every row joins --probes cells"
    )
    p.add_argument("--query-probes", type=int, default=1)
    p.add_argument("--fit-sample", type=int, default=100_000)
    p.add_argument("--calibration-queries", type=int, default=2000)
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--max-text-similarity", type=float, default=0.75)
    p.add_argument("--max-image-similarity", type=float, default=0.75)
    p.add_argument("--kinds", default="swap_image,swap_text")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    args.n = args.n or ((200_000 if args.device == "cuda" else 20_000) if args.quick else 100_000)
    if args.queries is None:
        args.queries = 2000 if args.quick else (1 << 18 if args.device == "cuda" else 2048)
    args.rows_per_cell = args.rows_per_cell or (20_000 if args.device == "cuda" else 2000)

    t = time.perf_counter()
    img, txt = make_data(args)
    gen_s = time.perf_counter() - t
    print(
        f"[bench] {args.n:,} x {args.dim} float16 {args.data} rows in {gen_s:.1f} s, device {args.device}", flush=True
    )
    q = args.queries if 0 < args.queries < args.n else args.n
    queries = np.sort(np.random.default_rng(args.seed + 7).permutation(args.n)[:q])
    out = {
        "n": args.n, "dim": args.dim, "data": args.data, "device": args.device, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "generate_s": gen_s, "probes": args.probes, "passes": args.passes,
        "target_recall": args.target_recall, "rows_per_cell": args.rows_per_cell, "kinds": {},
    }  # fmt: skip
    if args.device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name()
    for i, (kind, (prim, sec, bound, top)) in enumerate(searches(img, txt, args).items()):
        if kind in args.kinds.split(","):
            out["kinds"][kind] = run_kind(kind, prim, sec, bound, top, queries, args, args.seed + i)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
