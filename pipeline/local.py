"""The in-process runner: the phases of ``pipeline.engine`` and the fits of
``pipeline.fit`` on one process, over the same files as the Ray plan. Used
by unit tests and ``runner: local`` jobs.

:func:`fit_result` and :func:`run_global` are the same fit steps on an
in-memory batch, for unit tests of a global stage without a run folder;
:func:`run_global` applies the decisions with the run's own join.
"""

from __future__ import annotations

import numpy as np

from pairforge.pipeline import chunks, engine
from pairforge.pipeline.engine import RunSpec
from pairforge.pipeline.fit import key_hashes
from pairforge.pipeline.resume import RowsTracker
from pairforge.stages.base import (
    Batch,
    FitResult,
    GlobalStage,
    Stage,
    batch_len,
    concat,
    ok_mask,
    run_stage_batch,
    take,
)
from pairforge.stages.shard import ShardStage


def map_stage(stage: Stage, batch: Batch) -> Batch:
    """Run a per-row stage over ``batch`` in chunks of its batch size."""
    n = batch_len(batch)
    size = max(1, stage.resources().batch_size)
    chunks = (take(batch, np.arange(i, min(i + size, n))) for i in range(0, n, size))
    return concat([run_stage_batch(stage, stage.cpu_prepare(c) if stage.has_cpu_prepare() else c) for c in chunks])


def run_rows(spec: RunSpec, shard_ids: list[int], tracker: RowsTracker, only: dict | None = None) -> None:
    """The per-row pass, one input shard at a time; each stage set up once
    (the tracker shows the progress). ``only``: per shard, the keys of the
    rows to run."""
    for st in spec.stages:
        st.setup()
    try:
        for sid in shard_ids:
            rows, saved = chunks.pending_input(spec, sid, only[sid] if only else None)
            if batch_len(saved):
                tracker.add(saved)
            for chunk in chunks.checkpoints(spec, rows, spec.stages, map_stage):
                tracker.add(engine.save_rows(chunk, spec))
    finally:
        for st in spec.stages:
            st.teardown()


def write_shards(spec: RunSpec, shard_ids: list[int]) -> list[dict]:
    return [engine.write_output_shard(spec, sid) for sid in shard_ids]


# ------------------------------------------------------------ in-memory fits


def fit_result(stage: GlobalStage, rows: Batch) -> FitResult:
    """``learn`` (on the rows with the smallest key hashes, like a run) ->
    ``bucket_rows`` -> group -> ``reduce_bucket`` -> ``combine`` (->
    ``decide_rows``) over ``rows`` (ok rows, fit columns)."""
    if not batch_len(rows):
        return FitResult()
    rows = take(rows, np.argsort(np.asarray(rows["key"]).astype(str), kind="stable"))
    if stage.sample_rows:
        pick = np.sort(np.argsort(key_hashes(rows["key"]), kind="stable")[: int(stage.sample_rows)])
        stage.learn(take(rows, pick))
    size = max(stage.resources().batch_size, 1 << 16)
    n = batch_len(rows)
    cands = concat([stage.bucket_rows(take(rows, np.arange(i, min(i + size, n)))) for i in range(0, n, size)])
    reduced = []
    if batch_len(cands):
        cands = take(cands, np.argsort(cands["bucket"], kind="stable"))
        g = cands["bucket"]
        starts = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1, [len(g)]])
        reduced = [stage.reduce_bucket({k: v[a:b] for k, v in cands.items()}) for a, b in zip(starts[:-1], starts[1:])]
    result = stage.combine(concat([r for r in reduced if batch_len(r)]))
    if stage.has_decide_rows():
        more = stage.decide_rows(rows)
        result = FitResult(concat([result.decisions, more.decisions]), {**result.tables, **more.tables})
    return result


def fit_global(stage: GlobalStage, rows: Batch) -> Batch:
    """The rows ``stage`` drops (``key``, ``reason``, ``detail``, columns), by key."""
    dec = fit_result(stage, rows).decisions
    if not batch_len(dec):
        return {}
    keep = np.flatnonzero(np.asarray(dec["reason"], dtype=object) != "")
    return {c: v[keep] for c, v in dec.items() if c != "survivor"}


def run_global(stage: GlobalStage, batch: Batch) -> Batch:
    """Fit ``stage`` on the ok rows of ``batch`` and apply its decisions with
    the run's own join (``engine.join_decisions``); the caller's batch stays
    as it was."""
    ok = take(batch, np.flatnonzero(ok_mask(batch))) if batch_len(batch) else {}
    rows = {c: ok[c] for c in stage.fit_columns} if ok else {}
    dec = fit_result(stage, rows).decisions
    if not batch_len(dec):
        return batch
    spec = RunSpec("", (stage,), ShardStage(), samples_per_shard=1)
    return engine.join_decisions(batch, spec, {stage.name: dec})[0]
