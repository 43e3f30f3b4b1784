"""MetaCLIP's balancing as pure numpy: per-entry counts, the draws, and the
summary the manifest and the report read back.

Why apart from the ``balance`` stage: the draws must be the same function
everywhere (both runners, any cluster or shard size, a resume), and the
summary is read by ``manifests/report.py`` from a finished run's manifest;
neither needs a stage, and both are easier to test on plain arrays.

**Draws.** A row with entries ``E`` is kept if any entry selects it; entry
``e`` with count ``c_e`` selects each of its rows with probability
``min(1, t / c_e)`` (MetaCLIP's ``balance_sampling``). The uniform number
behind the draw of (row, entry) is a 64-bit hash of the row's URL and
caption, the seed and the entry id (:func:`draws`): never the row's key,
which changes with ``samples_per_shard``. A draw selects when
``hash < floor(t * 2**64 / c_e)``, in integers.

**Counters** (``FitResult.counters``, summed over tasks into the manifest's
``fits`` entry; :func:`summary` reads them back):

* ``rows``, ``rows_without_entries``, ``matches`` (row-entry pairs),
  ``entries_used`` (entries with a row), ``entries_over_t``, ``kept``;
* ``hist_before:<b>``: entries whose count falls in log bin ``b``
  (:func:`log_bin`: ten bins a decade, ``[10**(b/10), 10**((b+1)/10))``);
* ``before:<id>`` and ``after:<id>``: rows holding entry ``id`` before and
  after balancing, for every entry over ``t`` and the ``top`` largest. An
  entry at or under ``t`` keeps every row (it selects each with probability
  1), so its count after is its count before: the tracked entries and the
  histogram give the whole distribution after, unless more than
  :data:`MAX_TRACKED` entries are over ``t`` (then ``after`` is the top ones').
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

#: most entries whose before/after counts are tracked by id (the largest first)
MAX_TRACKED = 5000
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def flatten(entries) -> tuple[np.ndarray, np.ndarray]:
    """A ragged column of entry ids as (row index, entry id) pairs, each pair once."""
    lens = np.fromiter((len(x) for x in entries), dtype=np.int64, count=len(entries))
    if not lens.sum():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in entries if len(x)])
    rows = np.repeat(np.arange(len(entries), dtype=np.int64), lens)
    pairs = np.unique(np.stack([rows, ids], axis=1), axis=0)  # a duplicated id counts once
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def row_hashes(urls, captions, seed: int) -> np.ndarray:
    """A 64-bit hash of each row's URL and caption (and the seed)."""
    out = np.empty(len(urls), dtype=np.uint64)
    for i, (u, c) in enumerate(zip(urls, captions)):
        text = f"{seed}\x1f{u if isinstance(u, str) else ''}\x1f{c if isinstance(c, str) else ''}"
        out[i] = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def draws(row_hash: np.ndarray, entry: np.ndarray) -> np.ndarray:
    """The uniform 64-bit number of each (row, entry) pair."""
    with np.errstate(over="ignore"):
        e = (entry.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return _mix(row_hash ^ _mix(e))


def thresholds(counts: np.ndarray, t: int) -> np.ndarray:
    """``floor(t * 2**64 / c)`` per count (``c > t``), as uint64."""
    return np.array([(int(t) << 64) // int(c) for c in counts], dtype=np.uint64)


def log_bin(counts: np.ndarray) -> np.ndarray:
    """Ten bins a decade: bin ``b`` holds counts in ``[10**(b/10), 10**((b+1)/10))``."""
    c = np.asarray(counts, dtype=np.float64)
    b = np.floor(np.log10(np.maximum(c, 1)) * 10 + 1e-9).astype(np.int64)
    # float rounding at a bin edge: make sure the integer lies in its bin
    b -= (c < np.power(10.0, b / 10) - 1e-6).astype(np.int64)
    return b


def summary(info: dict | None, top: int = 20) -> dict | None:
    """The balance fit's counters (a manifest ``fits`` entry) read back as
    ``{t, rows, kept, entries_used, entries_over_t, top: [(id, before,
    after)], hist_before, hist_after, exact_after}``; ``None`` if not a
    balance fit."""
    counters = (info or {}).get("counters") or {}
    if "entries_used" not in counters:
        return None
    before = {int(k[7:]): int(v) for k, v in counters.items() if k.startswith("before:")}
    after = {i: int(counters.get(f"after:{i}", 0)) for i in before}
    hb: dict[int, int] = {}
    for k, v in counters.items():
        if k.startswith("hist_before:") and int(v):
            hb[int(k[12:])] = int(v)
    ha = dict(hb)
    for i, c in before.items():  # tracked entries move from their bin before to their bin after
        b0 = int(log_bin(np.array([c]))[0])
        ha[b0] -= 1
        if after[i]:
            b1 = int(log_bin(np.array([after[i]]))[0])
            ha[b1] = ha.get(b1, 0) + 1
    ha = {b: n for b, n in ha.items() if n}
    ranked = sorted(before, key=lambda i: (-before[i], i))[:top]
    return {
        "t": int(counters.get("t", 0)),
        "rows": int(counters.get("rows", 0)),
        "kept": int(counters.get("kept", 0)),
        "entries_used": int(counters["entries_used"]),
        "entries_over_t": int(counters.get("entries_over_t", 0)),
        "top": [(i, before[i], after[i]) for i in ranked],
        "hist_before": dict(sorted(hb.items())),
        "hist_after": dict(sorted(ha.items())),
        "exact_after": int(counters.get("entries_over_t", 0)) <= len(before),
    }


def rank_curve(hist: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """From log-bin counts, MetaCLIP's rank-count curve: entries ranked by
    count (x: rank 1, 2, ...) against their count (y: the bin's lower edge),
    as the corners of a step line."""
    x, y, rank = [], [], 0
    for b in sorted(hist, reverse=True):
        edge = float(math.ceil(10 ** (b / 10) - 1e-6))
        x += [rank + 1, rank + hist[b]]
        y += [edge, edge]
        rank += hist[b]
    return np.array(x, dtype=np.float64), np.array(y, dtype=np.float64)
