"""Running a stage over a batch: the stage sees only the rows still ``ok``;
the others pass through with its declared columns at their defaults, in
their order. Both runners (``pipeline.local`` in process, ``pipeline.plan``
on Ray) and a user's own ``ray.data`` pipeline (``pipeline.raymap``) call
:func:`run_stage_batch`, so a stage behaves the same under each.

Why a module of its own: this is the one place where a stage's failure
becomes an error naming the stage and the row (:class:`StageError`), and
where a stage's output is conformed to what it declares; the stage contract
(``stages.base``) re-exports it. The stage is any object with ``name``,
``outputs()`` and ``process_batch()`` (a :class:`~stages.base.Stage`): this
module does not import ``stages.base``, which imports it.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from pairforge.stages.batch import Batch, batch_len, object_array, ok_mask, take
from pairforge.stages.declarations import SCRATCH_PREFIX, TIMING_PREFIX, Column


class RunsBatches(Protocol):
    """What :func:`run_stage_batch` needs of a stage (``stages.base.Stage`` has it)."""

    name: str

    def outputs(self) -> tuple[Column, ...]: ...

    def process_batch(self, batch: Batch) -> Batch: ...


def run_stage_batch(stage: RunsBatches, batch: Batch) -> Batch:
    """Apply ``stage`` to the ok rows of ``batch``; other rows pass through
    with the stage's declared columns set to their defaults. Row order is
    kept. Also records the stage's time per row in ``__t_<stage>``."""
    n = batch_len(batch)
    t0 = time.perf_counter()
    ok = ok_mask(batch) if n else np.zeros(0, dtype=bool)
    cols = stage.outputs()
    if ok.all():
        out = _process(stage, dict(batch)) if n else dict(batch)
    elif not ok.any():
        out = dict(batch)
    else:
        done = _process(stage, take(batch, np.flatnonzero(ok)))
        rest = take(batch, np.flatnonzero(~ok))
        out = _merge(done, rest, ok, cols)
    for c in cols:
        out[c.name] = c.conform(out[c.name]) if c.name in out else c.defaults(n)
    for col in [c for c in out if c.startswith(SCRATCH_PREFIX)]:
        del out[col]
    dt = time.perf_counter() - t0
    out[TIMING_PREFIX + stage.name] = np.full(n, dt / max(n, 1), dtype=np.float64)
    return out


class StageError(RuntimeError):
    """A stage raised instead of rejecting a row: names the stage and the
    first row that fails alone (``key`` is ``None`` when none does)."""

    def __init__(self, stage: str, key, error: str, trace: str = ""):
        super().__init__(stage, key, error, trace)
        self.stage, self.key, self.error, self.trace = stage, key, error, trace

    def __str__(self) -> str:
        where = f"row {self.key}" if self.key is not None else "a batch (no single row fails alone)"
        return f"stage {self.stage} failed on {where}: {self.error}"


def _process(stage: RunsBatches, batch: Batch) -> Batch:
    try:
        return stage.process_batch(batch)
    except Exception as e:  # noqa: BLE001 - reported with the row that causes it
        import traceback

        trace = traceback.format_exc()
        key = None
        for i in range(batch_len(batch)):  # only on failure: find the row that fails alone
            try:
                stage.process_batch(take(batch, np.array([i])))
            except Exception:  # noqa: BLE001
                key = str(batch["key"][i])
                break
        raise StageError(stage.name, key, f"{type(e).__name__}: {e}", trace) from e


def _merge(done: Batch, rest: Batch, ok: np.ndarray, columns: tuple[Column, ...]) -> Batch:
    n = len(ok)
    declared = {c.name: c for c in columns}
    out: Batch = {}
    ok_idx, rest_idx = np.flatnonzero(ok), np.flatnonzero(~ok)
    for col, dv in done.items():
        rv = rest.get(col)
        if col in declared:
            c = declared[col]
            dv = c.conform(dv)
            rv = c.defaults(len(rest_idx)) if rv is None else c.conform(rv)
        elif rv is None:
            rv = object_array([None] * len(rest_idx))
        if dv.dtype != object and rv.dtype != object and dv.shape[1:] == rv.shape[1:]:
            col_out = np.empty((n,) + dv.shape[1:], dtype=np.result_type(dv.dtype, rv.dtype))
        else:
            col_out = np.empty(n, dtype=object)
            dv, rv = object_array(list(dv)), object_array(list(rv))
        col_out[ok_idx] = dv
        col_out[rest_idx] = rv
        out[col] = col_out
    return out
