"""The phases of a run as functions over files under ``OUT/_work``, shared by
the in-process runner and the Ray plan (they differ only in who calls them).

1. **rows**: every per-row stage over an input shard (download, filters, the
   per-row part of global stages, models). :func:`save_rows` leaves each
   shard's rows in part files (images included) and, beside them, a parquet
   of the *fit columns* only (key, status, hashes, scores, embeddings): tens
   of bytes a row, in chunks as they are done (``pipeline.chunks``).
   ``pipeline.resume``'s :class:`RowsTracker` marks an input shard finished
   when all its rows are on disk; a killed run resumes at the chunks it was
   on (every mark is read and written there).
2. **fits** (``pipeline.fit``): each global stage reads fit columns, never
   images, and writes its decisions partitioned by shard.
3. **write**: :func:`write_output_shard` joins one shard's parts with that
   shard's decisions, in stage order, and writes the shard.

Why files rather than Ray datasets between the phases: the images flow from
download to their shard once, global stages read a few columns of every row
without materialising the dataset, decisions never travel as a broadcast,
and every phase's output survives the driver. ``OUT`` is a local folder or a
bucket prefix (``manifests.storage``): on a cluster, every node reads and
writes the same ``_work``, and a resume finds its marks there either way.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from pairforge.manifests import layout, storage
from pairforge.manifests.shards import to_arrow, write_shard
from pairforge.manifests.storage import ObjectPath
from pairforge.pipeline import batchfile
from pairforge.pipeline.batches import table_to_batch
from pairforge.pipeline.resume import (
    PART_FIT,
    PART_ROWS,
    checked_name,
    records,
    remove_part,
    rows_mark,
)
from pairforge.stages.base import (
    STATUS_DROPPED,
    STATUS_OK,
    Batch,
    Column,
    GlobalStage,
    Stage,
    batch_len,
    concat,
    stage_columns,
    take,
)

#: fit-file columns every global stage reads, besides its own (``reason``:
#: the deferred retry pass finds its rows by it)
FIT_BASE = ("key", "status", "stage", "reason")


@dataclass(frozen=True)
class RunSpec:
    """What every task of a run needs: small, picklable, O(1) in rows."""

    #: the output folder (a path) or object-storage prefix (``manifests.storage.ObjectPath``)
    out: str | ObjectPath
    stages: tuple[Stage, ...]
    shard_stage: Stage
    samples_per_shard: int
    #: rows of an input shard are saved in chunks of at most this many rows ...
    checkpoint_rows: int = 5000
    #: ... or of the rows done in this many seconds, whichever comes first
    checkpoint_seconds: float = 60.0

    @cached_property
    def positions(self) -> dict[str, int]:
        return {s.name: i for i, s in enumerate(self.stages)}

    @cached_property
    def columns(self) -> dict[str, tuple[str, Column]]:
        return stage_columns(self.stages)

    @cached_property
    def schema(self) -> dict[str, Column]:
        return {name: col for name, (_, col) in self.columns.items()}

    @property
    def fitted(self) -> list[GlobalStage]:
        return [s for s in self.stages if isinstance(s, GlobalStage) and s.needs_fit()]

    @cached_property
    def fit_columns(self) -> tuple[str, ...]:
        cols = list(FIT_BASE)
        for g in self.fitted:
            cols.extend(g.fit_columns)
        return tuple(dict.fromkeys(cols))

    def shard_of(self, keys) -> np.ndarray:
        """The shard id of each key (``{shard:05d}{index:0Wd}``)."""
        w = len(str(self.samples_per_shard - 1))
        return np.array([int(str(k)[:-w]) for k in keys], dtype=np.int64)


def alive_at(rows: Batch, spec: RunSpec, position: int) -> np.ndarray:
    """Rows still alive when the stage at ``position`` runs its fit: ok, or
    rejected by a per-row stage placed after it."""
    status = np.asarray(rows["status"], dtype=object)
    later = np.array([spec.positions.get(str(s), -1) > position for s in rows["stage"]], dtype=bool)
    return (status == STATUS_OK) | ((status != STATUS_OK) & later)


# ------------------------------------------------------------------ rows phase


def read_input(spec: RunSpec, shard_id: int, keys=None) -> Batch:
    """An input shard's rows; with ``keys``, only those rows."""
    rows = table_to_batch(storage.read_parquet(layout.input_shard(spec.out, shard_id)))
    if keys is None:
        return rows
    want = set(map(str, keys))
    return take(rows, np.array([i for i, k in enumerate(rows["key"]) if str(k) in want], dtype=np.int64))


def write_part(folder, name: str, rows: Batch, spec: RunSpec) -> None:
    """Leave ``rows`` in part ``name`` (:data:`PART_NAME`) under ``folder`` (a ``rows_dir``):
    every column exactly (bytes, ragged and object columns round-trip) as
    an Arrow IPC file (``pipeline.batchfile``: reading it runs no code), and
    the run's fit columns beside it as parquet. Writing a part again
    replaces it whole (each file is written atomically)."""
    checked_name(name)
    fit_cols = [c for c in spec.fit_columns if c in rows]
    storage.write_atomic(folder / f"{name}{PART_ROWS}", batchfile.dumps(rows), fsync=False)
    storage.write_parquet(folder / f"{name}{PART_FIT}", to_arrow(rows, fit_cols, spec.schema))


def read_part(folder, name: str) -> Batch:
    """The rows :func:`write_part` left in part ``name`` under ``folder``."""
    path = folder / f"{checked_name(name)}{PART_ROWS}"
    return batchfile.loads(path.read_bytes(), str(path))


def save_rows(batch: Batch, spec: RunSpec) -> Batch:
    """Leave this batch's rows in one part per shard they belong to
    (:func:`write_part`). Returns one record per part."""
    sids = np.asarray(batch["shard_id"]).astype(np.int64) if batch_len(batch) else np.zeros(0, np.int64)
    recs = []
    for sid in np.unique(sids):
        rows = take(batch, np.flatnonzero(sids == sid))
        name = uuid.uuid4().hex
        write_part(layout.rows_dir(spec.out, int(sid)), name, rows, spec)
        recs.append((int(sid), name, rows["status"], rows["stage"]))
    return records(recs)


def read_fit_rows(spec: RunSpec, shard_id: int, columns) -> Batch:
    mark = rows_mark(spec.out, shard_id, images=False)
    if mark is None:
        raise RuntimeError(f"input shard {shard_id} has no finished per-row pass")
    folder = layout.rows_dir(spec.out, shard_id)
    cols = list(dict.fromkeys([*FIT_BASE, *columns]))
    tables = [storage.read_parquet(folder / f"{p}{PART_FIT}", columns=cols) for p in mark["parts"]]
    return table_to_batch(pa.concat_tables(tables)) if tables else {}


# ------------------------------------------------------------------ write phase


def read_decisions(spec: RunSpec, stage: str, shard_id: int) -> Batch:
    path = layout.decisions_parquet(spec.out, stage, shard_id)
    return table_to_batch(storage.read_parquet(path)) if path.exists() else {}


def _reset_later_columns(rows: Batch, idx: np.ndarray, spec: RunSpec, position: int) -> None:
    """Rows a global stage dropped never reached the stages after it: their
    columns get those stages' defaults, as in a run that stopped them there."""
    for name, (owner, col) in spec.columns.items():
        if spec.positions[owner] > position and name in rows:
            rows[name] = rows[name].copy()
            rows[name][idx] = col.defaults(len(idx))


def apply_decisions(rows: Batch, spec: RunSpec, shard_id: int) -> tuple[Batch, dict]:
    """Join one shard's rows with every global stage's decisions for it, in
    stage order. Returns the rows and counters for the shard's stats."""
    return join_decisions(rows, spec, {g.name: read_decisions(spec, g.name, shard_id) for g in spec.fitted})


def join_decisions(rows: Batch, spec: RunSpec, decisions: dict[str, Batch]) -> tuple[Batch, dict]:
    """``rows`` with the decisions of global stages (stage name -> a
    ``FitResult.decisions`` batch) applied in stage order: a decision with a
    reason drops its row if the row is still alive at that stage (columns of
    later stages back to their defaults), and declared columns it carries
    are set. The one join, for a run's shards and for tests of a global
    stage (``pipeline.local.run_global``). Returns the rows and counters."""
    rows = dict(rows)
    n = batch_len(rows)
    where = {str(k): i for i, k in enumerate(rows["key"])}
    survivor_of: dict[str, np.ndarray] = {}
    for g in spec.stages:
        dec = decisions.get(g.name) or {}
        if not batch_len(dec):
            continue
        p = spec.positions[g.name]
        alive = alive_at(rows, spec, p)
        idx = np.array([where.get(str(k), -1) for k in dec["key"]], dtype=np.int64)
        use = np.flatnonzero((idx >= 0) & alive[np.maximum(idx, 0)])
        at = idx[use]
        setcols = [
            c for c in dec if c not in ("key", "reason", "detail", "survivor", "duplicates") and c in spec.schema
        ]
        for c in setcols:
            col = spec.schema[c]
            rows[c] = rows[c].copy() if c in rows else col.defaults(n)
            rows[c][at] = col.conform(dec[c][use])
        reasons = np.asarray(dec["reason"], dtype=object)[use]
        drop = reasons != ""
        if drop.any():
            d = at[drop]
            for c in ("status", "stage", "reason", "detail"):
                rows[c] = rows[c].astype(object, copy=True)
            rows["status"][d] = STATUS_DROPPED
            rows["stage"][d] = g.name
            rows["reason"][d] = reasons[drop]
            details = np.asarray(dec["detail"], dtype=object)[use][drop]
            rows["detail"][d] = [x if isinstance(x, str) else json.dumps(x, sort_keys=True) for x in details]
            _reset_later_columns(rows, d, spec, p)
        if "survivor" in dec:  # per row: how many duplicates name it as their survivor (0: none)
            dups = np.zeros(n, dtype=np.int64)
            is_surv = np.asarray(dec["survivor"], dtype=bool)[use]
            count = np.asarray(dec["duplicates"], dtype=np.int64)[use] if "duplicates" in dec else np.ones(len(use))
            dups[at[is_surv]] = np.maximum(count[is_surv], 1)
            survivor_of[g.name] = dups
    # survivors of a cluster that a later stage dropped: their duplicates are gone too
    lost: dict[str, dict[str, dict[str, int]]] = {}
    for g_name, dups in survivor_of.items():
        p = spec.positions[g_name]
        for i in np.flatnonzero((dups > 0) & (rows["status"] != STATUS_OK)):
            later = str(rows["stage"][i])
            if spec.positions.get(later, -1) > p:
                c = lost.setdefault(g_name, {}).setdefault(later, {"survivors": 0, "duplicates": 0})
                c["survivors"] += 1
                c["duplicates"] += int(dups[i])
    return rows, ({"survivors_dropped_later": lost} if lost else {})


def write_output_shard(spec: RunSpec, shard_id: int) -> dict:
    """Merge one shard's parts, apply the decisions, write the shard, then
    remove its image parts (its fit files stay for a later refit)."""
    mark = rows_mark(spec.out, shard_id)
    if mark is None:
        raise RuntimeError(f"input shard {shard_id}: rows are not on disk; rerun with --resume")
    folder = layout.rows_dir(spec.out, shard_id)
    parts = [read_part(folder, p) for p in mark["parts"]]
    rows, counters = apply_decisions(concat(parts), spec, shard_id)
    stats = write_shard(
        rows,
        spec.out,
        shard_id,
        write_embeddings=spec.shard_stage.config.write_embeddings,
        schema=spec.schema,
        counters=counters,
    )
    for p in mark["parts"]:
        remove_part(folder, p, fit=False)
    return stats
