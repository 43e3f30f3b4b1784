"""Run a job: cut the URL lists into shards, run the stage list on Ray (or in
process), write shards, rejects, ``sizes.json`` and the manifest."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import layout
from manifests.manifest import build_manifest, write_manifest, write_sizes
from manifests.shards import read_stats
from pipeline.batches import table_to_batch
from pipeline.config import JobConfig, to_dict
from pipeline.reader import read_index, split_input
from pipeline.registry import stage_class
from stages.base import STATUS_OK, Batch, GlobalStage, Stage


class JobError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[pairforge] {msg}", file=sys.stderr, flush=True)


def instantiate(job: JobConfig) -> tuple[list[Stage], Stage]:
    stages = [stage_class(s.name)(s.config) for s in job.stages]
    return stages[:-1], stages[-1]


def _prior_rows(out: Path, done: list[int], stages: list[Stage]) -> dict[str, Batch]:
    """For a resumed run: the fit columns of rows in finished shards that were
    alive when each global stage ran, so the global decisions for the pending
    shards come out the same as in an uninterrupted run."""
    globals_ = [s for s in stages if isinstance(s, GlobalStage)]
    if not done or not globals_:
        return {}
    order = [s.name for s in stages]
    emb_cols = sorted({c for g in globals_ for c in g.fit_columns if c.endswith("_emb")})
    tables, embs = [], {c: [] for c in emb_cols}
    for sid in done:
        for path in (layout.shard_parquet(out, sid), layout.rejects_parquet(out, sid)):
            t = pq.read_table(path)
            if t.num_rows:
                tables.append(t)
                for c in emb_cols:  # embeddings are stored beside each parquet, in its row order
                    is_shard = path == layout.shard_parquet(out, sid)
                    npy = (layout.embedding_npy if is_shard else layout.rejects_embedding_npy)(out, c, sid)
                    embs[c].append(np.load(npy) if npy.exists() else None)
    if not tables:
        return {}
    rows = table_to_batch(pa.concat_tables(tables, promote_options="permissive"))
    for c, parts in embs.items():
        stored = [p for p in parts if p is not None]
        if stored and c not in rows:
            dim = stored[0].shape[1]
            full = [
                p if p is not None else np.full((t.num_rows, dim), np.nan, np.float16) for p, t in zip(parts, tables)
            ]
            rows[c] = np.concatenate(full)
    rank = {name: i for i, name in enumerate(order)}
    stage_of = rows.get("stage", np.array([""] * len(rows["key"]), dtype=object))
    status = rows["status"]
    prior = {}
    for g in globals_:
        here = rank[g.name]
        alive = np.array([st == STATUS_OK or rank.get(s, -1) >= here for st, s in zip(status, stage_of)], dtype=bool)
        missing = [c for c in g.fit_columns if c not in rows]
        if missing:
            _log(f"resume: finished shards lack {missing} for {g.name}; it fits on pending shards only")
            continue
        lost = [c for c in g.fit_columns if c in embs and np.isnan(rows[c][alive]).all(axis=1).any()]
        if lost:
            _log(f"resume: rows of finished shards have no stored {lost}; {g.name} fits without them")
        prior[g.name] = {c: rows[c][alive] for c in g.fit_columns}
    return prior


def _ray_session(job: JobConfig, address: str | None):
    import ray

    addr = address or job.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return ray, False
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    if addr:
        ray.init(address=addr, log_to_driver=True)
    else:
        ray.init(num_cpus=job.ray.num_cpus, include_dashboard=False)
    return ray, True


def _ray_info(ray) -> dict:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "runner": "ray",
        "address": ray.get_runtime_context().gcs_address,
        "nodes": len(nodes),
        "resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
    }


def run_job(job: JobConfig, *, address: str | None = None, resume: bool = False) -> dict:
    """Run ``job`` and return its manifest (also written to ``OUT/manifest.json``)."""
    out = Path(job.output.dir)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    if not resume and (layout.shards_dir(out).exists() or layout.manifest_json(out).exists()):
        raise JobError(f"{out} already holds a run; pass --resume to finish it, or choose a new output folder")
    old_index = read_index(out) if resume else None
    index = split_input(job.input, out, job.output.samples_per_shard)
    if old_index is not None and old_index.to_json() != index.to_json():
        raise JobError(f"{out}: the URL lists changed since the interrupted run; resume needs the same input")
    shard_ids = sorted(index.shard_rows)
    done = [sid for sid in shard_ids if resume and read_stats(out, sid) is not None]
    pending = [sid for sid in shard_ids if sid not in done]
    _log(f"{index.total_rows} rows in {len(shard_ids)} shards; {len(pending)} to run, {len(done)} already finished")
    stages, shard_stage = instantiate(job)
    prior = _prior_rows(out, done, stages)
    paths = [str(layout.input_shard(out, sid)) for sid in pending]

    ray_info: dict = {"runner": "local"}
    if pending:
        if job.runner == "local":
            from pipeline.local import run_local

            run_local(paths, stages, shard_stage, str(out), prior)
        else:
            from pipeline.plan import build_and_run

            ray, owned = _ray_session(job, address)
            try:
                ray_info = _ray_info(ray)
                build_and_run(paths, stages, shard_stage, str(out), prior)
            finally:
                if owned:
                    ray.shutdown()

    all_stats = []
    for sid in shard_ids:
        st = read_stats(out, sid)
        if st is None:
            raise JobError(f"shard {layout.shard_name(sid)} was not written; rerun with --resume")
        all_stats.append(st)
    write_sizes(out, all_stats)
    timing = {
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "resumed_shards": len(done),
    }
    manifest = build_manifest(
        out,
        to_dict(job),
        index.to_json(),
        [s.name for s in stages] + [shard_stage.name],
        all_stats,
        ray_info,
        timing,
    )
    path = write_manifest(out, manifest)
    c = manifest["counts"]
    _log(
        f"done in {timing['wall_seconds']:.1f}s: {c['ok']} samples in {len(all_stats)} shards, {c['rejected']} rejected"
    )
    _log(f"shards: {layout.shards_dir(out)}  manifest: {path}")
    return manifest


def with_overrides(job: JobConfig, **output) -> JobConfig:
    return dataclasses.replace(job, output=dataclasses.replace(job.output, **output))
