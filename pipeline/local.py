"""The in-process runner: the same stages and the same pure functions as the
Ray plan, on one process. Used by unit tests and ``runner: local`` jobs."""

from __future__ import annotations

from collections import defaultdict

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
    return concat([run_stage_batch(stage, take(batch, np.arange(i, min(i + size, n)))) for i in range(0, n, size)])


def fit_global(stage: GlobalStage, rows: Batch) -> Batch:
    """Compose ``prepare`` -> ``candidates`` -> group -> ``reduce_group`` ->
    ``resolve`` over ``rows`` (already restricted to ok rows and fit columns)."""
    if not batch_len(rows):
        return {}
    stage.prepare(rows)
    size = max(1, stage.resources().batch_size)
    n = batch_len(rows)
    cands = concat([stage.candidates(take(rows, np.arange(i, min(i + size, n)))) for i in range(0, n, size)])
    if not batch_len(cands):
        return stage.resolve({})
    groups: dict = defaultdict(list)
    for i, g in enumerate(cands["group"]):
        groups[g.item() if isinstance(g, np.generic) else g].append(i)
    reduced = concat([stage.reduce_group(take(cands, np.asarray(idx))) for _, idx in sorted(groups.items())])
    return stage.resolve(reduced)


def run_global(stage: GlobalStage, batch: Batch, prior: Batch | None = None) -> Batch:
    """Fit ``stage`` on the ok rows of ``batch`` (plus ``prior`` rows from
    finished shards, which are fitted on but not changed) and apply it."""
    ok = take(batch, np.flatnonzero(ok_mask(batch))) if batch_len(batch) else {}
    rows = {c: ok[c] for c in stage.fit_columns} if ok else {}
    if prior:
        rows = concat([rows, {c: prior[c] for c in stage.fit_columns}])
    decisions = decisions_from_batch(fit_global(stage, rows) or {})
    return apply_decisions(batch, decisions, stage.name)
