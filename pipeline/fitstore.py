"""What a fit keeps in the work folder and reads back, shared by its steps
(``pipeline.fit``) and the component passes (``pipeline.components``):

* learned arrays (``GlobalStage.learned_arrays``) as ``.npy`` files under
  ``_work/fit/<stage>/learned/<token>/``, read once per process by each task
  that needs them, never carried in a task argument;
* a fit result stored partitioned by shard: decisions under
  ``_work/fit/<stage>/decisions``, side tables under ``OUT/<table>``;
* the key hash the hash sample and the component ids are made of.

Why a module of its own: both the fit's steps and the component passes
need them, and neither imports the other's driver code.
"""

from __future__ import annotations

import copy
import hashlib
import io
import re
import uuid

import numpy as np

from pairforge.manifests import layout, storage
from pairforge.manifests.shards import to_arrow
from pairforge.pipeline import batchfile
from pairforge.pipeline.engine import RunSpec
from pairforge.stages.base import Batch, FitResult, GlobalStage, batch_len, concat, take


def key_hashes(keys) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "big") for k in keys],
        dtype=np.uint64,
    )


#: a learned array's name (a file name under ``_work/fit/<stage>/learned/<token>/``)
LEARNED_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
#: this process's learned arrays, read once a fit (by folder)
_LEARNED: dict[str, dict[str, np.ndarray]] = {}


def learned_folder(spec: RunSpec, stage: GlobalStage, token: str):
    return layout.fit_dir(spec.out, stage.name) / "learned" / token


def save_learned(spec: RunSpec, stage: GlobalStage) -> None:
    """Write what ``learn`` fitted that grows with the data
    (``GlobalStage.learned_arrays``) to the work folder and drop it from the
    stage, which then names the folder: later steps' tasks read the arrays
    from there (:func:`with_learned`), the stage they get stays small."""
    arrays = stage.learned_arrays()
    if not arrays:
        return
    token = uuid.uuid4().hex
    folder = learned_folder(spec, stage, token)
    for name, arr in arrays.items():
        if not LEARNED_NAME.fullmatch(name):
            raise ValueError(f"{stage.name}: learned array name {name!r}: expected 1-64 of A-Z a-z 0-9 _")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        storage.write_atomic(folder / f"{name}.npy", buf.getvalue(), fsync=False)
    stage.use_learned(None)
    stage.__dict__["_learned"] = (token, tuple(sorted(arrays)))


def with_learned(spec: RunSpec, stage: GlobalStage) -> GlobalStage:
    """A copy of ``stage`` holding its learned arrays, read from the work
    folder once per process and fit (numbers only: ``allow_pickle=False``);
    the caller's stage stays small (in process, it is the driver's)."""
    got = stage.__dict__.get("_learned")
    if got is None:
        return stage
    stage = copy.copy(stage)
    token, names = got
    folder = learned_folder(spec, stage, token)
    if str(folder) not in _LEARNED:
        _LEARNED.clear()  # the arrays of one fit at a time
        _LEARNED[str(folder)] = {
            n: np.load(io.BytesIO((folder / f"{_checked(n)}.npy").read_bytes()), allow_pickle=False) for n in names
        }
    stage.use_learned(_LEARNED[str(folder)])
    return stage


def _checked(name: str) -> str:
    if not LEARNED_NAME.fullmatch(str(name)):
        raise ValueError(f"learned array name {name!r}: expected 1-64 of A-Z a-z 0-9 _")
    return name


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
