"""Shared machinery of the dedup stages (``dedup_exact``, ``dedup_phash``,
``dedup_semantic``): the keep policy, connected components over candidate
pairs, Hamming-distance helpers and reading a previous build.

Everything here is vectorised numpy so that ``combine`` (one task) handles
millions of pairs without a Python loop per pair.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator

import numpy as np

from pairforge.stages.base import Batch, FitResult, object_array

#: The column every dropped row gets: the key of the row it duplicates.
DUPLICATE_OF = "duplicate_of"
#: The reason of a row that matches an evaluation set (``eval_sets``): DataComp
#: removed such rows from its pool so that zero-shot figures measure generalisation
EVAL_CONTAMINATION = "eval_contamination"

#: Keep policies: which row of a duplicate cluster survives, and the columns
#: each reads. Every policy ranks rows by a priority (higher survives), ties
#: to the smallest key (string order):
#:
#: ``largest``: ``original_width * original_height`` (missing or invalid sizes
#: count as 0). ``first``: no priority, so the smallest key, i.e. the earliest
#: row of the URL list. ``clip_score``: the best CLIP score (NaN counts as the
#: worst); only where the dedup stage runs after ``clip_score``, so the pair a
#: later score filter would drop is not the one kept.
#:
#: All are total orders over distinct keys, so the survivor does not depend
#: on batch order, grouping or the number of blocks.
KEEP_POLICIES: dict[str, tuple[str, ...]] = {
    "largest": ("original_width", "original_height"),
    "first": (),
    "clip_score": ("clip_score",),
}


def check_keep(policy: str) -> None:
    if policy not in KEEP_POLICIES:
        raise ValueError(f"keep: unknown policy {policy!r}; known: {', '.join(KEEP_POLICIES)}")


def fit_columns_for(policy: str, *columns: str) -> tuple[str, ...]:
    """``key``, the stage's own columns and the columns the keep policy reads."""
    out = ["key", *columns, *KEEP_POLICIES[policy]]
    return tuple(dict.fromkeys(out))


def row_priority(batch: Batch, policy: str) -> np.ndarray:
    """The keep-policy priority of each row, float64 (higher survives)."""
    cols = KEEP_POLICIES[policy]
    n = len(batch["key"])
    if not cols:
        return np.zeros(n, dtype=np.float64)
    if policy == "clip_score":
        v = np.asarray(batch["clip_score"], dtype=np.float64)
        return np.where(np.isfinite(v), v, -np.inf)
    area = np.ones(n, dtype=np.float64)
    for c in cols:
        v = np.asarray(batch[c], dtype=np.float64)
        area *= np.where(np.isfinite(v) & (v > 0), v, 0.0)
    return area


def str_keys(values) -> np.ndarray:
    """Keys as a numpy unicode array (Ray may hand them over as object or
    unicode arrays; both sort the same way once converted)."""
    arr = np.asarray(values)
    return arr.astype(str) if arr.dtype.kind != "U" else arr


def keep_rank(keys: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Position of every row in keep order (0 = survives first): higher
    ``priority`` first, then the smaller key."""
    order = np.lexsort((str_keys(keys), -np.asarray(priority, dtype=np.float64)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


# ------------------------------------------------------------ components


def components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes with edges ``a[i]-b[i]``.

    Returns per node the smallest node index of its component. Union-find
    done data-parallel: hook every root onto the smallest root it touches,
    then compress paths by pointer jumping; repeat until no edge spans two
    roots. Parent pointers only ever decrease, so there are no cycles.
    """
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        live = ra != rb
        if not live.any():
            break
        a, b, ra, rb = a[live], b[live], ra[live], rb[live]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def survivors(labels: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per node: the node that survives its component (best ``rank``) and
    the component's size."""
    n = len(labels)
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, labels, rank)
    node_at_rank = np.empty(n, dtype=np.int64)
    node_at_rank[rank] = np.arange(n)
    size = np.bincount(labels, minlength=n)
    return node_at_rank[best[labels]], size[labels]


def cluster_pairs(key_a, key_b, prio_a, prio_b) -> dict[str, np.ndarray]:
    """Merge candidate pairs into clusters and apply the keep policy.

    Returns the nodes (unique keys, sorted) with ``key``, ``priority``, ``a``/``b``
    (the edges as node indices), ``survivor`` (node index), ``size`` (its
    cluster's size) and ``dropped`` (bool: not the survivor).
    """
    ka, kb = str_keys(key_a), str_keys(key_b)
    keys, inv = np.unique(np.concatenate([ka, kb]), return_inverse=True)
    a, b = inv[: len(ka)], inv[len(ka) :]
    prio = np.zeros(len(keys), dtype=np.float64)
    prio[a] = np.asarray(prio_a, dtype=np.float64)
    prio[b] = np.asarray(prio_b, dtype=np.float64)
    labels = components(a, b, len(keys))
    surv, size = survivors(labels, keep_rank(keys, prio))
    return {
        "key": keys,
        "priority": prio,
        "a": a,
        "b": b,
        "survivor": surv,
        "size": size,
        "dropped": surv != np.arange(len(keys)),
    }


def decisions(keys, reason, details, duplicate_of) -> FitResult:
    """A ``combine`` result: one row per dropped key (with its survivor in
    ``duplicate_of``), then one ``survivor`` row per distinct survivor (kept,
    so a later stage that drops it can be counted), sorted by key. A detail
    is a dict or an already serialised JSON object (sorted keys)."""
    keys = str_keys(keys)
    reasons = [reason] * len(keys) if isinstance(reason, str) else list(reason)
    surv = np.unique(str_keys(duplicate_of)) if len(keys) else np.zeros(0, dtype=str)
    all_keys = np.concatenate([keys, surv]) if len(surv) else keys
    order = np.argsort(all_keys, kind="stable")
    n = len(keys)

    def pick(i):
        if i < n:
            d = details[i]
            return reasons[i], d if isinstance(d, str) else json.dumps(d, sort_keys=True), str(duplicate_of[i]), False
        return "", "", "", True

    rows = [pick(i) for i in order]
    per_survivor = dict(zip(*np.unique(str_keys(duplicate_of), return_counts=True))) if n else {}
    return FitResult(
        {
            "key": object_array([str(all_keys[i]) for i in order]),
            "reason": object_array([r[0] for r in rows]),
            "detail": object_array([r[1] for r in rows]),
            DUPLICATE_OF: object_array([r[2] for r in rows]),
            "survivor": np.array([r[3] for r in rows], dtype=bool),
            # on survivor rows: how many rows were dropped as its duplicates
            "duplicates": np.array([int(per_survivor.get(all_keys[i], 0)) if i >= n else 0 for i in order], np.int64),
        }
    )


def no_decisions() -> FitResult:
    return decisions([], "", [], [])


# --------------------------------------------------------------- hamming


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(x, dtype=np.uint64)).astype(np.int64)


def hex_to_u64(values) -> np.ndarray:
    """16-hex-digit strings (imagehash's ``str()``) to uint64, most
    significant bit first. Empty/None entries become 0; callers mask them."""
    vals = ["0" * 16 if not v else v for v in np.asarray(values, dtype=object)]
    if not vals:
        return np.zeros(0, dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(vals)), dtype=">u8").astype(np.uint64)


def u64_to_hex(values: np.ndarray) -> np.ndarray:
    return object_array([f"{int(v):016x}" for v in np.asarray(values, dtype=np.uint64)])


def band_layout(max_distance: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of ``max_distance + 1`` contiguous bands covering 64
    bits, widths as equal as possible. Two hashes within ``max_distance``
    bits differ in at most ``max_distance`` bands, so by pigeonhole they are
    equal in at least one."""
    nb = max_distance + 1
    if not 1 <= nb <= 64:
        raise ValueError(f"max_distance: expected 0..63, got {max_distance!r}")
    widths = [64 // nb + (1 if i < 64 % nb else 0) for i in range(nb)]
    out, shift = [], 64
    for w in widths:
        shift -= w
        out.append((shift, w))
    return out


def band_values(hashes: np.ndarray, layout: list[tuple[int, int]]) -> np.ndarray:
    """``(n, bands)`` uint64 matrix of each hash's band values."""
    h = np.asarray(hashes, dtype=np.uint64)
    out = np.empty((len(h), len(layout)), dtype=np.uint64)
    for j, (shift, width) in enumerate(layout):
        mask = np.uint64((1 << width) - 1)
        out[:, j] = (h >> np.uint64(shift)) & mask
    return out


def first_equal_band(x: np.ndarray, layout: list[tuple[int, int]]) -> np.ndarray:
    """For XORs ``x`` of hash pairs: the first band where the pair agrees
    (``len(layout)`` where none does)."""
    zero = band_values(x, layout) == 0
    return np.where(zero.any(axis=1), zero.argmax(axis=1), len(layout))


def pairs_in_runs(run_ids: np.ndarray, max_pairs: int = 4_000_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All index pairs ``i < j`` with ``run_ids[i] == run_ids[j]``, for
    ``run_ids`` sorted so equal values are contiguous. Yields chunks of
    whole runs, each with at most about ``max_pairs`` pairs (a single run
    larger than that is yielded alone)."""
    n = len(run_ids)
    if n < 2:
        return
    starts = np.flatnonzero(np.r_[True, run_ids[1:] != run_ids[:-1]])
    lengths = np.diff(np.r_[starts, n])
    multi = lengths > 1
    starts, lengths = starts[multi], lengths[multi]
    per_run = lengths * (lengths - 1) // 2
    cum = np.cumsum(per_run)
    lo = 0
    while lo < len(starts):
        base = cum[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, base + max_pairs, side="right")))
        yield _run_pairs(starts[lo:hi], lengths[lo:hi])
        lo = hi


def _run_pairs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = _ranges(starts, lengths)
    ends = np.repeat(starts + lengths, lengths)
    later = ends - pos - 1
    left = np.repeat(pos, later)
    first = np.cumsum(later) - later
    right = left + 1 + (np.arange(len(left)) - np.repeat(first, later))
    return left, right


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + m)`` for each start/length, vectorised."""
    total = int(lengths.sum())
    offs = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offs


class HammingIndex:
    """Fixed set of 64-bit hashes answering "which stored hash is within
    ``max_distance`` of this one" with the same pigeonhole banding as the
    global fit (used against a previous build)."""

    def __init__(self, hashes: np.ndarray, keys: np.ndarray, max_distance: int):
        self.layout = band_layout(max_distance)
        self.max_distance = max_distance
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        self.keys = str_keys(keys)
        bands = band_values(self.hashes, self.layout)
        self.order = [np.argsort(bands[:, j], kind="stable") for j in range(len(self.layout))]
        self.sorted = [bands[o, j] for j, o in enumerate(self.order)]

    def __len__(self) -> int:
        return len(self.hashes)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query: index of the closest stored hash within ``max_distance``
        (ties: smaller key), or -1; and that distance (-1 where none)."""
        q = np.asarray(queries, dtype=np.uint64)
        best = np.full(len(q), -1, dtype=np.int64)
        dist = np.full(len(q), 65, dtype=np.int64)
        if not len(self) or not len(q):
            return best, np.full(len(q), -1, dtype=np.int64)
        qb = band_values(q, self.layout)
        qi, si = [], []
        for j in range(len(self.layout)):
            lo = np.searchsorted(self.sorted[j], qb[:, j], side="left")
            hi = np.searchsorted(self.sorted[j], qb[:, j], side="right")
            cnt = hi - lo
            qi.append(np.repeat(np.arange(len(q)), cnt))
            si.append(self.order[j][_ranges(lo, cnt)])
        qi, si = np.concatenate(qi), np.concatenate(si)
        d = popcount(q[qi] ^ self.hashes[si])
        hit = d <= self.max_distance
        qi, si, d = qi[hit], si[hit], d[hit]
        # best per query: smallest distance, then smallest key
        order = np.lexsort((self.keys[si], d, qi))
        qi, si, d = qi[order], si[order], d[order]
        first = np.r_[True, qi[1:] != qi[:-1]] if len(qi) else np.zeros(0, dtype=bool)
        best[qi[first]] = si[first]
        dist[qi[first]] = d[first]
        return best, np.where(best >= 0, dist, -1)


# ---------------------------------------------------------- prior builds


def read_eval_sets(dirs: tuple[str, ...], columns: tuple[str, ...]) -> Batch:
    """The ``columns`` of every row of each evaluation-set index (a folder in
    a build's layout, written by ``pairforge eval-index``), with each key
    prefixed by its folder's name so a match names the set. The same reader
    as a prior build's: a missing folder or column is a job error."""
    parts = []
    for d in dirs:
        rows = read_prior_build(d, columns, what="eval_sets")
        rows["key"] = object_array([f"{os.path.basename(os.path.normpath(d))}/{k}" for k in rows["key"]])
        parts.append(rows)
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def read_eval_embeddings(dirs: tuple[str, ...], column: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys and unit float32 embeddings ``column`` of evaluation-set indexes
    (``embeddings/<column>/<column>_SSSSS.npy`` beside ``shards/SSSSS.parquet``,
    as a build stores them)."""
    keys, embs = [], []
    for d in dirs:
        name = os.path.basename(os.path.normpath(d))
        for f in sorted(glob.glob(os.path.join(d, "shards", "*.parquet"))):
            sid = os.path.basename(f).split(".")[0]
            npy = os.path.join(d, "embeddings", column, f"{column}_{sid}.npy")
            if not os.path.exists(npy):
                raise ValueError(f"eval_sets: {d!r} has no {column} embeddings ({npy}); write the index with a model")
            import pyarrow.parquet as pq

            k = pq.read_table(f, columns=["key"]).column("key").to_pylist()
            e = np.load(npy, allow_pickle=False).astype(np.float32)
            if len(e) != len(k):
                raise ValueError(f"eval_sets: {npy} holds {len(e)} rows for {len(k)} in {f}")
            keys.extend(f"{name}/{x}" for x in k)
            embs.append(e)
    emb = np.concatenate(embs) if embs else np.zeros((0, 0), dtype=np.float32)
    norm = np.linalg.norm(emb, axis=1, keepdims=True) if len(emb) else np.ones((0, 1))
    return object_array(keys), emb / np.maximum(norm, 1e-12)


#: a location with a scheme (``s3://``, ``gs://``, ``file://``): ``manifests.storage``'s rule
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_prior_build(prior: str | None) -> list[str]:
    """The job check's lines about a ``prior_build`` option (a stage's
    ``check``): it must be a local folder that holds an earlier run's
    ``shards/*.parquet``. Reads nothing but the folder's listing."""
    if not prior:
        return []
    if _URI.match(prior) and not prior.startswith("file://"):
        return [
            f"prior_build: {prior!r}: an earlier build on object storage is not read yet; "
            "give a local copy of its shards/*.parquet"
        ]
    if not glob.glob(os.path.join(glob.escape(prior), "shards", "*.parquet")):
        return [f"prior_build: {prior!r} holds no shards/*.parquet (not the OUT of an earlier run)"]
    return []


def read_prior_build(out_dir: str, columns: tuple[str, ...], what: str = "prior_build") -> Batch:
    """The ``columns`` of every row in ``out_dir/shards/*.parquet`` (an
    earlier build). Raises ``ValueError`` if the folder has no shards or a
    shard lacks a column: a misconfigured prior build is a job error, not a
    per-row outcome."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(out_dir, "shards", "*.parquet")))
    if not files:
        raise ValueError(f"{what}: no shards/*.parquet under {out_dir!r}")
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{what}: {f} has no column {missing[0]!r}")
        tables.append(pq.read_table(f, columns=list(columns)))
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
