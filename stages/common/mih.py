"""Nearest 64-bit hash within a Hamming distance, by multi-index hashing.

Why not ``common.dedup.HammingIndex`` (``max_distance + 1`` bands, radius
0): that pigeonhole reads ``(d + 1) / 2**(64 / (d + 1))`` of the stored
hashes per query, 7% of a million-entry list at ``d = 8``, and so scans
most of a large list for the distances pHash lists use. Multi-index hashing
(Norouzi, Punjani and Fleet, CVPR 2012) cuts the bits into fewer, wider
bands and probes every band value within a small radius of the query's,
which reads a handful of entries; the band count is chosen from the list's
size and the distance (:func:`plan_bands`), and ``d + 1`` bands is one of
the choices, so it is never worse.
"""

from __future__ import annotations

import numpy as np


class PhashIndex:
    """64-bit hashes (a list's pHash entries, with their lines and hex forms)
    answering "the nearest stored hash within ``max_distance`` bits": the
    bits are cut into ``m`` bands; two hashes within ``d`` bits agree to
    within ``d // m`` bits on at least one band (pigeonhole), so a query
    reads, per band, the entries whose band value is within that radius of
    its own."""

    def __init__(self, hashes: np.ndarray, lines: list[int], hexes: list[str], max_distance: int):
        from pairforge.stages.common.dedup import band_layout, band_values

        self.hashes, self.lines, self.hexes = np.asarray(hashes, dtype=np.uint64), lines, hexes
        self.max_distance = d = max_distance
        self.bands = plan_bands(len(self.hashes), d)
        self.layout = band_layout(self.bands - 1)
        self.radius = d // self.bands
        vals = band_values(self.hashes, self.layout)
        self.order = [np.argsort(vals[:, j], kind="stable") for j in range(self.bands)]
        self.sorted = [vals[o, j] for j, o in enumerate(self.order)]
        self.masks = [flip_masks(w, self.radius) for _, w in self.layout]
        self.line_of = np.asarray(lines, dtype=np.int64)

    def nearest(self, q: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Per query: the index of the nearest entry within ``max_distance``
        (ties: the first line), or -1; and its distance."""
        from pairforge.stages.common.dedup import _ranges, band_values, popcount

        best = np.full(len(q), -1, dtype=np.int64)
        dist = np.full(len(q), -1, dtype=np.int64)
        for s in range(0, len(q), chunk):
            qc = q[s : s + chunk]
            qb = band_values(qc, self.layout)
            qi, si = [], []
            for j in range(self.bands):
                probe = (qb[:, j : j + 1] ^ self.masks[j][None, :]).reshape(-1)
                lo = np.searchsorted(self.sorted[j], probe, side="left")
                cnt = np.searchsorted(self.sorted[j], probe, side="right") - lo
                qi.append(np.repeat(np.arange(len(qc)).repeat(len(self.masks[j])), cnt))
                si.append(self.order[j][_ranges(lo, cnt)])
            qi, si = np.concatenate(qi), np.concatenate(si)
            dd = popcount(qc[qi] ^ self.hashes[si])
            keep = dd <= self.max_distance
            qi, si, dd = qi[keep], si[keep], dd[keep]
            o = np.lexsort((self.line_of[si], dd, qi))
            qi, si, dd = qi[o], si[o], dd[o]
            first = np.r_[True, qi[1:] != qi[:-1]] if len(qi) else np.zeros(0, dtype=bool)
            best[s + qi[first]], dist[s + qi[first]] = si[first], dd[first]
        return best, dist


def flip_masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit value with at most ``radius`` bits set."""
    from itertools import combinations

    out = [sum(1 << b for b in bits) for r in range(radius + 1) for bits in combinations(range(width), r)]
    return np.array(out, dtype=np.uint64)


def plan_bands(n: int, d: int) -> int:
    """The band count with the least work per query: probes (one lookup each)
    plus the entries they read (one comparison each), for ``n`` entries."""
    from math import comb

    best, cost_best = d + 1, float("inf")
    for m in range(1, d + 2):
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        r = d // m
        probes = [sum(comb(w, k) for k in range(r + 1)) for w in widths]
        if max(probes) > 200_000:  # the masks would not fit a batch
            continue
        cost = sum(2 * p + p * n / 2.0**w for p, w in zip(probes, widths))
        if cost < cost_best:
            best, cost_best = m, cost
    return best
