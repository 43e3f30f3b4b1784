"""Helpers over batches (``dict[str, numpy.ndarray]`` of equal-length
columns), shared by stages and runners: slicing, concatenating, building new
rows, marking rows rejected. Kept apart from ``stages.base`` (the contract)
so that file stays about what a stage is."""

from __future__ import annotations

import json

import numpy as np

Batch = dict[str, np.ndarray]

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_DROPPED = "dropped"


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
