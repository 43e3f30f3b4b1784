"""What a fit keeps in the work folder and reads back, shared by its steps
(``pipeline.fit``) and the component passes (``pipeline.components``):

* what was learnt (``stages.fitting.Learned``: ``learn``'s, and the rule
  ``combine`` returns for ``decide_rows``), its arrays as ``.npy`` files
  under ``_work/fit/<stage>/learned/<token>/`` and ``.../rule/<token>/``,
  read once per process by each task that needs them, never carried in a
  task argument;
* a fit result stored partitioned by shard: decisions under
  ``_work/fit/<stage>/decisions``, side tables under ``OUT/<table>``;
* the key hash the hash sample and the component ids are made of, and the
  hash sample itself.

Why a module of its own: both the fit's steps and the component passes
need them, and neither imports the other's driver code.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from dataclasses import dataclass, field

import numpy as np

from pairforge.manifests import layout, storage
from pairforge.manifests.shards import to_arrow
from pairforge.pipeline import batchfile
from pairforge.pipeline.engine import RunSpec
from pairforge.stages.base import Batch, FitResult, GlobalStage, Learned, batch_len, concat, take
from pairforge.stages.fitting import ARRAY_NAME


def key_hashes(keys) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "big") for k in keys],
        dtype=np.uint64,
    )


#: this process's arrays of learnt things, read once a fit step (by folder): a learn
#: step's and a rule's at most
_ARRAYS: dict[str, dict[str, np.ndarray]] = {}
_KEEP_FOLDERS = 2
#: the folder a learnt thing's arrays are written to: ``learned`` or ``rule``, a token
_TOKEN = re.compile(r"(learned|rule)/[0-9a-f]{32}")


@dataclass(frozen=True)
class LearnedFiles:
    """A :class:`~stages.fitting.Learned` as fit tasks are handed it: its
    values, and where its arrays were written (``folder``, under
    ``_work/fit/<stage>/``; ``None``: it has none). Small whatever the
    arrays' size: each task reads them itself (:func:`load_learned`)."""

    values: dict = field(default_factory=dict)
    folder: str | None = None
    arrays: tuple[str, ...] = ()


#: what a stage without a ``learn`` step hands its later steps
NOTHING_LEARNED = LearnedFiles()


def store_learned(spec: RunSpec, stage: GlobalStage, learned: Learned, kind: str) -> LearnedFiles:
    """Write ``learned``'s arrays to ``_work/fit/<stage>/<kind>/<token>/``
    as ``.npy`` (numbers only, no pickle); ``kind``: ``learned`` (``learn``'s)
    or ``rule`` (``combine``'s)."""
    if not isinstance(learned, Learned):
        raise TypeError(f"{stage.name}: expected a Learned, got {type(learned).__name__}")
    if not learned.arrays:
        return LearnedFiles(dict(learned.values))
    rel = f"{kind}/{uuid.uuid4().hex}"
    folder = layout.fit_dir(spec.out, stage.name) / rel
    for name, arr in learned.arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        storage.write_atomic(folder / f"{name}.npy", buf.getvalue(), fsync=False)
    return LearnedFiles(dict(learned.values), rel, tuple(sorted(learned.arrays)))


def load_learned(spec: RunSpec, stage: GlobalStage, files: LearnedFiles) -> Learned:
    """The :class:`Learned` :func:`store_learned` wrote, its arrays read
    once per process (``allow_pickle=False``: nothing in the output folder
    is trusted as code)."""
    if files.folder is None:
        return Learned(files.values)
    if not _TOKEN.fullmatch(files.folder):
        raise ValueError(f"{stage.name}: learned folder {files.folder!r}: expected learned/<hex> or rule/<hex>")
    folder = layout.fit_dir(spec.out, stage.name) / files.folder
    key = str(folder)
    if key not in _ARRAYS:
        while len(_ARRAYS) >= _KEEP_FOLDERS:
            _ARRAYS.pop(next(iter(_ARRAYS)))  # the oldest: an earlier fit's
        arrays = {}
        for name in files.arrays:
            if not ARRAY_NAME.fullmatch(str(name)):
                raise ValueError(f"{stage.name}: learned array name {name!r}: expected 1-64 of A-Z a-z 0-9 _")
            arrays[name] = np.load(io.BytesIO((folder / f"{name}.npy").read_bytes()), allow_pickle=False)
        _ARRAYS[key] = arrays
    return Learned(files.values, _ARRAYS[key])


def hash_sample(rows: Batch, limit: int) -> Batch:
    """The ``limit`` rows of ``rows`` with the smallest key hashes (all of
    them when fewer), in key order: ``learn``'s sample, whatever the order
    or the grouping of the rows it is drawn from."""
    if batch_len(rows) > limit:
        rows = take(rows, np.argsort(key_hashes(rows["key"]), kind="stable")[:limit])
    if batch_len(rows):
        rows = take(rows, np.argsort(np.asarray(rows["key"]).astype(str), kind="stable"))
    return rows


def reduced_files(spec: RunSpec, stage: GlobalStage) -> list:
    """The reduced buckets' files of ``stage``, in bucket order (whatever
    order the reducers finished in)."""
    folder = layout.reduced_dir(spec.out, stage.name)
    names = [p.name for p in folder.iterdir() if p.name.endswith(".arrow")] if folder.exists() else []
    return [folder / name for name in sorted(names)]


def read_reduced(paths) -> Batch:
    """The rows of reduced buckets' files, in the order given."""
    return concat([b for b in (batchfile.loads(p.read_bytes(), str(p)) for p in paths) if batch_len(b)])


def add_counts(total: dict, more: dict) -> dict:
    """Add the counts of one step's task (what :func:`store_result` returns,
    or any of its keys) into ``total``, in place; returns ``total``."""
    total["decisions"] += int(more.get("decisions", 0))
    total["dropped"] += int(more.get("dropped", 0))
    for key in ("tables", "counters"):
        for name, n in more.get(key, {}).items():
            total[key][name] = total[key].get(name, 0) + int(n)
    return total


def store_result(spec: RunSpec, stage: GlobalStage, result: FitResult, shards, merge: bool = False) -> dict:
    """Write a fit result partitioned by shard: decisions under
    ``_work/fit/<stage>/decisions``, side tables under ``OUT/<table>``."""
    counts = {"decisions": 0, "dropped": 0, "tables": {}, "counters": dict(result.counters)}
    parts = [("decisions", result.decisions)] + sorted(result.tables.items())
    for table, batch in parts:
        if not batch_len(batch):
            continue
        if table != "decisions" and table not in stage.side_tables():
            raise ValueError(f"{stage.name}: side table {table!r} is not declared in side_tables()")
        link = "key" if table == "decisions" else stage.side_tables()[table][0]
        sids = spec.shard_of(batch[link])
        for sid in np.unique(sids):
            part = take(batch, np.flatnonzero(sids == sid))
            path = (
                layout.decisions_parquet(spec.out, stage.name, int(sid))
                if table == "decisions"
                else layout.side_table_parquet(spec.out, table, int(sid))
            )
            if merge and path.exists():
                from pairforge.pipeline.batches import table_to_batch

                part = concat([table_to_batch(storage.read_parquet(path)), part])
            part = take(part, np.argsort(part[link].astype(str), kind="stable"))
            _write_parquet(path, part, spec)
        if table == "decisions":
            counts["decisions"] += batch_len(batch)
            counts["dropped"] += int(np.sum(np.asarray(batch["reason"], dtype=object) != ""))
        else:
            counts["tables"][table] = counts["tables"].get(table, 0) + batch_len(batch)
    return counts


def _write_parquet(path, batch: Batch, spec: RunSpec) -> None:
    storage.write_parquet(path, to_arrow(batch, list(batch), spec.schema), compression="zstd")
