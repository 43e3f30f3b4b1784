"""A per-row stage inside your own Ray Data pipeline: :func:`ray_map`.

Why one adapter: a stage's ``process_batch`` sees only the rows that are
still ``ok`` and expects the identity columns every row of a job carries
(``key``, ``shard_id``, ``status``, ``stage``, ``reason``, ``detail``;
``stages.base``). Called bare from ``ds.map_batches`` it fails on the first
batch with a failed row (``KeyError: 'status'``), and a model stage would load
its model in every task. :func:`ray_map` adds the identity columns a dataset
lacks, runs the stage the way a job's Ray plan does (``pipeline.plan``: in
tasks, set up once per worker process; a model stage on an actor pool sized by
its ``Resources``, its ``cpu_prepare`` in CPU tasks ahead of it) and keeps every
row: an ok row gains the stage's columns, a row that failed or was dropped
keeps its ``status``, ``stage``, ``reason`` and ``detail`` (and the stage's
columns at their defaults), so nothing is lost silently::

    import ray, pairforge
    from pairforge.stages import ClipScore, Download

    ds = ray.data.read_parquet("urls.parquet")            # url, caption
    ds = pairforge.ray_map(ds, Download(image_size=256))
    ds = pairforge.ray_map(ds, ClipScore(model="pf-tiny", pretrained="pf-tiny-scorer.pt"))
    ok = ds.filter(lambda row: row["status"] == "ok")

A global stage's per-row part runs too when its configuration needs no fit
(``clip_score`` with only a ``threshold``); one that needs the whole dataset
(dedup, ``top_fraction``) is refused: run it in a job (``pairforge.run``).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pairforge.stages.base import (
    IDENTITY_COLUMNS,
    STATUS_OK,
    TIMING_PREFIX,
    Batch,
    GlobalStage,
    Stage,
    batch_len,
    object_array,
)


def ray_map(ds, stage: Stage, *, key_column: str = "url"):
    """``ds`` with ``stage`` applied to every batch: a new ``ray.data.Dataset``
    (lazy, like any ``map_batches``).

    Rows without a ``key`` get one: the first 16 hex digits of the BLAKE2b of
    their ``key_column`` (the URL), so a failure names a row you can find.
    """
    _check(stage)
    from pairforge.pipeline import plan  # imports ray: only when used

    common = dict(batch_format="numpy", zero_copy_batch=False)
    res = stage.resources()
    if stage.runs_on_actors:
        ds = ds.map_batches(with_identity, fn_kwargs={"key_column": key_column}, **common)
        return plan.map_on_actors(ds, stage, timing=False)
    return ds.map_batches(
        _run_in_task,
        fn_kwargs={"stage": stage, "key_column": key_column},
        batch_size=res.batch_size,
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
        **common,
    )


def _check(stage) -> None:
    if not isinstance(stage, Stage):
        raise TypeError(f"ray_map: expected a stage (pairforge.stages.Download(...)), got {stage!r}")
    if type(stage).process_batch is Stage.process_batch:
        raise ValueError(f"ray_map: stage {stage.name!r} has no per-row part (the shard writer is a job's last step)")
    if isinstance(stage, GlobalStage) and stage.needs_fit():
        raise ValueError(
            f"ray_map: stage {stage.name!r} as configured decides over the whole dataset (a fit); "
            "run it in a job (pairforge.run), or configure it without its global part"
        )


def with_identity(batch: Batch, key_column: str = "url") -> Batch:
    """``batch`` with the identity columns it lacks: ``key`` (a hash of
    ``key_column``), ``shard_id`` 0, ``status`` ok and empty
    ``stage``/``reason``/``detail``. Columns it has are kept as they are."""
    n = batch_len(batch)
    out = dict(batch)
    if "key" not in out:
        if key_column not in out:
            raise ValueError(
                f"ray_map: the rows have neither a 'key' column nor {key_column!r} to make one from; "
                "add a 'key' (a unique id per row) or pass key_column="
            )
        out["key"] = object_array([_key(v) for v in out[key_column]])
    defaults = {"shard_id": np.zeros(n, dtype=np.int64), "status": object_array([STATUS_OK] * n)}
    for col in IDENTITY_COLUMNS:
        if col not in out:
            out[col] = defaults[col] if col in defaults else object_array([""] * n)
    return out


def _key(value) -> str:
    data = value if isinstance(value, bytes) else str(value).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def without_timing(batch: Batch) -> Batch:
    """The stage's per-row timing columns (``__t_<stage>``) are a job's
    bookkeeping (its manifest sums them), not the user's data."""
    return {k: v for k, v in batch.items() if not k.startswith(TIMING_PREFIX)}


def _run_in_task(batch: Batch, stage: Stage, key_column: str) -> Batch:
    from pairforge.pipeline import plan

    return without_timing(plan.run_chunked(plan.ready(stage), with_identity(batch, key_column)))
