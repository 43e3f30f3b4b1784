"""The Ray Data plan: the stage list as one streaming Ray Data pipeline.

* a stateless stage -> ``map_batches`` with a function (Ray tasks)
* a stateful stage (a model in ``setup``) -> ``map_batches`` with a callable
  class: an actor pool sized by the stage's declared ``Resources``, with the
  actor class named after the stage so the Ray dashboard reads well
* a global stage -> its per-row part as above, then the dataset is
  materialised once and the fit runs as Ray Data ops:
  ``map_batches(candidates) -> groupby(group).map_groups(reduce_group)``;
  only the reduced rows (pairs, histograms) reach the driver for ``resolve``
* the shard stage -> ``groupby(shard_id).map_groups(write)``: each shard is
  written by one task, rows sorted by key, so output bytes are deterministic
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from manifests import layout
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

#: rows of fit columns the driver samples for ``GlobalStage.prepare``
PREPARE_SAMPLE_ROWS = 100_000

_TASK_STAGES: dict[tuple, Stage] = {}


def _run_task_stage(batch: Batch, stage: Stage) -> Batch:
    # Stateless stages still get one ``setup`` per worker process: the stage
    # arrives pickled with every task, so cache it by class and config.
    key = (type(stage).__qualname__, stage.config)
    st = _TASK_STAGES.get(key)
    if st is None:
        st = _TASK_STAGES[key] = stage
        st.setup()
    return run_stage_batch(st, batch)


class _StageActor:
    def __init__(self, stage_cls: type[Stage], config: Any):
        self.stage = stage_cls(config)
        self.stage.setup()

    def __call__(self, batch: Batch) -> Batch:
        return run_stage_batch(self.stage, batch)


def _actor_class(stage: Stage) -> type:
    title = "".join(p.title() for p in stage.name.split("_"))
    return type(f"{title}Actor", (_StageActor,), {"__module__": __name__})


def _prefetch(batch: Batch, stage: Stage) -> Batch:
    return stage.prefetch(batch)


def map_stage(ds: "ray.data.Dataset", stage: Stage) -> "ray.data.Dataset":
    res = stage.resources()
    common = dict(batch_format="numpy", batch_size=res.batch_size, zero_copy_batch=False)
    if stage.stateful:
        lo, hi = res.concurrency
        if stage.has_prefetch():  # CPU tasks ahead of the actors
            ds = ds.map_batches(_prefetch, fn_kwargs={"stage": stage}, num_cpus=1, **common)
        return ds.map_batches(
            _actor_class(stage),
            fn_constructor_kwargs={"stage_cls": type(stage), "config": stage.config},
            concurrency=(lo, hi) if hi > lo else lo,
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus or None,
            **common,
        )
    return ds.map_batches(
        _run_task_stage, fn_kwargs={"stage": stage}, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None, **common
    )


# ------------------------------------------------------------------ global fit


def _fit_rows(batch: Batch, columns: tuple[str, ...]) -> Batch:
    idx = np.flatnonzero(ok_mask(batch))
    return {c: batch[c][idx] for c in columns}


def _candidates(batch: Batch, stage: GlobalStage) -> Batch:
    out = stage.candidates(batch) if batch_len(batch) else {}
    return out if batch_len(out) else {"group": np.zeros(0, dtype=np.int64)}


def _reduce(group: Batch, stage: GlobalStage) -> Batch:
    return stage.reduce_group(group)


def fit_global_ray(stage: GlobalStage, rows: "ray.data.Dataset") -> Batch:
    """Fit ``stage`` on ``rows`` (ok rows, fit columns only) with Ray Data and
    return its decisions batch. Same calls as :func:`pipeline.local.fit_global`."""
    sample = _prepare_sample(rows, PREPARE_SAMPLE_ROWS)
    if not batch_len(sample):
        return {}
    stage.prepare(sample)
    res = stage.resources()
    cands = rows.map_batches(
        _candidates, fn_kwargs={"stage": stage}, batch_format="numpy", batch_size=max(res.batch_size, 4096)
    )
    reduced = cands.groupby("group").map_groups(_reduce, fn_kwargs={"stage": stage}, batch_format="numpy")
    parts = [b for b in reduced.iter_batches(batch_format="numpy", batch_size=None) if batch_len(b)]
    return stage.resolve(concat(parts))


def _key_hashes(keys: np.ndarray) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "big") for k in keys],
                    dtype=np.uint64)  # fmt: skip


def _below(batch: Batch, cut: int) -> Batch:
    return take(batch, np.flatnonzero(_key_hashes(batch["key"]) < np.uint64(cut)))


def _prepare_sample(rows: "ray.data.Dataset", limit: int) -> Batch:
    """At most ``limit`` rows for ``prepare``, chosen by a hash of their key
    (the same rows whatever the block order or cluster size), in key order."""
    n = rows.count()
    if n > limit:  # a hash cut keeps about 1.2x the limit; the smallest hashes are exact
        cut = min(2**64 - 1, int(2**64 * min(1.0, 1.2 * limit / n)))
        rows = rows.map_batches(_below, fn_kwargs={"cut": cut}, batch_format="numpy")
    sample = concat(list(rows.iter_batches(batch_format="numpy", batch_size=None)))
    if not batch_len(sample):
        return {}
    if batch_len(sample) > limit:
        sample = take(sample, np.sort(np.argsort(_key_hashes(sample["key"]), kind="stable")[:limit]))
    return take(sample, np.argsort(sample["key"].astype(str), kind="stable"))


def _apply(batch: Batch, decisions: dict, stage_name: str, finalizer: GlobalStage | None) -> Batch:
    out = apply_decisions(batch, decisions, stage_name)
    return finalizer.finalize(out) if finalizer is not None else out


def run_global_ray(
    ds: "ray.data.Dataset", stage: GlobalStage, prior: "ray.data.Dataset | None" = None
) -> "ray.data.Dataset":
    """Materialise ``ds`` (the fit and the apply both read it), fit, apply."""
    ds = ds.materialize()
    rows = ds.map_batches(_fit_rows, fn_kwargs={"columns": stage.fit_columns}, batch_format="numpy")
    if prior is not None:
        rows = rows.union(prior)
    decisions = decisions_from_batch(fit_global_ray(stage, rows) or {})
    # the stage (its fit state) travels to the workers only when it has a per-row pass
    finalizer = stage if type(stage).finalize is not GlobalStage.finalize else None
    if not decisions and finalizer is None:
        return ds
    return ds.map_batches(
        _apply,
        fn_kwargs={"decisions": decisions, "stage_name": stage.name, "finalizer": finalizer},
        batch_format="numpy",
        zero_copy_batch=False,
    )


# ------------------------------------------------------------------ whole plan


def _read_shard_file(batch: dict) -> "pa.Table":
    import pyarrow.parquet as pq

    return pq.read_table(str(batch["path"][0]))


def read_input_shards(paths: list[str]) -> "ray.data.Dataset":
    """One block per input shard file, read by its own task as the plan
    streams. (``read_parquet`` coalesces small files into few read tasks:
    on Ray 2.60 a few thousand URLs became one block, and one download task
    for the whole run.)"""
    items = [{"path": str(p)} for p in paths]
    # its own CPU share keeps the read out of the first stage's fused task:
    # fused, the stage's batch size would bundle many paths into one task
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_shard_file, batch_size=1, batch_format="numpy", num_cpus=0.25
    )


def _write_parts(batch: Batch, parts_dir: str) -> dict:
    """Leave this block's rows in one file per shard they belong to (pickle:
    bytes and object columns round-trip exactly, and nothing is decoded)."""
    import pickle
    import uuid

    sids = np.asarray(batch["shard_id"]).astype(np.int64)
    out_sid, out_path = [], []
    for sid in np.unique(sids):
        rows = take(batch, np.flatnonzero(sids == sid))
        path = os.path.join(parts_dir, f"{int(sid):05d}", f"{uuid.uuid4().hex}.pkl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(rows, f, protocol=5)
        os.replace(path + ".tmp", path)
        out_sid.append(int(sid))
        out_path.append(path)
    return {"shard_id": np.array(out_sid, np.int64), "path": np.array(out_path, object)}


def _write_shard(item: dict, shard_stage, out_dir: str) -> dict:
    """Merge one shard's part files and write the shard (the writer sorts by
    key, so the order the parts arrived in does not matter)."""
    import json
    import pickle

    sid, paths = int(item["shard_id"][0]), list(item["paths"][0])
    parts = []
    for path in paths:
        with open(path, "rb") as f:
            parts.append(pickle.load(f))
    stats = shard_stage.write_group(concat(parts), out_dir, sid)
    for path in paths:
        os.remove(path)
    return {"shard_id": np.array([sid]), "stats": np.array([json.dumps(stats)], dtype=object)}


def build_and_run(
    input_paths: list[str],
    stages: list[Stage],
    shard_stage,
    out_dir: str,
    prior: dict[str, Batch] | None = None,
) -> list[dict]:
    """Run the plan over the input shard files; returns the new shards' stats."""
    import json

    ctx = ray.data.DataContext.get_current()
    # Ray Data reserves half of the cluster for its operators evenly; on a
    # small cluster that left the download one task at a time while later
    # operators' shares sat idle. Our stages bound their own concurrency
    # (actor pools, num_cpus), so the operators share the whole budget.
    ctx.op_resource_reservation_enabled = False
    ds = read_input_shards(input_paths)
    for stage in stages:
        ds = map_stage(ds, stage)
        if isinstance(stage, GlobalStage) and stage.needs_fit():
            prior_rows = (prior or {}).get(stage.name)
            prior_ds = _batch_to_ds(prior_rows) if prior_rows is not None and batch_len(prior_rows) else None
            ds = run_global_ray(ds, stage, prior_ds)
    # Rows reach their shard through files, not a Ray shuffle: the final
    # tasks stream their rows into per-shard part files as they finish, then
    # one task per shard merges and writes it. Images never pass through the
    # object store a second time, and no shuffle operator holds CPUs back.
    parts_dir = layout.parts_dir(out_dir)
    shutil.rmtree(parts_dir, ignore_errors=True)  # leftovers of an interrupted run
    parts = ds.map_batches(_write_parts, fn_kwargs={"parts_dir": str(parts_dir)}, batch_format="numpy", batch_size=None)
    by_shard: dict[int, list[str]] = {}
    for b in parts.iter_batches(batch_format="numpy", batch_size=None):
        for sid, path in zip(b["shard_id"], b["path"]):
            by_shard.setdefault(int(sid), []).append(str(path))
    items = [{"shard_id": sid, "paths": sorted(paths)} for sid, paths in sorted(by_shard.items())]
    if not items:
        return []
    written = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _write_shard,
        fn_kwargs={"shard_stage": shard_stage, "out_dir": out_dir},
        batch_size=1,
        batch_format="numpy",
        num_cpus=shard_stage.resources().num_cpus,
    )
    stats = [json.loads(s) for b in written.iter_batches(batch_format="numpy", batch_size=None) for s in b["stats"]]
    shutil.rmtree(parts_dir, ignore_errors=True)
    if os.environ.get("PAIRFORGE_RAY_STATS"):  # Ray Data's per-operator timings, for profiling a plan
        print(written.stats(), file=sys.stderr)
    return stats


def _batch_to_ds(batch: Batch) -> "ray.data.Dataset":
    from ray.data.extensions import ArrowTensorArray

    def column(v: np.ndarray):
        if v.ndim > 1:  # embeddings: the tensor type Ray Data gives 2-D batch columns, so unions line up
            return ArrowTensorArray.from_numpy(v)
        return pa.array(v.tolist() if v.dtype == object else v)

    return ray.data.from_arrow(pa.table({c: column(v) for c, v in batch.items()}))
