"""The Ray plan: the phases of ``pipeline.engine`` on a Ray cluster.

* **rows**: one Ray Data pipeline over the pending input shards. Stages that
  run as tasks are fused into one ``map_batches`` function per run of such
  stages, and the first run also reads the input shard, so one task carries
  one input shard from its URL list through download and every CPU stage to
  its part files: as many tasks in flight as the cluster has CPUs for, on
  every node, and no image crosses the object store unless an actor stage
  (a model, on an actor pool sized by its ``Resources``, named after the
  stage) sits in between. Its ``cpu_prepare`` runs in CPU tasks ahead of it.
* **fits**: :class:`RayLauncher` runs ``pipeline.fit``'s per-shard steps as
  Ray tasks, its shuffle through files in plain tasks (``pipeline.shuffle``),
  and ``combine`` as one task.
* **write**: one task per output shard.

Set-up is owned here: an actor calls ``setup`` when it starts; a task
process sets a stage up on its first batch of it and keeps it (:func:`ready`).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from typing import Any

import numpy as np
import ray

from pairforge.manifests import storage
from pairforge.pipeline import chunks, engine, shuffle, taskmem
from pairforge.pipeline.engine import RunSpec
from pairforge.pipeline.fit import PARTITION_ROWS, Launcher
from pairforge.pipeline.resume import RowsTracker
from pairforge.stages.base import TIMING_PREFIX, Batch, GlobalStage, Stage, batch_len, concat, run_stage_batch, take

#: tasks in flight per launcher map (the driver holds their refs, nothing else)
MAX_IN_FLIGHT = 1000
#: most partitions of a fit's shuffle: each emit task writes this many offsets, each reduce task
#: reads a slice of every shard's file
SHUFFLE_PARTITIONS = 4096
#: the largest pickled task argument this process submitted, overall and per step
#: (``bench/scale.py`` reports them); a step's arguments shared through the
#: object store (``ray.put`` once, fetched by every task) count as its own
ARG_BYTES: dict = {"max": 0, "steps": {}}

_READY: dict[tuple, Stage] = {}


def ready(stage: Stage) -> Stage:
    """This process's set-up copy of ``stage`` (stages arrive pickled with
    every task: cache them by class and config, set up once)."""
    key = (type(stage).__qualname__, stage.config)
    st = _READY.get(key)
    if st is None:
        st = _READY[key] = stage
        st.setup()
    elif st is not stage and "attached" in stage.__dict__:
        st.attached = stage.attached  # this run's services, not an earlier run's
    return st


def run_chunked(stage: Stage, batch: Batch) -> Batch:
    """``run_stage_batch`` over ``batch`` in pieces of the stage's batch size."""
    n = batch_len(batch)
    size = max(1, stage.resources().batch_size)
    if n <= size:
        return run_stage_batch(stage, batch)
    return concat([run_stage_batch(stage, take(batch, np.arange(i, min(i + size, n)))) for i in range(0, n, size)])


def _segment(batch: dict, spec: RunSpec, stages: tuple[Stage, ...], read: bool, save: bool) -> Batch:
    """A run of task stages over one block, then, with ``save``, its rows to
    part files. With ``read``, over the rows of the input shards named in
    the block that no saved part holds yet; with ``read`` and ``save`` (every
    per-row stage in this task), in chunks (``engine.checkpoints``), each
    saved as it is done, so a kill loses only the chunk in flight. Returns
    the records of every part of those shards, the earlier ones too (the
    driver's tracker counts a part once): one batch at the end, so a task
    Ray retries reports its shard whole or not at all."""
    with taskmem.measure(spec.out, "rows"):
        return _run_segment(batch, spec, stages, read, save)


def _run_segment(batch: dict, spec: RunSpec, stages: tuple[Stage, ...], read: bool, save: bool) -> Batch:
    if not read:
        for st in stages:
            batch = run_chunked(ready(st), batch)
        return engine.save_rows(batch, spec) if save else batch
    keys = batch["keys"] if "keys" in batch else [None] * len(batch["sid"])
    out = []
    for sid, k in zip(batch["sid"], keys):
        rows, saved = chunks.pending_input(spec, int(sid), _keys(k))
        if not save:  # an actor stage comes next: the shard's rows go on in one block
            for st in stages:
                rows = run_chunked(ready(st), rows)
            out.append(rows)
            continue
        out.append(saved)
        out.extend(
            engine.save_rows(c, spec) for c in chunks.checkpoints(spec, rows, [ready(st) for st in stages], run_chunked)
        )
    full = [b for b in out if batch_len(b)]
    return concat(full) if full else out[-1]


class _StageActor:
    def __init__(self, stage: Stage, timing: bool = True):
        self.stage, self.timing = stage, timing
        self.stage.setup()

    def __call__(self, batch: Batch) -> Batch:
        out = run_stage_batch(self.stage, batch)
        return out if self.timing else {k: v for k, v in out.items() if not k.startswith(TIMING_PREFIX)}


def _actor_class(stage: Stage) -> type:
    title = "".join(p.title() for p in stage.name.split("_"))
    return type(f"{title}Actor", (_StageActor,), {"__module__": __name__})


def _cpu_prepare(batch: Batch, stage: Stage) -> Batch:
    return stage.cpu_prepare(batch)


def _note_args(step: str, *objs) -> None:
    size = len(pickle.dumps(objs, protocol=5))
    ARG_BYTES["max"] = max(ARG_BYTES["max"], size)
    steps = ARG_BYTES.setdefault("steps", {})
    steps[step] = max(steps.get(step, 0), size)


def _step(fn, kwargs: dict) -> str:
    """A fit step's name for the figures: the stage's and the function's."""
    stage = kwargs.get("stage") or (kwargs.get("kw") or {}).get("stage")
    return f"{stage.name}/{fn.__name__.lstrip('_')}" if stage is not None else fn.__name__.lstrip("_")


def segments(stages) -> list[tuple[bool, tuple[Stage, ...]]]:
    """The stage list cut into runs: (on actors?, stages)."""
    out: list[tuple[bool, tuple[Stage, ...]]] = []
    for st in stages:
        if st.runs_on_actors or not out or out[-1][0]:
            out.append((st.runs_on_actors, (st,)))
        else:
            out[-1] = (False, out[-1][1] + (st,))
    return out or [(False, ())]


def _prepare_memory(st: Stage) -> int | None:
    """The ``memory`` a ``cpu_prepare`` task asks Ray for: the stage's
    ``Resources.prepare_memory`` (bytes), capped at the cluster's memory per
    CPU so that a task never asks for more than a node can give."""
    want = st.resources().prepare_memory
    if not want:
        return None
    res = ray.cluster_resources()
    per_cpu = res.get("memory", 0) / max(res.get("CPU", 1), 1)
    return int(min(want, per_cpu)) if per_cpu else None


def map_on_actors(ds: "ray.data.Dataset", st: Stage, timing: bool = True) -> "ray.data.Dataset":
    """One stage on an actor pool sized by its ``Resources``, with its
    ``cpu_prepare`` in CPU tasks ahead of the actors. ``timing``: keep the
    stage's ``__t_<stage>`` column (a job's manifest sums it).

    All it needs is the stage's ``Resources``: CPUs, GPUs, batch size, pool
    size, ``actor_calls`` (batches one actor works on at once, on threads:
    Ray Data's ``enable_true_multi_threading``), ``cpu_prepare`` (whether
    prepare tasks run) and ``prepare_memory`` (the ``memory`` request of a
    prepare task)."""
    res = st.resources()
    common = dict(batch_format="numpy", zero_copy_batch=False, batch_size=res.batch_size)
    if res.cpu_prepare:
        mem = _prepare_memory(st)
        ds = ds.map_batches(_cpu_prepare, fn_kwargs={"stage": st}, num_cpus=1, memory=mem, **common)
    lo, hi = res.concurrency
    calls = max(1, int(res.actor_calls))
    compute = ray.data.ActorPoolStrategy(
        min_size=lo,
        max_size=max(lo, hi),
        max_concurrent_calls_per_actor=calls if calls > 1 else None,
        enable_true_multi_threading=calls > 1,
    )
    _note_args(f"rows/{st.name}", st)
    return ds.map_batches(
        _actor_class(st),
        fn_constructor_kwargs={"stage": st, "timing": timing},
        compute=compute,
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
        **common,
    )


def _keys(text):
    return None if text is None else json.loads(str(text))


def rows_dataset(spec: RunSpec, shard_ids: list[int], only: dict | None = None) -> "ray.data.Dataset":
    """``only``: per shard, the keys of the rows to run (the deferred retry pass)."""
    items = [{"sid": s, **({"keys": json.dumps(only[s])} if only else {})} for s in shard_ids]
    ds = ray.data.from_items(items, override_num_blocks=len(shard_ids))
    segs = segments(spec.stages)
    if segs[0][0]:  # an actor stage first: read in a task of its own
        segs.insert(0, (False, ()))
    common = dict(batch_format="numpy", zero_copy_batch=False)
    for i, (on_actors, stages) in enumerate(segs):
        save = i == len(segs) - 1
        if on_actors:
            ds = map_on_actors(ds, stages[0])
            if save:
                ds = ds.map_batches(
                    _segment, fn_kwargs=_kw(spec, (), False, True), batch_size=None, num_cpus=1, **common
                )
        else:
            cpus = max([st.resources().num_cpus for st in stages] or [1.0])
            gpus = max([st.resources().num_gpus for st in stages] or [0.0])
            ds = ds.map_batches(
                _segment,
                fn_kwargs=_kw(spec, stages, i == 0, save),
                batch_size=1 if i == 0 else None,  # the first: one input shard per task
                num_cpus=cpus,
                num_gpus=gpus or None,
                **common,
            )
    return ds


def _kw(spec: RunSpec, stages, read: bool, save: bool) -> dict:
    kw = {"spec": spec, "stages": tuple(stages), "read": read, "save": save}
    _note_args("rows", kw)
    return kw


def run_rows(spec: RunSpec, shard_ids: list[int], tracker: RowsTracker, only: dict | None = None) -> None:
    """The per-row pass over ``shard_ids``; each finished shard is marked as
    it lands. ``only``: per shard, the keys of the rows to run."""
    ctx = ray.data.DataContext.get_current()
    # Ray Data reserves a share of the cluster for each operator; our stages
    # bound their own concurrency (actor pools, num_cpus), so the operators
    # share the whole budget and the download tasks get every free CPU.
    ctx.op_resource_reservation_enabled = False
    # a stage's StageError (stage and row key) reaches the driver as itself,
    # not as Ray Data's generic "UDF failed" wrapper
    ctx.raise_original_map_exception = True
    ds = rows_dataset(spec, shard_ids, only)
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        tracker.add(b)
    if os.environ.get("PAIRFORGE_RAY_STATS"):  # Ray Data's per-operator timings, for profiling a plan
        print(ds.stats(), file=sys.stderr)


# ------------------------------------------------------------------ fits, writes


def _call(fn, item, kwargs):
    return fn(item, **ray.get(kwargs)) if isinstance(kwargs, ray.ObjectRef) else fn(item, **kwargs)


def _local_shuffle(emit, reduce, items, **kwargs) -> list:
    with taskmem.measure(kwargs["spec"].out, f"{kwargs['stage'].name}/local_shuffle"):
        return Launcher().shuffle(emit, reduce, items, **kwargs)


class RayLauncher(Launcher):
    """``pipeline.fit``'s steps as Ray tasks; shared arguments go to the
    object store once, so a task's own argument is a shard id."""

    def __init__(self, num_cpus: float = 1.0, small_fit_shards: int = 32):
        self.num_cpus = num_cpus
        #: fits over at most this many shards group their rows in one task
        #: (tens of MB of fit rows) instead of a shuffle through files
        self.small_fit_shards = small_fit_shards

    def map(self, fn, items: list, **kwargs) -> list:
        ref = ray.put(kwargs)
        _note_args(_step(fn, kwargs), fn, items[:1], ref)
        _note_args(_step(fn, kwargs), kwargs)  # what every task fetches
        task = ray.remote(num_cpus=self.num_cpus)(_call)
        out: dict[Any, int] = {}
        results: list = [None] * len(items)
        pending = []
        for i, item in enumerate(items):
            r = task.remote(fn, item, ref)
            out[r] = i
            pending.append(r)
            if len(pending) >= MAX_IN_FLIGHT:
                done, pending = ray.wait(pending, num_returns=len(pending) // 2)
                for d in done:
                    results[out.pop(d)] = ray.get(d)
        for d in pending:
            results[out.pop(d)] = ray.get(d)
        return results

    def call(self, fn, *args, **kwargs):
        stage = next((a for a in args if isinstance(a, GlobalStage)), kwargs.get("stage"))
        _note_args(_step(fn, {"stage": stage}), fn, args, kwargs)
        return ray.get(ray.remote(num_cpus=self.num_cpus)(fn).remote(*args, **kwargs))

    def partitions(self, spec: RunSpec, shards: int) -> int:
        """Enough to spread the tasks and bound each one's rows, no more than the shards."""
        if shards <= self.small_fit_shards:
            return 1
        cpus = int(ray.cluster_resources().get("CPU", 1))
        rows = shards * spec.samples_per_shard
        return max(1, min(SHUFFLE_PARTITIONS, shards, max(cpus * 4, -(-rows // PARTITION_ROWS))))

    def shuffle(self, emit, reduce, items: list, **kwargs) -> list:
        if not items:
            return []
        if len(items) <= self.small_fit_shards:  # one task: a shuffle costs seconds to start
            return self.call(_local_shuffle, emit, reduce, items, **kwargs)
        parts = self.partitions(kwargs["spec"], len(items))
        base = shuffle.folder(kwargs["spec"], kwargs["stage"])
        storage.rmtree(base)
        try:
            self.map(shuffle.emit_parts, items, emit=emit, kw=kwargs, parts=parts)
            # every reduce task lists the shards' files itself: no list of shards in its argument
            done = self.map(shuffle.reduce_part, list(range(parts)), reduce=reduce, kw=kwargs, parts=parts)
        finally:
            storage.rmtree(base)
        return [r for rs in done for r in rs]


def write_shards(spec: RunSpec, shard_ids: list[int]) -> list[dict]:
    launcher = RayLauncher(num_cpus=spec.shard_stage.resources().num_cpus)
    return launcher.map(_write_one, shard_ids, spec=spec)


def _write_one(shard_id: int, spec: RunSpec) -> dict:
    with taskmem.measure(spec.out, "write"):
        return engine.write_output_shard(spec, shard_id)
