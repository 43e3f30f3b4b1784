"""A global stage's fit as tasks over fit files (see ``stages.base.GlobalStage``).

Every step reads or writes files under ``OUT/_work/fit/<stage>``; a
:class:`Launcher` decides where the steps run (in this process, or as Ray
tasks and a Ray Data shuffle, ``pipeline.plan``). Per input shard:

* ``alive rows``: the shard's fit columns, minus rows rejected before the
  stage (per-row rejects at or before it, earlier global stages' drops);
* ``sample`` (when ``sample_rows``): alive rows with the smallest key hashes,
  at most ``sample_rows`` over the whole run, so the sample does not depend
  on block order or cluster size; ``learn`` runs on it;
* ``bucket_rows`` -> shuffle by ``bucket`` -> ``reduce_bucket``;
* ``combine``: for a stage with ``link_columns`` (dedup), once per partition
  of whole connected components of its links (``pipeline.components``);
  else in one task over the reduced rows (histograms, score windows); it
  writes decisions and side tables partitioned by shard;
* ``decide_rows`` per shard, when ``combine`` returned a rule (a score cut).

What ``learn`` returned goes to every later step, and the rule ``combine``
returned to every ``decide_rows`` task, as ``fitstore.LearnedFiles``: their
values, and their arrays (centroids, sets of hashes) as files under
``_work/fit/<stage>/``, read by each task that needs them, never a task
argument. The stage is never changed: the driver holds it (its config),
those small handles and per-shard counts, nothing that grows with the rows.
"""

from __future__ import annotations

import time

import numpy as np

from pairforge.manifests import layout, storage
from pairforge.pipeline import batchfile, components, fitstore, resume, taskmem
from pairforge.pipeline.engine import RunSpec, alive_at, read_decisions, read_fit_rows
from pairforge.pipeline.fitstore import key_hashes
from pairforge.stages.base import Batch, FitResult, GlobalStage, batch_len, concat, take

#: hash-sample over-draw: the first cut takes about this many times the rows needed
SAMPLE_SLACK = 1.2
#: input rows per partition of a fit's shuffle and of its component passes: the partitions grow
#: with the rows, so a task's memory does not (about 600 B an emitted row of the dedup stages:
#: ~60 MB a task)
PARTITION_ROWS = 100_000


class Launcher:
    """Runs fit steps in this process (the Ray plan has its own)."""

    def map(self, fn, items: list, **kwargs) -> list:
        return [fn(item, **kwargs) for item in items]

    def call(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def partitions(self, spec: RunSpec, shards: int) -> int:
        """How many partitions the steps after the shuffle (the component
        passes of ``pipeline.components``) cut their rows into."""
        return max(1, min(shards, -(-shards * spec.samples_per_shard // PARTITION_ROWS)))

    def shuffle(self, emit, reduce, items: list, **kwargs) -> list:
        """``emit(item)`` -> rows with ``bucket``; ``reduce(rows of one
        bucket)`` per bucket, buckets in order. Returns the reduce results."""
        rows = concat([b for b in (emit(i, **kwargs) for i in items) if batch_len(b)])
        if not batch_len(rows):
            return []
        rows = take(rows, np.argsort(np.asarray(rows["bucket"], dtype=np.int64), kind="stable"))
        g = np.asarray(rows["bucket"], dtype=np.int64)
        starts = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1, [len(g)]])
        return [reduce({k: v[a:b] for k, v in rows.items()}, **kwargs) for a, b in zip(starts[:-1], starts[1:])]


# ------------------------------------------------------------- per-shard steps


def alive_rows(spec: RunSpec, stage: GlobalStage, shard_id: int) -> Batch:
    """The fit columns of the rows of one shard still alive at ``stage``, in key order."""
    rows = read_fit_rows(spec, shard_id, stage.fit_columns)
    if not batch_len(rows):
        return {c: np.zeros(0) for c in stage.fit_columns}
    p = spec.positions[stage.name]
    keep = alive_at(rows, spec, p)
    for g in spec.fitted:
        if spec.positions[g.name] >= p:
            break
        dec = read_decisions(spec, g.name, shard_id)
        if batch_len(dec):
            gone = {str(k) for k, r in zip(dec["key"], dec["reason"]) if r}
            keep &= np.array([str(k) not in gone for k in rows["key"]], dtype=bool)
    rows = {c: rows[c][keep] for c in stage.fit_columns}
    return take(rows, np.argsort(rows["key"].astype(str), kind="stable"))


def _sample_shard(shard_id: int, spec: RunSpec, stage: GlobalStage, cut: int) -> tuple[int, int]:
    """Leave the shard's alive rows with a key hash below ``cut`` in a file;
    returns (alive rows, sampled rows)."""
    with taskmem.measure(spec.out, f"{stage.name}/sample_shard"):
        rows = alive_rows(spec, stage, shard_id)
        h = key_hashes(rows["key"])
        pick = take(rows, np.flatnonzero(h < np.uint64(cut)))
        storage.write_atomic(_sample_dir(spec, stage) / f"{shard_id:08d}.arrow", batchfile.dumps(pick), fsync=False)
        return len(h), batch_len(pick)


def _sample_dir(spec: RunSpec, stage: GlobalStage):
    return layout.fit_dir(spec.out, stage.name) / "sample"


def _learn(spec: RunSpec, stage: GlobalStage) -> tuple[fitstore.LearnedFiles, int]:
    """In a task: ``learn`` on the ``sample_rows`` sampled rows with the
    smallest key hashes, in key order (k-means over a large sample is no
    work for the driver). Returns what it learnt, its arrays in files, and
    the rows it learnt from."""
    with taskmem.measure(spec.out, f"{stage.name}/learn"):
        parts = []
        for path in sorted(_sample_dir(spec, stage).glob("*.arrow")):
            parts.append(batchfile.loads(path.read_bytes(), str(path)))
        sample = fitstore.hash_sample(concat([p for p in parts if batch_len(p)]), int(stage.sample_rows))
        learned = fitstore.store_learned(spec, stage, stage.learn(sample), "learned")
        storage.rmtree(_sample_dir(spec, stage))
        return learned, batch_len(sample)


def _emit_shard(shard_id: int, spec: RunSpec, stage: GlobalStage, learned: fitstore.LearnedFiles) -> Batch:
    with taskmem.measure(spec.out, f"{stage.name}/emit_shard"):
        rows = alive_rows(spec, stage, shard_id)
        out = stage.bucket_rows(rows, fitstore.load_learned(spec, stage, learned)) if batch_len(rows) else {}
        return out if batch_len(out) else {"bucket": np.zeros(0, dtype=np.int64)}


def _reduce(rows: Batch, spec: RunSpec, stage: GlobalStage, learned: fitstore.LearnedFiles) -> str:
    """One bucket's reduction, left in a file: the combine task reads it, so
    reduced rows never pass through the driver. Returns the file's name in
    ``reduced_dir``."""
    with taskmem.measure(spec.out, f"{stage.name}/reduce"):
        out = stage.reduce_bucket(rows, fitstore.load_learned(spec, stage, learned))
        bucket = int(np.asarray(rows["bucket"])[0])
        path = layout.reduced_dir(spec.out, stage.name) / f"{bucket:08d}.arrow"
        storage.write_atomic(path, batchfile.dumps(out), fsync=False)
        return path.name


def _combine(
    spec: RunSpec, stage: GlobalStage, learned: fitstore.LearnedFiles
) -> tuple[dict, fitstore.LearnedFiles | None]:
    """``combine`` over every reduced bucket's file (listed here, not handed
    over: the argument stays the same size however many buckets there are).
    Returns the stored result's counts and its rule, if any (its arrays in
    files: the rule goes on to every ``decide_rows`` task)."""
    with taskmem.measure(spec.out, f"{stage.name}/combine"):
        reduced = fitstore.read_reduced(fitstore.reduced_files(spec, stage))
        result = stage.combine(reduced, fitstore.load_learned(spec, stage, learned))
        storage.rmtree(layout.reduced_dir(spec.out, stage.name))
        counts = fitstore.store_result(spec, stage, result, shards=None)
        rule = None if result.rule is None else fitstore.store_learned(spec, stage, result.rule, "rule")
        return counts, rule


def _decide_shard(shard_id: int, spec: RunSpec, stage: GlobalStage, rule: fitstore.LearnedFiles) -> dict:
    with taskmem.measure(spec.out, f"{stage.name}/decide_shard"):
        rows = alive_rows(spec, stage, shard_id)
        result = stage.decide_rows(rows, fitstore.load_learned(spec, stage, rule)) if batch_len(rows) else FitResult()
        if result.rule is not None:
            raise ValueError(f"{stage.name}: decide_rows returns decisions, not a rule")
        return fitstore.store_result(spec, stage, result, shards=[shard_id], merge=True)


# ------------------------------------------------------------------ the fit


def take_sample(launcher: Launcher, spec: RunSpec, stage: GlobalStage, shard_ids: list[int], total: int) -> int:
    """Leave a hash sample of at least ``stage.sample_rows`` alive rows (or
    all of them) in files for :func:`_learn`; returns the rows sampled."""
    limit = int(stage.sample_rows)
    frac = min(1.0, SAMPLE_SLACK * limit / max(1, total))
    cut = 2**64 - 1 if frac >= 1.0 else int(2**64 * frac)
    got = launcher.map(_sample_shard, shard_ids, spec=spec, stage=stage, cut=cut)
    alive, sampled = sum(a for a, _ in got), sum(b for _, b in got)
    if sampled < min(limit, alive):  # many rows were dead: widen the cut once
        cut = 2**64 - 1 if SAMPLE_SLACK * limit >= alive else int(2**64 * SAMPLE_SLACK * limit / alive)
        sampled = sum(b for _, b in launcher.map(_sample_shard, shard_ids, spec=spec, stage=stage, cut=cut))
    return sampled


def run_fit(
    launcher: Launcher,
    spec: RunSpec,
    stage: GlobalStage,
    shard_ids: list[int],
    total: int,
    single_combine: bool = False,
) -> dict:
    """Fit ``stage`` over every shard's fit files and store its decisions.
    Returns the fit's counters (also written as its done mark).
    ``single_combine``: run ``combine`` in one task even where the stage
    could run it per component (the reference the tests compare with)."""
    t0 = time.perf_counter()
    storage.rmtree(layout.fit_dir(spec.out, stage.name))
    for table in stage.side_tables():
        storage.rmtree(layout.side_table_dir(spec.out, table))
    info: dict = {"stage": stage.name}
    steps: dict[str, float] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        steps[name] = round(now - t, 3)
        return now

    t = t0
    learned = fitstore.NOTHING_LEARNED
    if stage.sample_rows:
        take_sample(launcher, spec, stage, shard_ids, total)
        t = lap("sample", t)
        learned, info["sample_rows"] = launcher.call(_learn, spec, stage)
        t = lap("learn", t)
    launcher.shuffle(_emit_shard, _reduce, shard_ids, spec=spec, stage=stage, learned=learned)
    t = lap("bucket_and_reduce", t)
    parts = launcher.partitions(spec, len(shard_ids))
    by_component = stage.link_columns is not None and not stage.side_tables()
    rule = None
    if by_component and parts > 1 and not single_combine:  # one partition: that is the single task
        counts, info["components"] = components.combine_by_component(launcher, spec, stage, learned, parts)
    else:
        counts, rule = launcher.call(_combine, spec, stage, learned)
    t = lap("combine", t)
    if rule is not None:
        for c in launcher.map(_decide_shard, shard_ids, spec=spec, stage=stage, rule=rule):
            fitstore.add_counts(counts, c)
        t = lap("decide_rows", t)
    info.update(counts, seconds=round(time.perf_counter() - t0, 3), steps=steps)
    resume.write_fit_mark(spec.out, stage.name, info)
    return info
