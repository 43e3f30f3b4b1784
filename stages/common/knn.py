"""Nearest neighbours over embeddings, exact inside a block and inverted-file
(IVF) style across a dataset: the search the confounders stage spreads over
a fit's buckets.

* :func:`spherical_kmeans` on a sample gives the cells; :func:`nearest_cells`
  ranks a row's nearest cells (float64, so a row near a border lands on the
  same side in any batch).
* A row *joins* its nearest cell and every other of its ``probes`` nearest
  within ``margin`` of it (:func:`members`), and *looks* for its neighbour
  in its ``query_probes`` nearest cells (default 1: its own) among every
  row that joined them. The neighbour ``x`` of a row ``q`` is found when
  ``x`` joined one of the cells ``q`` looks in. Rows deep inside a cell
  join one, rows at a border several: a margin buys recall where it is
  lost, a fixed count of cells pays for it everywhere.
* :func:`calibrate` sets the margin: on a sample it looks up the exact
  partners of some rows (bounds included) and takes the margin at which a
  target share of them would be found. Why a target and not a fixed count:
  how many neighbours a cell border separates depends on the data (how
  clustered, its intrinsic dimension) and on the cell size, so one count
  of cells either misses neighbours (a first benchmark lost half at 1M
  rows) or searches far more than needed.
* :func:`best_partners` (``stages.common.exact_search``, also exported
  here) is the exact search inside a cell, the float64 answer on any
  device and for any cut of the block.

:func:`ivf_search` runs the whole scheme in memory (tests, the benchmark);
the stage runs the same steps as ``learn``, ``bucket_rows`` and
``reduce_bucket``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pairforge.stages.common.exact_search import _torch_device, best_partners, unit_rows

#: rows per float64 product with the centroids
CELL_CHUNK = 1 << 15
#: k-means assigns its rows in blocks of at most this many similarities (rows x cells), so the
#: learn task's memory does not grow with the cell count; below it, in one product (as before)
KMEANS_BLOCK = 1 << 24
__all__ = [
    "unit_rows",
    "best_partners",
    "spherical_kmeans",
    "nearest_cells",
    "coarse_cells",
    "nearest_cells_two_level",
    "members",
    "ivf_search",
    "calibrate",
]


def spherical_kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """k-means on unit rows by cosine similarity (k-means++ start), fully
    determined by the row order of ``x``, ``seed`` and the device (numpy, or
    torch on a GPU). Returns unit centroids (float32, numpy). Semantic dedup
    and the confounders' cells both use it; on the CPU its arithmetic is the
    one dedup_semantic's own copy had (matrix-vector products in the start),
    so dedup's decisions did not move when the two became one."""
    n = len(x)
    if n == 0:
        raise ValueError("k-means: no valid embeddings to cluster")
    k = max(1, min(k, n))
    tdev = _torch_device(device)
    if tdev is not None:
        import torch

        xp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(tdev)
        sims_to = lambda i: (xp @ xp[i]).cpu().numpy()  # noqa: E731
        assign_of = lambda c: torch.argmax(xp @ torch.from_numpy(c).to(tdev).T, dim=1).cpu().numpy()  # noqa: E731
    else:
        sims_to = lambda i: x @ x[i]  # noqa: E731
        assign_of = lambda c: _argmax_products(x, c)  # noqa: E731
    rng = np.random.default_rng(seed)
    picks = [int(rng.integers(n))]
    dist = np.maximum(0.0, 1.0 - sims_to(picks[0])).astype(np.float64)
    for _ in range(1, k):
        total = float(dist.sum())
        pick = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        picks.append(pick)
        dist = np.minimum(dist, np.maximum(0.0, 1.0 - sims_to(pick)))
    centroids = np.ascontiguousarray(x[picks], dtype=np.float32)
    for _ in range(iters):
        assign = assign_of(centroids)
        order = np.argsort(assign, kind="stable")
        starts = np.flatnonzero(np.r_[True, assign[order][1:] != assign[order][:-1]])
        sums = np.zeros_like(centroids)  # on the CPU, in row order: a GPU's atomic adds would vary
        sums[assign[order][starts]] = np.add.reduceat(np.asarray(x, dtype=np.float32)[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1)
        moved = norms > 0  # an emptied cell keeps its old centroid
        new = centroids.copy()
        new[moved] = sums[moved] / norms[moved, None]
        if np.allclose(new, centroids, atol=1e-6):
            break
        centroids = new
    return centroids


def _argmax_products(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``argmax(x @ c.T, axis=1)``, in blocks of rows when the product would
    hold more than :data:`KMEANS_BLOCK` similarities."""
    rows = max(1, KMEANS_BLOCK // max(1, len(c)))
    if len(x) <= rows:
        return np.argmax(x @ c.T, axis=1)
    return np.concatenate([np.argmax(x[lo : lo + rows] @ c.T, axis=1) for lo in range(0, len(x), rows)])


def coarse_cells(centroids: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """About ``sqrt(k)`` coarse centroids over ``k`` fine ones (spherical
    k-means of the centroids), and the coarse cell of each fine cell: what
    :func:`nearest_cells_two_level` searches through."""
    k = len(centroids)
    coarse = spherical_kmeans(np.asarray(centroids, dtype=np.float32), int(np.ceil(np.sqrt(k))), 20, seed)
    owner, _ = nearest_cells(centroids, coarse, 1)
    return coarse, owner[:, 0]


def nearest_cells_two_level(
    x: np.ndarray, centroids: np.ndarray, coarse: np.ndarray, owner: np.ndarray, probes: int, coarse_probes: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_cells` among the fine cells of each row's
    ``coarse_probes`` nearest coarse cells (:func:`coarse_cells`): about
    ``n x (sqrt(k) + coarse_probes x sqrt(k))`` products instead of
    ``n x k``. Approximate: a row whose nearest cell sits under a coarse
    cell it did not probe gets the best of those it did (recall measured in
    ``tests/stages/test_dedup_semantic.py``); a row and its near copy compute the
    same nearly equal products, so they land together either way. Float64
    products, ties to the smaller id, as :func:`nearest_cells`."""
    n, k = len(x), len(centroids)
    probes = max(1, min(probes, k))
    ids, sims = np.full((n, probes), -1, dtype=np.int64), np.full((n, probes), -np.inf)
    near, _ = nearest_cells(x, coarse, coarse_probes)
    row_of = np.repeat(np.arange(n), near.shape[1])
    by_cell = np.argsort(near.ravel(), kind="stable")
    cell_starts = np.searchsorted(near.ravel()[by_cell], np.arange(len(coarse) + 1))
    fine = np.argsort(owner, kind="stable")
    fine_starts = np.searchsorted(owner[fine], np.arange(len(coarse) + 1))
    c64 = np.asarray(centroids, dtype=np.float64)
    for j in range(len(coarse)):
        rows = row_of[by_cell[cell_starts[j] : cell_starts[j + 1]]]
        cells = fine[fine_starts[j] : fine_starts[j + 1]]
        if not len(rows) or not len(cells):
            continue
        for lo in range(0, len(rows), CELL_CHUNK):
            r = rows[lo : lo + CELL_CHUNK]
            s = np.ascontiguousarray(x[r], dtype=np.float32).astype(np.float64) @ c64[cells].T
            top = _top_columns(s, min(probes, len(cells)))
            all_ids = np.concatenate([ids[r], cells[top]], axis=1)
            all_sims = np.concatenate([sims[r], np.take_along_axis(s, top, axis=1)], axis=1)
            order = np.lexsort((all_ids, -all_sims), axis=1)[:, :probes]
            ids[r], sims[r] = np.take_along_axis(all_ids, order, axis=1), np.take_along_axis(all_sims, order, axis=1)
    short = np.flatnonzero((ids < 0).any(axis=1))  # probed coarse cells that own too few fine ones
    if len(short):
        ids[short], sims[short] = nearest_cells(x[short], centroids, probes)
    return ids, sims


def nearest_cells(
    x: np.ndarray, centroids: np.ndarray, probes: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, probes)`` cell ids per row, nearest first (ties to the smaller
    id), and their similarities, from float64 products (a GPU's too) so that
    a row near a border lands on the same side in any batch."""
    probes = max(1, min(probes, len(centroids)))
    ids, sims = np.zeros((len(x), probes), dtype=np.int64), np.zeros((len(x), probes))
    tdev = _torch_device(device)
    if tdev is not None:
        import torch

        c = torch.from_numpy(centroids.astype(np.float64)).to(tdev)
    for lo in range(0, len(x), CELL_CHUNK):
        xb = np.ascontiguousarray(x[lo : lo + CELL_CHUNK], dtype=np.float32)
        if tdev is None:
            s = xb.astype(np.float64) @ centroids.astype(np.float64).T
            ids[lo : lo + len(xb)] = _top_columns(s, probes)
            sims[lo : lo + len(xb)] = np.take_along_axis(s, ids[lo : lo + len(xb)], axis=1)
            continue
        s = torch.from_numpy(xb).to(tdev).double() @ c.T  # float32 -> float64 is exact: the CPU's numbers
        v, i = torch.sort(-s, dim=1, stable=True)
        ids[lo : lo + len(xb)], sims[lo : lo + len(xb)] = i[:, :probes].cpu().numpy(), -v[:, :probes].cpu().numpy()
    return ids, sims


def _top_columns(s: np.ndarray, k: int) -> np.ndarray:
    """Per row the ``k`` largest columns, best first, ties to the smaller
    column (a stable argsort of ``-s``) without sorting whole rows."""
    if k >= s.shape[1]:
        return np.argsort(-s, axis=1, kind="stable")
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(s, top, axis=1).min(axis=1)
    tied = np.flatnonzero((s >= kth[:, None]).sum(axis=1) > k)  # the k-th value ties a column left out
    top[tied] = np.argsort(-s[tied], axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(s, top, axis=1)
    order = _row_lexsort(top, vals)
    return np.take_along_axis(top, order, axis=1)


def _row_lexsort(cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Per row: the order by value descending, then column ascending."""
    order = np.argsort(cols, axis=1, kind="stable")
    v = np.take_along_axis(vals, order, axis=1)
    return np.take_along_axis(order, np.argsort(-v, axis=1, kind="stable"), axis=1)


def members(sims: np.ndarray, margin: float, query_probes: int = 1) -> np.ndarray:
    """Which of a row's nearest cells (``nearest_cells``' similarities) it
    joins: those within ``margin`` of its nearest, and the ``query_probes``
    nearest it looks in."""
    out = sims >= sims[:, :1] - margin
    out[:, :query_probes] = True
    return out


def ivf_search(
    primary: np.ndarray,
    centroids: np.ndarray,
    probes: int,
    secondary: np.ndarray | None = None,
    bound: float = np.inf,
    group: np.ndarray | None = None,
    device: str = "cpu",
    query_probes: int = 1,
    margin: float = np.inf,
    max_primary: float = np.inf,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`best_partners` for every row among the rows that joined one of
    its ``query_probes`` nearest cells (a row joins those of its ``probes``
    nearest within ``margin`` of its nearest), the best over those cells: the
    stage's scheme, in memory. ``stats`` gets the pairs scored and the cells
    joined per row."""
    n = len(primary)
    cells, sims = nearest_cells(primary, centroids, max(probes, query_probes), device)
    joined = members(sims[:, :probes], margin, query_probes)
    best = np.full(n, -1, dtype=np.int64)
    sim_p, sim_s = np.full(n, -np.inf), np.full(n, np.nan)
    group = np.arange(n) if group is None else np.asarray(group, dtype=np.int64)
    member_rows = np.repeat(np.arange(n), joined.sum(axis=1))
    member_cells = cells[:, :probes][joined]
    order = np.argsort(member_cells, kind="stable")
    member_rows, member_cells = member_rows[order], member_cells[order]
    bounds = np.searchsorted(member_cells, np.arange(len(centroids) + 1))
    home = np.zeros(len(member_rows), dtype=bool)
    for q in range(query_probes):
        home |= cells[member_rows, q] == member_cells
    pairs = 0
    for cell in range(len(centroids)):
        lo, hi = bounds[cell], bounds[cell + 1]
        rows = member_rows[lo:hi]  # ascending: ties go to the smaller row
        asks = np.flatnonzero(home[lo:hi])
        if not len(asks):
            continue
        pairs += len(asks) * len(rows)
        sec = secondary[rows] if secondary is not None else None
        b, sp, ss = best_partners(primary[rows], asks, sec, bound, group[rows], device=device, max_primary=max_primary)
        found = b >= 0
        at, b, sp, ss = rows[asks][found], rows[b[found]], sp[found], ss[found]
        better = (sp > sim_p[at]) | ((sp == sim_p[at]) & (b < best[at]))  # over cells: (similarity, index)
        best[at[better]], sim_p[at[better]], sim_s[at[better]] = b[better], sp[better], ss[better]
    sim_p[best < 0] = np.nan
    if stats is not None:
        stats.update(pairs=pairs, cells_per_row=len(member_rows) / max(1, n))
    return best, sim_p, sim_s


@dataclass(frozen=True)
class Calibration:
    """The margin a space's rows join cells with, and what it gives on the sample."""

    margin: float
    #: share of the calibration rows whose exact partner (in the sample) the search finds
    recall: float
    #: cells a row joins on average (the search's cost relative to one cell each)
    cells_per_row: float
    queries: int


def calibrate(
    primary: np.ndarray,
    centroids: np.ndarray,
    probes: int,
    target: float,
    query_probes: int = 1,
    secondary: np.ndarray | None = None,
    bound: float = np.inf,
    group: np.ndarray | None = None,
    max_primary: float = np.inf,
    device: str = "cpu",
    queries: int = 2000,
    seed: int = 0,
) -> Calibration:
    """The smallest margin at which :func:`ivf_search` over ``primary`` (a
    sample, unit rows) would find the exact partner of a share ``target`` of
    ``queries`` of its rows, bounds and groups included. The partners are
    searched in the sample, so they are farther than in the whole dataset
    and need a wider margin: the figure errs towards more cells, not less
    recall. Where ``probes`` cells cannot reach the target, the margin that
    finds every pair they can reach (``recall`` then says how far short)."""
    n = len(primary)
    ask = np.sort(np.random.default_rng(seed).permutation(n)[: min(n, queries)])
    truth = best_partners(primary, ask, secondary, bound, group, device, max_primary=max_primary)[0]
    cells, sims = nearest_cells(primary, centroids, max(probes, query_probes), device)
    has = truth >= 0
    q, x = ask[has], truth[has]
    gaps = sims[x, :1] - sims[x, :probes]  # the margin at which x joins its r-th cell (the first qp: always)
    gaps[:, :query_probes] = 0.0
    need = np.full(len(q), np.inf)  # per pair: the margin at which x joins one of the cells q looks in
    for j in range(query_probes):
        need = np.minimum(need, np.where(cells[x, :probes] == cells[q, j : j + 1], gaps, np.inf).min(axis=1))
    if not len(need):  # no row of the sample has a partner: nothing to measure
        return Calibration(np.inf, 1.0, float(min(probes, len(centroids))), len(ask))
    need = np.sort(need)
    reach = need[np.isfinite(need)]  # pairs ``probes`` cells can find at all
    if not len(reach):
        return Calibration(np.inf, 0.0, float(min(probes, len(centroids))), len(ask))
    # the target's quantile; where it is out of reach, the margin that finds every pair in reach
    margin = float(reach[min(max(int(np.ceil(target * len(need))) - 1, 0), len(reach) - 1)]) + 1e-9
    joined = members(sims[:, :probes], margin, query_probes).sum(axis=1)
    return Calibration(margin, float(np.mean(need <= margin)), float(joined.mean()), len(ask))


def auto_cells(rows: int, rows_per_cell: int) -> int:
    """Cells for ``rows`` rows: about ``rows_per_cell`` each, at least one."""
    return max(1, int(round(rows / max(1, rows_per_cell))))
