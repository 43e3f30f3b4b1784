"""A dedup stage's ``combine`` per connected component, in tasks whose
memory is bounded by a partition, not by the duplicates of the whole run.

Why: ``combine`` of ``dedup_exact`` / ``dedup_phash`` / ``dedup_semantic``
merges duplicate links into clusters (connected components) and decides
each cluster on its own: the keep policy picks its survivor, every other
member gets ``duplicate_of``. In one task over every reduced row of the
stage it was the largest task of a run, growing with the duplicates (the 3M
scale bench: +441 MiB, ~150 GB on paper at 1B rows). Here the components
are found in a few passes over an edge table in the work folder, and
``combine`` runs once per partition of whole components; since it decides
each component on its own, the decisions are those of the single task.

A stage opts in with ``GlobalStage.link_columns`` (the two columns of its
reduced rows whose values each reduced row links: row keys, or an integer
that stands for a group, as ``dedup_exact``'s digest does). Steps, each ``parts`` tasks, each a parts file
(``pipeline.shuffle``) under ``_work/fit/<stage>/components``:

1. ``links``: task ``i`` reads every ``parts``-th reduced bucket file, turns
   each link's keys into 64-bit node ids (a hash of the key), contracts its
   own links to one star per local component (node -> smallest node), and
   writes those edges (both directions, by ``node mod parts``) and its
   reduced rows (by the node of their first key);
2. passes of *large-star* and *small-star* (Kiveris et al., "Connected
   Components in MapReduce and Beyond", 2014), alternating: task ``p``
   reads the edges of the nodes in partition ``p`` and hooks neighbours onto
   the smallest node it sees. A large-star pass whose input is a forest of
   stars centred on their smallest node (every node with a smaller
   neighbour has exactly one neighbour) ends the loop, and leaves per
   partition the label of each leaf: its centre. O(log^2 n) passes at most;
   a handful in practice (the links step already merged each bucket);
3. ``route``: task ``p`` gives the reduced rows of partition ``p`` their
   label (a node with no label is its own) and writes them by label;
4. ``combine``: task ``q`` runs the stage's ``combine`` over the rows of
   partition ``q`` (whole components) and writes the decisions by shard;
5. ``store``: task ``r`` writes the decisions of the shards in partition
   ``r`` (``pipeline.fitstore.store_result``): one writer per shard file.

Two keys hashing alike only merge two components into one partition,
which changes no decision (``combine`` clusters by the keys themselves).
Memory of a task: a partition's edges or rows, or its largest component.
"""

from __future__ import annotations

import numpy as np

from pairforge.manifests import layout, storage
from pairforge.pipeline import batchfile, fitstore, shuffle, taskmem
from pairforge.stages.base import Batch, FitResult, batch_len
from pairforge.stages.common import dedup as dd

#: a safety stop: large-star / small-star converges in O(log^2 n) passes
MAX_PASSES = 200
NODE = "__node"
LABEL = "__label"


def folder(spec, stage):
    return layout.fit_dir(spec.out, stage.name) / "components"


def _file(spec, stage, step: str, task: int):
    return folder(spec, stage) / step / f"{int(task):08d}.parts"


def _read(spec, stage, step: str, p: int, parts: int) -> Batch:
    """Partition ``p`` of every parts file of ``step``, in task order."""
    return shuffle.gather(folder(spec, stage) / step, p, parts)


def node_ids(values) -> np.ndarray:
    """A 64-bit id per value of a link column: blake2b of a key's text, or
    for an integer column (a digest, say) its value through splitmix64's
    finaliser, so that ids spread over the partitions whatever the integers.
    An integer and a key may share an id: that merges two components, which
    changes no decision (see the module doc)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        with np.errstate(over="ignore"):
            z = arr.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))
    return fitstore.key_hashes(dd.str_keys(arr))


def _write_edges(path, u: np.ndarray, v: np.ndarray, parts: int) -> None:
    """The undirected edges ``u - v``, each direction in its source's partition."""
    a = np.concatenate([u, v]).astype(np.uint64)
    b = np.concatenate([v, u]).astype(np.uint64)
    shuffle.write_parts(path, {"u": a, "v": b}, (a % np.uint64(parts)).astype(np.int64), parts)


def _edges(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges sorted by (u, v), without duplicates or self loops."""
    if not batch_len(batch):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    u, v = np.asarray(batch["u"], np.uint64), np.asarray(batch["v"], np.uint64)
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    keep = (u != v) & np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])]
    return u[keep], v[keep]


# ------------------------------------------------------------------ tasks


def _cc_links(task: int, spec, stage, parts: int) -> int:
    with taskmem.measure(spec.out, f"{stage.name}/cc_links"):
        rows = fitstore.read_reduced(fitstore.reduced_files(spec, stage)[task::parts])
        n = batch_len(rows)
        missing = [c for c in stage.link_columns if c not in rows] if n else []
        if missing:
            raise ValueError(f"{stage.name}: link_columns: the reduced rows have no column {missing[0]!r}")
        ha, hb = (node_ids(rows[c]) if n else np.zeros(0, np.uint64) for c in stage.link_columns)
        nodes, inv = np.unique(np.concatenate([ha, hb]), return_inverse=True)
        label = dd.components(inv[:n], inv[n:], len(nodes))  # nodes ascend: the smallest index is the smallest id
        leaf = np.flatnonzero(label != np.arange(len(nodes)))
        _write_edges(_file(spec, stage, "links", task), nodes[leaf], nodes[label[leaf]], parts)
        if n:
            rows[NODE] = ha
        shuffle.write_parts(_file(spec, stage, "rows", task), rows, (ha % np.uint64(parts)).astype(np.int64), parts)
        return n


def _cc_large_star(p: int, spec, stage, parts: int, src: str, dst: str) -> tuple[bool, int]:
    """Every neighbour larger than ``u`` is hooked onto the smallest node of
    ``u``'s neighbourhood. Returns whether the input was a star forest (then
    the labels of partition ``p`` are written) and the edges read."""
    with taskmem.measure(spec.out, f"{stage.name}/cc_large_star"):
        u, v = _edges(_read(spec, stage, src, p, parts))
        first = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
        starts = np.flatnonzero(first)
        centre, smallest = u[starts], v[starts]  # v ascends within a node: its first is its smallest
        degree = np.diff(np.r_[starts, len(u)])
        leaf = smallest < centre
        star = bool(np.all(degree[leaf] == 1))
        if star:
            labels = {NODE: centre[leaf], LABEL: smallest[leaf]}
            storage.write_atomic(
                folder(spec, stage) / "labels" / f"{p:08d}.arrow", batchfile.dumps(labels), fsync=False
            )
        m = np.minimum(smallest, centre)[np.cumsum(first) - 1]
        up = v > u
        _write_edges(_file(spec, stage, dst, p), v[up], m[up], parts)
        return star, len(u)


def _cc_small_star(p: int, spec, stage, parts: int, src: str, dst: str) -> int:
    """At its larger end, every edge's smaller neighbours (and ``u`` itself)
    are hooked onto the smallest of them. Returns the edges read."""
    with taskmem.measure(spec.out, f"{stage.name}/cc_small_star"):
        u, v = _edges(_read(spec, stage, src, p, parts))
        down = v < u
        u, v = u[down], v[down]
        first = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
        m = v[first][np.cumsum(first) - 1]  # the smallest smaller neighbour, below u
        centre = u[first]
        others = v != m
        _write_edges(
            _file(spec, stage, dst, p),
            np.concatenate([v[others], centre]),
            np.concatenate([m[others], m[first]]),
            parts,
        )
        return int(down.sum())


def _cc_route(p: int, spec, stage, parts: int) -> int:
    with taskmem.measure(spec.out, f"{stage.name}/cc_route"):
        rows = _read(spec, stage, "rows", p, parts)
        path = folder(spec, stage) / "labels" / f"{p:08d}.arrow"
        labels = batchfile.loads(path.read_bytes(), str(path)) if path.exists() else {}
        node = np.asarray(rows[NODE], np.uint64) if batch_len(rows) else np.zeros(0, np.uint64)
        label = node.copy()
        if batch_len(labels) and len(node):
            known = np.asarray(labels[NODE], np.uint64)
            order = np.argsort(known)
            known, centre = known[order], np.asarray(labels[LABEL], np.uint64)[order]
            pos = np.minimum(np.searchsorted(known, node), len(known) - 1)
            hit = known[pos] == node
            label[hit] = centre[pos[hit]]
        if batch_len(rows):
            rows[LABEL] = label
        shuffle.write_parts(_file(spec, stage, "route", p), rows, (label % np.uint64(parts)).astype(np.int64), parts)
        return len(node)


def _combine(q: int, spec, stage, parts: int, learned: fitstore.LearnedFiles) -> dict:
    """``combine`` over the whole components of partition ``q``; decisions
    written by shard. Returns its counters and rows."""
    with taskmem.measure(spec.out, f"{stage.name}/combine"):
        rows = _read(spec, stage, "route", q, parts)
        rows = {c: v for c, v in rows.items() if c not in (NODE, LABEL)}
        if not batch_len(rows):
            shuffle.write_parts(_file(spec, stage, "decided", q), {}, np.zeros(0, np.int64), parts)
            return {"rows": 0, "counters": {}}
        result = stage.combine(rows, fitstore.load_learned(spec, stage, learned))
        if result.tables or result.rule is not None:
            raise ValueError(f"{stage.name}: combine per component (link_columns) returns no side tables and no rule")
        dec = result.decisions
        sids = spec.shard_of(dec["key"]) if batch_len(dec) else np.zeros(0, np.int64)
        shuffle.write_parts(_file(spec, stage, "decided", q), dec, sids % parts, parts)
        return {"rows": batch_len(rows), "counters": dict(result.counters)}


def _cc_store(r: int, spec, stage, parts: int) -> dict:
    with taskmem.measure(spec.out, f"{stage.name}/cc_store"):
        dec = _read(spec, stage, "decided", r, parts)
        return fitstore.store_result(spec, stage, FitResult(dec), shards=None)


# ------------------------------------------------------------------ driver


def combine_by_component(launcher, spec, stage, learned: fitstore.LearnedFiles, parts: int) -> tuple[dict, dict]:
    """Run ``stage.combine`` per partition of whole components over the
    reduced bucket files, with what ``learn`` returned (``learned``); store
    the decisions. Returns the counts (as ``fitstore.store_result``) and the
    component passes' figures."""
    base = folder(spec, stage)
    storage.rmtree(base)
    kw = dict(spec=spec, stage=stage, parts=parts)
    launcher.map(_cc_links, list(range(parts)), **kw)
    storage.rmtree(layout.reduced_dir(spec.out, stage.name))
    src, passes = "links", 0
    while True:
        got = launcher.map(_cc_large_star, list(range(parts)), src=src, dst=f"pass{passes:03d}l", **kw)
        storage.rmtree(base / src)
        passes += 1
        if all(star for star, _ in got):
            storage.rmtree(base / f"pass{passes - 1:03d}l")
            break
        if passes >= MAX_PASSES:
            raise RuntimeError(f"{stage.name}: components did not converge in {MAX_PASSES} passes")
        src, dst = f"pass{passes - 1:03d}l", f"pass{passes - 1:03d}s"
        launcher.map(_cc_small_star, list(range(parts)), src=src, dst=dst, **kw)
        storage.rmtree(base / src)
        src = dst
    launcher.map(_cc_route, list(range(parts)), **kw)
    storage.rmtree(base / "rows")
    storage.rmtree(base / "labels")
    combined = launcher.map(_combine, list(range(parts)), learned=learned, **kw)
    storage.rmtree(base / "route")
    stored = launcher.map(_cc_store, list(range(parts)), **kw)
    storage.rmtree(base)
    counts = {"decisions": 0, "dropped": 0, "tables": {}, "counters": {}}
    for c in stored:  # the stored decisions (no side tables: see fit.run_fit)
        fitstore.add_counts(counts, {"decisions": c["decisions"], "dropped": c["dropped"]})
    for c in combined:
        fitstore.add_counts(counts, {"counters": c["counters"]})
    info = {"parts": parts, "passes": passes, "largest_partition_rows": max((c["rows"] for c in combined), default=0)}
    return counts, info
