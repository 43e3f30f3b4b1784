"""A fit's shuffle through files, in plain tasks: rows grouped by ``bucket``
across every input shard, with nothing per shard or per block on the driver.

Why not Ray Data's ``groupby``: its sort shuffle keeps a reference and a
block's metadata on the driver for every (input shard, partition) pair, so
the driver grew with the shards (about 16 KB a shard at 8 partitions, more
with the 200 a cluster gets) and a fit over 1,000 small shards spent most of
its time on per-block overhead. Here:

1. :func:`emit_parts`, one task per input shard: the stage's ``bucket_rows``
   output cut into ``parts`` partitions (``bucket mod parts``), written as
   one *parts file*: the partitions' Arrow IPC files (``pipeline.batchfile``)
   one after the other, then ``parts + 1`` offsets (int64) and a magic tail;
2. :func:`reduce_part`, one task per partition: partition ``p`` of every
   parts file (a ranged read each: only its bytes), in shard order, grouped
   by bucket, each bucket given to ``reduce`` (as the in-process launcher
   does: the same rows, in the same order).

Memory of a task: one shard's emitted rows, or one partition's (the
emitted rows over ``parts``); the driver holds the shard ids and the
results of the reduce calls. Files live under ``_work/fit/<stage>/shuffle``
and are removed when the reduce is done (``run_fit`` clears them too).
"""

from __future__ import annotations

import numpy as np

from pairforge.manifests import layout, storage
from pairforge.pipeline import batchfile, taskmem
from pairforge.stages.base import Batch, batch_len, concat, take

MAGIC = b"PFPARTS1"


def folder(spec, stage):
    return layout.fit_dir(spec.out, stage.name) / "shuffle"


def _name(shard_id: int) -> str:
    return f"{int(shard_id):08d}.parts"


def emit_parts(shard_id: int, emit, kw: dict, parts: int) -> int:
    """Emit one shard's rows (``emit(shard_id, **kw)``) into its parts file;
    returns the rows emitted."""
    with taskmem.measure(kw["spec"].out, f"{kw['stage'].name}/emit_parts"):
        return _emit_parts(shard_id, emit, kw, parts)


def _emit_parts(shard_id: int, emit, kw: dict, parts: int) -> int:
    rows = emit(shard_id, **kw)
    n = batch_len(rows)
    part = np.asarray(rows["bucket"], dtype=np.int64) % parts if n else np.zeros(0, np.int64)
    write_parts(folder(kw["spec"], kw["stage"]) / _name(shard_id), rows, part, parts)
    return n


def write_parts(path, rows: Batch, part: np.ndarray, parts: int) -> None:
    """Write ``rows`` as a parts file: row ``i`` in partition ``part[i]``
    (``0 <= part < parts``), rows of a partition in their order here."""
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    chunks, offsets = [], [0]
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        data = batchfile.dumps(take(rows, order[lo:hi])) if hi > lo else b""
        chunks.append(data)
        offsets.append(offsets[-1] + len(data))
    tail = np.asarray(offsets, dtype="<i8").tobytes() + MAGIC
    storage.write_atomic(path, b"".join(chunks) + tail, fsync=False)


def read_partition(path, p: int, parts: int) -> Batch:
    """Partition ``p`` of a parts file: the footer, then only its bytes."""
    tail = 8 * (parts + 1) + len(MAGIC)
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        if size < tail:
            raise ValueError(f"{path}: not a parts file of {parts} partitions")
        f.seek(size - tail)
        footer = f.read(tail)
        if footer[-len(MAGIC) :] != MAGIC:
            raise ValueError(f"{path}: not a parts file (no {MAGIC!r} tail)")
        offsets = np.frombuffer(footer[: -len(MAGIC)], dtype="<i8")
        lo, hi = int(offsets[p]), int(offsets[p + 1])
        if not 0 <= lo <= hi <= size - tail:
            raise ValueError(f"{path}: partition {p} at bytes {lo}-{hi} is outside the file")
        if hi == lo:
            return {}
        f.seek(lo)
        return batchfile.loads(f.read(hi - lo), f"{path} partition {p}")


def gather(base, p: int, parts: int, names: list[str] | None = None) -> Batch:
    """Partition ``p`` of the parts files ``names`` under ``base`` (default:
    every one there, in name order), in that order."""
    if names is None:
        names = sorted(x.name for x in base.iterdir() if x.name.endswith(".parts")) if base.exists() else []
    return concat([b for b in (read_partition(base / n, p, parts) for n in names) if batch_len(b)])


def reduce_part(p: int, reduce, kw: dict, parts: int, shard_ids: list[int] | None = None) -> list:
    """Partition ``p`` of every shard's parts file, grouped by bucket (buckets
    in order, rows in shard order within one), each bucket through
    ``reduce(rows, **kw)``. Returns the reduce results, in bucket order."""
    with taskmem.measure(kw["spec"].out, f"{kw['stage'].name}/reduce_part"):
        return _reduce_part(p, reduce, kw, parts, shard_ids)


def _reduce_part(p: int, reduce, kw: dict, parts: int, shard_ids: list[int] | None) -> list:
    names = None if shard_ids is None else [_name(s) for s in sorted(shard_ids)]
    rows = gather(folder(kw["spec"], kw["stage"]), p, parts, names)
    if not batch_len(rows):
        return []
    rows = take(rows, np.argsort(np.asarray(rows["bucket"], dtype=np.int64), kind="stable"))
    g = np.asarray(rows["bucket"], dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1, [len(g)]])
    return [reduce({k: v[a:b] for k, v in rows.items()}, **kw) for a, b in zip(starts[:-1], starts[1:])]
