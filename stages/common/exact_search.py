"""The exact search inside a block of rows: for each query row the most
similar other row, with bounds on a second embedding and on the first,
in blocked matrix products (numpy float32 on a CPU; torch float16 on a
GPU, each row's candidates narrowed in float32), every candidate within a
rounding slack of its row's best scored again in float64 and ranked by
(similarity, index). So the answer is the float64 answer whatever the
device, the block's shape or BLAS's rounding: the confounders stage runs
it in every cell (``stages.common.knn``), and the benchmark as the brute
force the cells are measured against.
"""

from __future__ import annotations

import numpy as np

#: float32 products are within ~1e-6 of float64; the prefilter admits this much more
SLACK = {"float32": 1e-4, "float16": 4e-3}
#: similarities per block of queries: a few MB of cache on a CPU, GBs on a GPU
BLOCK_ELEMS = {"float32": 1 << 22, "float16": 1 << 28}
#: candidate pairs per float32 narrowing on a GPU
NARROW = 1 << 18
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
            best[lo + r], sim_p[lo + r], sim_s[lo + r] = _exact_one(
                int(qb[r]), primary, secondary, bound, group, max_primary
            )
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
        self.s32 = (
            None
            if secondary is None
            else torch.from_numpy(np.ascontiguousarray(secondary, dtype=np.float32)).to(self.tdev)
        )
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
