"""The in-process runner: the phases of ``pipeline.engine`` and the fits of
``pipeline.fit`` on one process, over the same files as the Ray plan. Used
by unit tests and ``runner: local`` jobs.

:func:`fit_result` and :func:`run_global` are the same fit steps on an
in-memory batch, for unit tests of a global stage without a run folder;
:func:`run_global` (and :func:`join_result`, for a result made otherwise)
applies the decisions with the run's own join, the one function that
applies decisions in both runners (``engine.join_decisions``).
"""

from __future__ import annotations

import numpy as np

from pairforge.pipeline import chunks, engine, fitstore
from pairforge.pipeline.engine import RunSpec
from pairforge.pipeline.fit import Launcher
from pairforge.pipeline.resume import RowsTracker
from pairforge.stages.base import (
    Batch,
    FitResult,
    GlobalStage,
    Learned,
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
    prepare = stage.resources().cpu_prepare
    return concat([run_stage_batch(stage, stage.cpu_prepare(c) if prepare else c) for c in chunks])


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
    """The fit's steps over ``rows`` (ok rows, fit columns) in this process,
    as ``pipeline.fit`` runs them over a run's files: ``learn`` on the rows
    with the smallest key hashes (``fitstore.hash_sample``), ``bucket_rows``
    in chunks, grouped by bucket (``fit.Launcher.shuffle``), ``reduce_bucket``,
    ``combine``, and ``decide_rows`` when ``combine`` returned a rule. The
    result holds every decision and table, the counters of both steps summed,
    and the rule."""
    if not batch_len(rows):
        return FitResult()
    rows = take(rows, np.argsort(np.asarray(rows["key"]).astype(str), kind="stable"))
    learned = stage.learn(fitstore.hash_sample(rows, int(stage.sample_rows))) if stage.sample_rows else Learned()
    size = max(stage.resources().batch_size, 1 << 16)
    n = batch_len(rows)
    reduced = Launcher().shuffle(
        lambda i: stage.bucket_rows(take(rows, np.arange(i, min(i + size, n))), learned),
        lambda group: stage.reduce_bucket(group, learned),
        list(range(0, n, size)),
    )
    result = stage.combine(concat([r for r in reduced if batch_len(r)]), learned)
    if result.rule is None:
        return result
    more = stage.decide_rows(rows, result.rule)
    counters = dict(result.counters)
    for name, count in more.counters.items():
        counters[name] = counters.get(name, 0) + count
    return FitResult(
        concat([result.decisions, more.decisions]),
        {**result.tables, **more.tables},
        counters,
        result.rule,
    )


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
    return join_result(stage, batch, fit_result(stage, rows))


def join_result(stage: GlobalStage, batch: Batch, result: FitResult) -> Batch:
    """``batch`` with the decisions of ``result`` (a fit of ``stage``, or one
    step of it: ``decide_rows`` on some rows) applied by the run's own join
    (``engine.join_decisions``); the caller's batch stays as it was."""
    if not batch_len(result.decisions):
        return batch
    spec = RunSpec("", (stage,), ShardStage(), samples_per_shard=1)
    return engine.join_decisions(batch, spec, {stage.name: result.decisions})[0]
