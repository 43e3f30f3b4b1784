"""The in-process runner: the same stages and the same pure functions as the
Ray plan, on one process. Used by unit tests and ``runner: local`` jobs."""

from __future__ import annotations

import numpy as np

from stages.base import (
    Batch,
    GlobalStage,
    Stage,
    apply_decisions,
    batch_len,
    concat,
    decisions_from_batch,
    ok_mask,
    run_stage_batch,
    take,
)


def map_stage(stage: Stage, batch: Batch) -> Batch:
    """Run a per-row stage over ``batch`` in chunks of its batch size."""
    n = batch_len(batch)
    size = max(1, stage.resources().batch_size)
    chunks = (take(batch, np.arange(i, min(i + size, n))) for i in range(0, n, size))
    return concat([run_stage_batch(stage, stage.prefetch(c) if stage.has_prefetch() else c) for c in chunks])


def fit_global(stage: GlobalStage, rows: Batch) -> Batch:
    """Compose ``prepare`` -> ``candidates`` -> group -> ``reduce_group`` ->
    ``resolve`` over ``rows`` (already restricted to ok rows and fit columns)."""
    if not batch_len(rows):
        return {}
    stage.prepare(rows)
    size = max(stage.resources().batch_size, 1 << 16)  # candidates are per row: big chunks, fewer calls
    n = batch_len(rows)
    cands = concat([stage.candidates(take(rows, np.arange(i, min(i + size, n)))) for i in range(0, n, size)])
    if not batch_len(cands):
        return stage.resolve({})
    # one reduce call per group, groups in sorted order, rows in candidate order:
    # one stable sort, then each group is a slice (a view, no copy)
    order = np.argsort(cands["group"], kind="stable")
    cands = take(cands, order)
    g = cands["group"]
    starts = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1, [len(g)]])
    reduced = concat(
        [stage.reduce_group({k: v[a:b] for k, v in cands.items()}) for a, b in zip(starts[:-1], starts[1:])]
    )
    return stage.resolve(reduced)


def run_global(stage: GlobalStage, batch: Batch, prior: Batch | None = None) -> Batch:
    """Fit ``stage`` on the ok rows of ``batch`` (plus ``prior`` rows from
    finished shards, which are fitted on but not changed) and apply it."""
    ok = take(batch, np.flatnonzero(ok_mask(batch))) if batch_len(batch) else {}
    rows = {c: ok[c] for c in stage.fit_columns} if ok else {}
    if prior:
        rows = concat([rows, {c: prior[c] for c in stage.fit_columns}])
    decisions = decisions_from_batch(fit_global(stage, rows) or {})
    return stage.finalize(apply_decisions(batch, decisions, stage.name))


def run_local(
    input_paths: list[str],
    stages: list[Stage],
    shard_stage,
    out_dir: str,
    prior: dict[str, Batch] | None = None,
) -> list[dict]:
    """Run every stage in this process over the input shard files and write
    the shards. Same contract as :func:`pipeline.plan.build_and_run`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from pipeline.batches import table_to_batch

    tables = [pq.read_table(p) for p in input_paths]
    batch = table_to_batch(pa.concat_tables(tables, promote_options="permissive")) if tables else {}
    for stage in tqdm(stages, desc="stages", unit="stage", disable=None):
        stage.setup()
        try:
            batch = map_stage(stage, batch)
            if isinstance(stage, GlobalStage) and stage.needs_fit():
                batch = run_global(stage, batch, (prior or {}).get(stage.name))
        finally:
            stage.teardown()
    stats = []
    if not batch_len(batch):
        return stats
    shard_ids = batch["shard_id"]
    for sid in tqdm(np.unique(shard_ids), desc="shards", unit="shard", disable=None):
        rows = take(batch, np.flatnonzero(shard_ids == sid))
        stats.append(shard_stage.write_group(rows, out_dir, int(sid)))
    return stats
