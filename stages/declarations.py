"""What a stage declares as data: the columns it adds and what one of its
workers needs.

A *batch* is a ``dict[str, numpy.ndarray]`` of equal-length columns (Ray Data's
``batch_format="numpy"``). Strings and bytes are object arrays; fixed-size
vectors (embeddings) are 2-D arrays; ragged per-row arrays (K x 4 boxes,
K x D region features, K may be 0) are object arrays of ndarrays.

Every row carries its identity and fate from the URL list to the output
(:data:`IDENTITY_COLUMNS`):

* ``key``      stable id, ``{shard_id:05d}{index}`` like img2dataset
* ``shard_id`` the input/output shard the row belongs to
* ``status``   ``ok`` while the row is alive, else ``failed`` (could not be
  fetched or decoded) or ``dropped`` (a filter or dedup decided against it);
  the shard writer writes it in img2dataset's words (``success``,
  ``failed_to_download``, ...; ``manifests.shards.written_status``)
* ``stage`` / ``reason`` / ``detail``  which stage rejected it, why (a short
  machine-readable reason) and the values behind the decision (JSON)

Why a module of its own: everything downstream of a stage reads these and
nothing else of it. The shard writer, the rejects, the embeddings files and
the manifest route a column by its declared :class:`Column` (kind, dtype,
shape, store), never by its name or ``ndim``; the Ray adapter sizes a stage's
tasks or actors from its :class:`Resources`, never from the driver's
hardware. Both are importable from ``stages.base`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pairforge.stages.batch import object_array

#: Columns every row has from the reader on.
IDENTITY_COLUMNS = ("key", "shard_id", "status", "stage", "reason", "detail")
#: the ``stage`` of a row the reader rejected (a bound of ``pipeline.inputlimits``)
READ_STAGE = "input"
#: Column holding encoded image bytes (its extension is in ``image_ext``);
#: never written to parquet or rejects.
IMAGE_COLUMN = "image"
#: Prefix of per-stage timing columns (seconds of batch work per row).
TIMING_PREFIX = "__t_"
#: columns a stage's ``cpu_prepare`` hands to its ``process_batch``; never written
SCRATCH_PREFIX = "__pf_"

#: Column kinds. ``scalar``: a number or bool per row; ``string``; ``bytes``
#: (a tar member, never in parquet); ``vector``: a fixed ``shape`` per row
#: (an embedding); ``ragged``: ``(K, *shape)`` per row, K varying (may be 0).
KINDS = ("scalar", "string", "bytes", "vector", "ragged")
#: Where a ``vector`` column is written: ``parquet`` (a fixed-size list
#: column) or ``embeddings`` (``OUT/embeddings/<col>/<col>_S.npy``, float16,
#: clip-retrieval's layout; not in the parquet).
VECTOR_STORES = ("parquet", "embeddings")
#: Where a ``ragged`` column is written: ``parquet`` (a list column) or
#: ``arrays`` (``OUT/arrays/<col>/<col>_S.npy``: the rows' arrays concatenated
#: in the order of ``shards/S.parquet``, with ``<col>_S.offsets.npy``; for
#: region features, too wide for a parquet list). Either may also go in the tar.
RAGGED_STORES = ("parquet", "arrays")


@dataclass(frozen=True)
class Column:
    """One column a stage adds: what it holds and what a row it never saw gets."""

    name: str
    kind: str
    dtype: str = "float32"
    #: ``vector``: the per-row shape, e.g. ``(512,)``; ``ragged``: the shape of
    #: one element, e.g. ``(4,)`` for K x 4 boxes or ``()`` for K labels
    shape: tuple[int, ...] = ()
    #: the value of rows the stage did not process (scalars and strings);
    #: vectors default to zeros, ragged columns to K = 0, bytes to ``None``
    default: Any = None
    #: ``vector``: see :data:`VECTOR_STORES`; ``ragged``: see :data:`RAGGED_STORES`
    store: str = "parquet"
    #: ``ragged`` only: also write each row's array into the tar as ``{key}.{name}.npy``
    in_tar: bool = True
    #: ``scalar`` only: the manifest counts it (rows with a value, their sum,
    #: min, max, and how many are above 0) over every row of the run, kept or not
    summary: bool = False
    #: ``string`` only: ``""`` (or ``None``) means "no value" and is written as null
    #: (parquet, the tar's ``{key}.json``), e.g. ``duplicate_of`` on a kept row
    nullable: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        stores = RAGGED_STORES if self.kind == "ragged" else VECTOR_STORES
        if self.store not in stores:
            raise ValueError(f"column {self.name!r}: store {self.store!r} is not one of {stores}")
        if self.summary and self.kind != "scalar":
            raise ValueError(f"column {self.name!r}: only a scalar column can have a summary")
        if self.kind == "vector" and len(self.shape) != 1:
            raise ValueError(f"column {self.name!r}: a vector needs shape (dim,), got {self.shape}")
        if self.nullable and self.kind != "string":
            raise ValueError(f"column {self.name!r}: only a string column is nullable, not a {self.kind}")

    def defaults(self, n: int) -> np.ndarray:
        """A column of ``n`` rows the stage never saw."""
        if self.kind == "scalar":
            return np.full(n, self.default if self.default is not None else 0, dtype=self.dtype)
        if self.kind == "string":
            return object_array([self.default if self.default is not None else ""] * n)
        if self.kind == "bytes":
            return object_array([None] * n)
        if self.kind == "vector":
            return np.zeros((n, *self.shape), dtype=self.dtype)
        empty = np.zeros((0, *self.shape), dtype=self.dtype)
        return object_array([empty] * n)

    def conform(self, values) -> np.ndarray:
        """``values`` as this column's in-memory form (typed, shaped)."""
        if self.kind == "scalar":
            return np.asarray(values, dtype=self.dtype)
        if self.kind in ("string", "bytes"):
            return values if isinstance(values, np.ndarray) and values.dtype == object else object_array(list(values))
        if self.kind == "vector":
            v = np.asarray(values, dtype=self.dtype) if len(values) else np.zeros((0, *self.shape), self.dtype)
            if v.ndim == 1 and len(v) and v.dtype == object:
                v = np.stack([np.asarray(x, dtype=self.dtype) for x in values])
            return v.reshape(len(values), *self.shape)
        return object_array([np.asarray(x, dtype=self.dtype).reshape(-1, *self.shape) for x in values])

    def to_json(self) -> dict:
        d = {"name": self.name, "kind": self.kind}
        if self.kind in ("scalar", "vector", "ragged"):
            d["dtype"] = self.dtype
        if self.kind in ("vector", "ragged"):
            d["shape"] = list(self.shape)
        if self.kind == "vector" or (self.kind == "ragged" and self.store != "parquet"):
            d["store"] = self.store
        if self.kind in ("scalar", "string") and self.default is not None:
            d["default"] = self.default.item() if isinstance(self.default, np.generic) else self.default
        if self.nullable:
            d["nullable"] = True
        return d


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. Declared by the stage, read by the
    Ray adapter; never guessed from the driver's hardware."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 256
    #: actors in the pool for stages that run on actors (min, max); ignored for tasks
    concurrency: tuple[int, int] = (1, 1)
    #: batches one actor works on at once, on threads of its own (Ray Data's true
    #: multi-threading: the stage must be thread-safe); ignored for tasks
    actor_calls: int = 1
    #: run the stage's ``cpu_prepare`` before ``process_batch`` (under Ray: in plain
    #: CPU tasks ahead of an actor pool); ``False``: the runners never call it
    cpu_prepare: bool = False
    #: bytes of memory one ``cpu_prepare`` task needs (its Ray ``memory`` request,
    #: capped at the cluster's memory per CPU); ``None``: no request
    prepare_memory: int | None = None


def stage_columns(stages) -> dict[str, tuple[str, Column]]:
    """Every declared column of ``stages`` -> (the stage that adds it, its
    declaration). A column declared twice keeps its first declaration."""
    out: dict[str, tuple[str, Column]] = {}
    for st in stages:
        for c in st.outputs():
            out.setdefault(c.name, (st.name, c))
    return out
