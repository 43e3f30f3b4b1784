"""Nearest neighbours over embeddings, exact inside a block and inverted-file
(IVF) style across a dataset: the search the confounders stage spreads over
a fit's buckets.

* :func:`spherical_kmeans` on a sample gives the cells; :func:`nearest_cells`
  puts each row in its ``probes`` nearest cells (float64, so a row near a
  border lands on the same side in any batch).
* A row *looks* for its neighbour in its ``query_probes`` nearest cells
  (default 1: its own), among every row that put itself there. The true
  neighbour ``x`` of a row ``q`` is found when one of ``q``'s cells is among
  ``x``'s ``probes`` nearest. With one query cell each row's answer comes
  out of one cell and no merge across cells is needed; more query cells
  buy recall for a merge (the best over them) and more work.
* :func:`best_partners` is the exact search inside a cell: blocked matrix
  products (numpy, or torch on a GPU) keep each row's candidates within a
  rounding slack of its best, which are scored again in float64 and ranked by
  (similarity, index), so the answer does not depend on how the block was
  cut or on BLAS rounding.

:func:`ivf_search` runs the whole scheme in memory (tests, the benchmark);
the stage runs the same steps as ``bucket_rows`` and ``reduce_bucket``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: float32 products are within ~1e-6 of float64; the prefilter admits this much more
SLACK = {"float32": 1e-4, "float16": 4e-3}
#: similarities per block of queries: a few MB of cache on a CPU, GBs on a GPU
BLOCK_ELEMS = {"float32": 1 << 22, "float16": 1 << 28}
#: rows per float64 product with the centroids; candidate pairs per float32 narrowing on a GPU
CELL_CHUNK, NARROW = 1 << 15, 1 << 18
#: torch devices whose products run in float16 (tests add "cpu" to run the GPU's steps here)
HALF_ON = ("cuda",)


def unit_rows(emb) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length (float32), and which rows could be (finite, non-zero)."""
    e = np.asarray(emb, dtype=np.float32)
    if e.ndim != 2:
        e = np.stack([np.asarray(r, dtype=np.float32) for r in emb]) if len(emb) else e.reshape(0, 0)
    norm = np.zeros(len(e))
    for lo in range(0, len(e) if e.size else 0, 1 << 15):  # float64 a chunk at a time: the same norms, less memory
        norm[lo : lo + (1 << 15)] = np.linalg.norm(e[lo : lo + (1 << 15)].astype(np.float64), axis=1)
    valid = np.isfinite(norm) & (norm > 0)
    out = np.zeros_like(e)
    out[valid] = (e[valid] / norm[valid, None]).astype(np.float32)
    return out, valid


def spherical_kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """k-means on unit rows by cosine similarity (k-means++ start), fully
    determined by the row order of ``x``, ``seed`` and the device (numpy, or
    torch on a GPU). Returns unit centroids (float32, numpy)."""
    n = len(x)
    if n == 0:
        raise ValueError("k-means: no valid embeddings to cluster")
    k = max(1, min(k, n))
    tdev = _torch_device(device)
    if tdev is not None:
        import torch

        xp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(tdev)
        mm = lambda a, b: a @ b.T  # noqa: E731
        to_np = lambda t: t.cpu().numpy()  # noqa: E731
        argmax = lambda t: torch.argmax(t, dim=1)  # noqa: E731
    else:
        xp, mm, to_np, argmax = x, (lambda a, b: a @ b.T), (lambda t: t), (lambda t: np.argmax(t, axis=1))
    rng = np.random.default_rng(seed)
    picks = [int(rng.integers(n))]
    dist = np.maximum(0.0, 1.0 - to_np(mm(xp, xp[picks[0] : picks[0] + 1])).ravel()).astype(np.float64)
    for _ in range(1, k):
        total = float(dist.sum())
        pick = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        picks.append(pick)
        dist = np.minimum(dist, np.maximum(0.0, 1.0 - to_np(mm(xp, xp[pick : pick + 1])).ravel()))
    centroids = np.ascontiguousarray(x[picks], dtype=np.float32)
    for _ in range(iters):
        cp = torch.from_numpy(centroids).to(tdev) if tdev is not None else centroids
        assign = to_np(argmax(mm(xp, cp)))
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


def _torch_device(device: str):
    if device == "cpu":
        return None
    try:
        import torch
    except ImportError:
        return None
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device)


def best_partners(
    primary: np.ndarray,
    queries: np.ndarray,
    secondary: np.ndarray | None = None,
    bound: float = np.inf,
    group: np.ndarray | None = None,
    device: str = "cpu",
    block_elems: int | None = None,
    max_primary: float = np.inf,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row ``i`` in ``queries``: the row ``j != i`` of the block with
    the highest ``primary[i] . primary[j]`` (below ``max_primary``) among rows
    with a different ``group`` (default: every other row) and
    ``secondary[i] . secondary[j] < bound``. Rows are unit vectors. Returns per query the partner's index
    (-1: none), its primary and its secondary similarity (float64; NaN
    without ``secondary``). Ties go to the smaller index: order rows by key.

    The products run in float32 (float16 on a GPU); every candidate within
    :data:`SLACK` of a row's best is scored again in float64, and the bound
    is applied to the float64 score, so the answer is the float64 answer."""
    n = len(primary)
    queries = np.asarray(queries, dtype=np.int64)
    best = np.full(len(queries), -1, dtype=np.int64)
    sim_p, sim_s = np.full(len(queries), np.nan), np.full(len(queries), np.nan)
    if n < 2 or not len(queries):
        return best, sim_p, sim_s
    products = _Products(primary, secondary, group, bound, device, max_primary)
    group = np.arange(n, dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    f64 = lambda a, at: a[at].astype(np.float64)  # noqa: E731  (rows in float64 when needed, not the block)
    block = max(1, (block_elems or BLOCK_ELEMS[products.dtype]) // n)
    for lo in range(0, len(queries), block):
        qb = queries[lo : lo + block]
        rows, cols = products.band(qb)
        ep = np.einsum("pd,pd->p", f64(primary, qb[rows]), f64(primary, cols))
        if secondary is not None:
            es = np.einsum("pd,pd->p", f64(secondary, qb[rows]), f64(secondary, cols))
        else:
            es = np.full(len(rows), np.nan)
        ok = (es < bound if secondary is not None else np.ones(len(rows), dtype=bool)) & (ep < max_primary)
        # per row: the best exact score, ties to the smaller column
        order = np.lexsort((cols, -np.where(ok, ep, -np.inf), rows))
        rows, cols, ep, es, ok = rows[order], cols[order], ep[order], es[order], ok[order]
        first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, dtype=np.int64)
        hit = first[ok[first]]
        at = lo + rows[hit]
        best[at], sim_p[at], sim_s[at] = cols[hit], ep[hit], es[hit]
        for r in np.unique(rows[first[~ok[first]]]):  # the whole band broke the bound in float64 (rare)
            best[lo + r], sim_p[lo + r], sim_s[lo + r] = _exact_one(int(qb[r]), primary, secondary, bound, group, max_primary)
    return best, sim_p, sim_s


def _exact_one(i: int, primary, secondary, bound: float, group, max_primary: float) -> tuple[int, float, float]:
    """One row's answer in float64 over the whole block."""
    p64 = primary.astype(np.float64)
    s64 = secondary.astype(np.float64) if secondary is not None else None
    ep = p64 @ p64[i]
    ok = (group != group[i]) & (ep < max_primary)
    es = s64 @ s64[i] if s64 is not None else np.full(len(ep), np.nan)
    if s64 is not None:
        ok &= es < bound
    if not ok.any():
        return -1, np.nan, np.nan
    j = int(np.flatnonzero(ok)[np.argmax(ep[ok])])  # argmax: the smallest index of equal maxima
    return j, float(ep[j]), float(es[j])


class _Products:
    """The blocked products of one block: numpy float32, or torch on a GPU
    (float16 products, then each row's band narrowed in float32)."""

    def __init__(self, primary, secondary, group, bound, device, max_primary=np.inf):
        self.tdev = _torch_device(device)
        self.dtype = "float16" if self.tdev is not None and self.tdev.type in HALF_ON else "float32"
        self.bound, self.max_p, self.group = bound, max_primary, group
        if self.tdev is None:
            self.p, self.s = primary.astype(np.float32, copy=False), secondary
            return
        import torch

        tdt = torch.float16 if self.dtype == "float16" else torch.float32
        self.p32 = torch.from_numpy(np.ascontiguousarray(primary, dtype=np.float32)).to(self.tdev)
        self.s32 = None if secondary is None else torch.from_numpy(np.ascontiguousarray(secondary, dtype=np.float32)).to(self.tdev)
        self.p = self.p32.to(tdt)
        self.s = None if secondary is None else self.s32.to(tdt)
        self.g = torch.from_numpy(group).to(self.tdev) if group is not None else None

    def band(self, qb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in ``qb``, column) of every pair that may be its row's best
        allowed one: see :func:`_band`."""
        if self.tdev is None:
            sp = self.p[qb] @ self.p.T
            if self.group is None:  # a row never pairs with itself
                sp[np.arange(len(qb)), qb] = -np.inf
            else:
                np.putmask(sp, self.group[qb][:, None] == self.group[None, :], -np.inf)
            ss = self.s[qb] @ self.s.T if self.s is not None else None
            return np.nonzero(_band(np, sp, ss, self.bound, self.max_p, SLACK["float32"]))
        import torch

        tq = torch.from_numpy(qb).to(self.tdev)
        sp = (self.p[tq] @ self.p.T).float()
        if self.g is None:
            sp[torch.arange(len(qb), device=self.tdev), tq] = -float("inf")
        else:
            sp.masked_fill_(self.g[tq][:, None] == self.g[None, :], -float("inf"))
        ss = (self.s[tq] @ self.s.T).float() if self.s is not None else None
        r, c = torch.nonzero(_band(torch, sp, ss, self.bound, self.max_p, SLACK[self.dtype]), as_tuple=True)
        del sp, ss
        if self.dtype == "float16" and len(r) > len(qb):  # several candidates in a row: narrow them in float32
            keep = torch.cat([self._narrow(tq, r[i : i + NARROW], c[i : i + NARROW]) for i in range(0, len(r), NARROW)])
            r, c = r[keep], c[keep]
        return r.cpu().numpy(), c.cpu().numpy()

    def _narrow(self, tq, r, c):
        import torch

        ep = (self.p32[tq[r]] * self.p32[c]).sum(dim=1)[None, :]
        es = (self.s32[tq[r]] * self.s32[c]).sum(dim=1)[None, :] if self.s32 is not None else None
        pairs = _band(torch, ep, es, self.bound, self.max_p, SLACK["float32"], rows=r, n_rows=len(tq))[0]
        # a row none of whose pairs may be allowed keeps them all (float64 decides, then scans the block)
        alive = torch.zeros(len(tq), dtype=torch.int64, device=r.device).index_add_(0, r, pairs.long()) > 0
        return pairs | ~alive[r]


def _band(xp, sp, ss, bound: float, max_p: float, slack: float, rows=None, n_rows: int = 0):
    """The pairs within ``slack`` of their row's best that may be allowed:
    ``sp``, ``ss`` are (rows, columns) products with rounding errors below
    ``slack / 2``; or one row of pairs whose rows are ``rows`` (of ``n_rows``).

    A pair may be allowed when ``ss < bound + slack`` and ``sp < max_p +
    slack``, is surely allowed below ``bound - slack`` and ``max_p - slack``.
    The band is measured from the best pair that is surely allowed (else the
    best that may be): the best allowed pair is never below it by more than
    the rounding, however many pairs sit in the uncertain strip at a bound
    (a bound at a dense similarity, like swap_text's, fills it)."""
    inf = float("inf")
    may, sure = sp > -inf, None
    if ss is not None:
        may, sure = may & (ss < bound + slack), ss < bound - slack
    if max_p < inf:
        may &= sp < max_p + slack
        sure = (sp < max_p - slack) if sure is None else sure & (sp < max_p - slack)
    sp = xp.where(may, sp, -inf)
    top = _row_max(xp, sp, rows, n_rows)
    if sure is not None:
        top_sure = _row_max(xp, xp.where(sure & may, sp, -inf), rows, n_rows)
        top = xp.where(top_sure > -inf, top_sure, top)
    if rows is not None:
        top = top[rows][None, :]
    else:
        top = top[:, None]
    return may & (sp >= top - slack) & (top > -inf)


def _row_max(xp, v, rows, n_rows):
    if rows is None:
        return v.max(axis=1) if xp is np else v.max(dim=1).values
    out = xp.full((n_rows,), -float("inf"), device=v.device, dtype=v.dtype)
    return out.scatter_reduce(0, rows, v[0], reduce="amax")


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
