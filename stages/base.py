"""The stage contract shared by every stage and by both runners.

A *batch* is a ``dict[str, numpy.ndarray]`` of equal-length columns (Ray Data's
``batch_format="numpy"``). Strings and bytes are object arrays; fixed-size
vectors (embeddings) are 2-D float arrays.

Every row carries its identity and fate from the URL list to the output:

* ``key``      stable id, ``{shard_id:05d}{index}`` like img2dataset
* ``shard_id`` the input/output shard the row belongs to
* ``status``   ``ok`` while the row is alive, else ``failed`` (could not be
  fetched or decoded) or ``dropped`` (a filter or dedup decided against it)
* ``stage`` / ``reason`` / ``detail``  which stage rejected it, why (a short
  machine-readable reason) and the values behind the decision (JSON)

Stages never import ``ray`` and never import each other. A stage sees only the
rows that are still ``ok``; :func:`run_stage_batch` passes the others through.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Batch = dict[str, np.ndarray]

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_DROPPED = "dropped"

#: Columns every row has from the reader on.
IDENTITY_COLUMNS = ("key", "shard_id", "status", "stage", "reason", "detail")
#: Column holding encoded image bytes (its extension is in ``image_ext``);
#: never written to parquet or rejects.
IMAGE_COLUMN = "image"
#: Prefix of per-stage timing columns (seconds of batch work per row).
TIMING_PREFIX = "__t_"
#: columns a stage's ``prefetch`` hands to its ``process_batch``; never written
PREFETCH_PREFIX = "__pf_"


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. Declared by the stage, read by the
    Ray adapter; never guessed from the driver's hardware."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 256
    #: actors in the pool for stateful stages (min, max); ignored for tasks
    concurrency: tuple[int, int] = (1, 1)


class Stage:
    """A per-row stage: ``process_batch`` maps a batch of ok rows to a batch of
    the same rows (same order, same length), adding columns and possibly
    marking rows failed/dropped with :func:`reject`."""

    name: ClassVar[str] = ""
    #: ``True`` when ``setup`` loads heavy state (a model): run as an actor pool
    stateful: ClassVar[bool] = False

    def __init__(self, config: Any):
        self.config = config

    def resources(self) -> Resources:
        return Resources()

    def setup(self) -> None:
        """Load heavy state once per worker (models, clients)."""

    def teardown(self) -> None:
        """Release what ``setup`` took."""

    def prefetch(self, batch: Batch) -> Batch:
        """Optional CPU work that needs none of ``setup``'s state (decoding,
        tokenising), for a stateful stage: the Ray plan runs it in plain CPU
        tasks ahead of the actor pool, so the actors (one per GPU share)
        keep to the accelerator. It adds columns named ``PREFETCH_PREFIX*``
        for ``process_batch`` to read; they are dropped after it. Rows in any
        status reach it and it must not fail on them. Default: nothing."""
        return batch

    def has_prefetch(self) -> bool:
        return type(self).prefetch is not Stage.prefetch

    def process_batch(self, batch: Batch) -> Batch:
        raise NotImplementedError

    #: columns this stage adds, with the value non-ok rows get
    def output_defaults(self) -> dict[str, Any]:
        return {}


class GlobalStage(Stage):
    """A stage whose decision needs the whole dataset (dedup, top-fraction).

    It runs in three steps, each a pure function, so the in-process runner and
    the Ray runner compose the same code:

    1. ``process_batch``: per-row work (hashing, scoring), as any stage.
    2. ``candidates(batch)``: from the ``fit_columns`` of ok rows, emit rows
       with a ``group`` column; rows sharing a group meet in ``reduce_group``
       (the Ray runner groups them with a shuffle).
    3. ``resolve(reduced)``: from all reduced rows (small: candidate pairs,
       histograms) return *decisions*: a batch with ``key``, ``reason``,
       ``detail`` and any of ``output_defaults`` columns for the rows to drop.
    4. ``finalize(batch)``: a per-row pass after the decisions are applied,
       for fits whose result is a rule rather than a list of keys (the
       top-fraction cut). Default: the batch as it is.
    """

    fit_columns: ClassVar[tuple[str, ...]] = ("key",)

    def needs_fit(self) -> bool:
        """Whether this configuration needs the global pass at all (a
        threshold-only clip_score does not). Default: yes."""
        return True

    def prepare(self, sample: Batch) -> None:
        """Optional: fit state on a sample of fit rows before ``candidates``
        (k-means centroids). Default: nothing."""

    def candidates(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def reduce_group(self, group: Batch) -> Batch:
        raise NotImplementedError

    def resolve(self, reduced: Batch) -> Batch:
        raise NotImplementedError

    def finalize(self, batch: Batch) -> Batch:
        return batch


# ----------------------------------------------------------------- batch helpers


def batch_len(batch: Batch) -> int:
    for v in batch.values():
        return len(v)
    return 0


def take(batch: Batch, idx: np.ndarray) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


def object_array(values) -> np.ndarray:
    """An object array that never turns a list of equal-length sequences into
    a 2-D array (numpy would, for bytes of equal length it would not)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def fresh_rows(keys, shard_id=0, **columns) -> Batch:
    """A batch of new ok rows: ``keys``, their ``shard_id`` (one for all, or
    one per row), the empty status columns, then ``columns`` as given."""
    n = len(keys)
    return {
        "key": object_array(list(keys)),
        "shard_id": np.broadcast_to(np.asarray(shard_id, dtype=np.int64), (n,)).copy(),
        "status": object_array([STATUS_OK] * n),
        "stage": object_array([""] * n),
        "reason": object_array([""] * n),
        "detail": object_array([""] * n),
        **columns,
    }


def default_column(value: Any, n: int, like: np.ndarray | None = None) -> np.ndarray:
    """A column of ``n`` copies of ``value``, shaped like ``like`` if given."""
    if like is not None and like.ndim > 1:
        return np.zeros((n,) + like.shape[1:], dtype=like.dtype)
    if like is not None and like.dtype != object:
        return np.full(n, value, dtype=like.dtype)
    if isinstance(value, np.ndarray) and value.ndim >= 1 and value.dtype != object:
        return np.repeat(value[None], n, axis=0)  # a vector default (an embedding) makes a 2-D column
    if isinstance(value, (np.generic, bool, int, float)):
        # typed, so a batch of only-default rows has the dtype of the stage's own
        # output (a Ray block of them must not turn a float32 column float64)
        return np.full(n, value)
    return object_array([value] * n)


def concat(batches: list[Batch]) -> Batch:
    batches = [b for b in batches if b and batch_len(b)]
    if not batches:
        return {}
    cols = list(batches[0])
    out = {}
    for c in cols:
        parts = [b[c] for b in batches]
        if all(p.dtype != object for p in parts):
            out[c] = np.concatenate(parts)
        else:
            out[c] = object_array([x for p in parts for x in p])
    return out


def reject(batch: Batch, mask: np.ndarray, stage: str, reasons, details, status: str = STATUS_DROPPED) -> None:
    """Mark rows under ``mask`` as rejected in place. ``reasons`` and
    ``details`` are scalars or per-row sequences over the masked rows;
    a detail is a dict (stored as JSON)."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return
    if isinstance(reasons, str):
        reasons = [reasons] * len(idx)
    if isinstance(details, dict):
        details = [details] * len(idx)
    for col in ("status", "stage", "reason", "detail"):
        batch[col] = batch[col].astype(object, copy=True)
    for j, i in enumerate(idx):
        batch["status"][i] = status
        batch["stage"][i] = stage
        batch["reason"][i] = reasons[j]
        batch["detail"][i] = json.dumps(details[j], sort_keys=True, default=_json_default)


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def ok_mask(batch: Batch) -> np.ndarray:
    return batch["status"] == STATUS_OK


def run_stage_batch(stage: Stage, batch: Batch) -> Batch:
    """Apply ``stage`` to the ok rows of ``batch``; other rows pass through
    with the stage's new columns set to their defaults. Row order is kept.
    Also records the stage's time per row in ``__t_<stage>``."""
    n = batch_len(batch)
    t0 = time.perf_counter()
    ok = ok_mask(batch)
    if ok.all():
        out = stage.process_batch(dict(batch)) if n else dict(batch)
    elif not ok.any():
        out = dict(batch)
    else:
        done = stage.process_batch(take(batch, np.flatnonzero(ok)))
        rest = take(batch, np.flatnonzero(~ok))
        out = _merge(done, rest, ok, stage.output_defaults())
    _fill_missing(out, stage.output_defaults(), n)
    for col in [c for c in out if c.startswith(PREFETCH_PREFIX)]:
        del out[col]
    dt = time.perf_counter() - t0
    out[TIMING_PREFIX + stage.name] = np.full(n, dt / max(n, 1), dtype=np.float64)
    return out


def _fill_missing(batch: Batch, defaults: dict[str, Any], n: int) -> None:
    for col, value in defaults.items():
        if col not in batch:
            batch[col] = default_column(value, n)


def _merge(done: Batch, rest: Batch, ok: np.ndarray, defaults: dict[str, Any]) -> Batch:
    n = len(ok)
    out: Batch = {}
    ok_idx, rest_idx = np.flatnonzero(ok), np.flatnonzero(~ok)
    for col, dv in done.items():
        rv = rest.get(col)
        if rv is None:
            rv = default_column(defaults.get(col), len(rest_idx), like=dv)
        if dv.dtype != object and rv.dtype != object and dv.shape[1:] == rv.shape[1:]:
            col_out = np.empty((n,) + dv.shape[1:], dtype=np.result_type(dv.dtype, rv.dtype))
        else:
            col_out = np.empty(n, dtype=object)
            dv, rv = object_array(list(dv)), object_array(list(rv))
        col_out[ok_idx] = dv
        col_out[rest_idx] = rv
        out[col] = col_out
    return out


def apply_decisions(batch: Batch, decisions: dict[str, dict], stage: str) -> Batch:
    """Drop the ok rows named in ``decisions`` (key -> {reason, detail, extra
    columns}) as rejected by ``stage``. Used by both runners after ``resolve``."""
    keys = batch["key"]
    hit = np.array([k in decisions for k in keys], dtype=bool) & ok_mask(batch)
    if not hit.any():
        return batch
    batch = dict(batch)
    idx = np.flatnonzero(hit)
    reasons = [decisions[keys[i]]["reason"] for i in idx]
    details = [decisions[keys[i]]["detail"] for i in idx]
    reject(batch, hit, stage, reasons, details)
    for i in idx:
        for col, value in decisions[keys[i]].get("columns", {}).items():
            if col in batch:
                if batch[col].dtype != object:
                    batch[col] = batch[col].astype(object)
                batch[col][i] = value
    return batch


def decisions_from_batch(resolved: Batch) -> dict[str, dict]:
    """Turn ``resolve``'s output batch into the lookup ``apply_decisions`` uses.
    Columns other than key/reason/detail become per-row column values."""
    out = {}
    extra = [c for c in resolved if c not in ("key", "reason", "detail")]
    for i in range(batch_len(resolved)):
        d = resolved["detail"][i]
        out[str(resolved["key"][i])] = {
            "reason": str(resolved["reason"][i]),
            "detail": json.loads(d) if isinstance(d, str) else d,
            "columns": {c: _py(resolved[c][i]) for c in extra},
        }
    return out


def _py(v):
    return v.item() if isinstance(v, np.generic) else v
