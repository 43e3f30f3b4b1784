"""Resume at the grain of the work in flight: within an input shard, rows
are saved in chunks as they are done, and a resume runs only the rows no
saved chunk holds.

Why: completion marked per input shard lost every shard in flight on a kill
(on 100 nodes of 8 tasks with 10,000-row shards, up to 8M rows of
downloads). A task that runs every per-row stage (``pipeline.plan``'s fused
segment, ``pipeline.local``) cuts its shard into chunks
(:func:`checkpoints`: ``RunSpec.checkpoint_rows`` rows or
``checkpoint_seconds``, whichever comes first) and saves each as a part
(``engine.save_rows``); :func:`pending_input` gives a resumed (or retried)
task the rows no saved part holds (``pipeline.resume.saved_parts``), and the
records of the saved ones, which the driver's tracker counts once. The output does not depend on the chunks:
a shard's rows are sorted by key when it is written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from pairforge.pipeline.engine import RunSpec, read_input
from pairforge.pipeline.resume import records, saved_parts
from pairforge.stages.base import Batch, batch_len, concat, take


def pending_input(spec: RunSpec, shard_id: int, keys=None) -> tuple[Batch, Batch]:
    """The rows of an input shard still to run, and the records of the parts
    it already saved. With ``keys`` (the deferred retry pass, over finished
    shards) exactly those rows, and no records."""
    if keys is not None:
        return read_input(spec, shard_id, keys), records([])
    saved, done = saved_parts(spec.out, shard_id)
    rows = read_input(spec, shard_id)
    if done:
        rows = take(rows, np.array([i for i, k in enumerate(rows["key"]) if str(k) not in done], dtype=np.int64))
    return rows, saved


def checkpoints(spec: RunSpec, rows: Batch, stages, run) -> Iterator[Batch]:
    """``rows`` through ``stages`` (``run(stage, piece)``), piece by piece,
    yielded in chunks of :attr:`RunSpec.checkpoint_rows` rows or of the rows
    done in :attr:`RunSpec.checkpoint_seconds`, whichever comes first: the
    caller saves each, so a kill loses at most the chunk in flight. A piece
    is the first stage's batch (at most a chunk), so the clock is read
    between batches of the slow stage (the download). Stages see pieces,
    never the whole shard: a stage's rows do not depend on their batch."""
    n = batch_len(rows)
    if not n:
        return
    size = stages[0].resources().batch_size if stages else n
    piece = max(1, min(int(size), spec.checkpoint_rows))
    chunk, got, t0 = [], 0, time.monotonic()
    for lo in range(0, n, piece):
        b = take(rows, np.arange(lo, min(lo + piece, n)))
        for st in stages:
            b = run(st, b)
        chunk.append(b)
        got += batch_len(b)
        if got >= spec.checkpoint_rows or time.monotonic() - t0 >= spec.checkpoint_seconds:
            yield concat(chunk)
            chunk, got, t0 = [], 0, time.monotonic()
    if chunk:
        yield concat(chunk)
