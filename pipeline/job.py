"""Run a job: cut the URL lists into shards, run the phases of
``pipeline.engine`` on Ray (or in process), write shards, rejects,
``sizes.json`` and the manifest. A resumed run picks up at the input shard,
the fit or the output shard where the last one stopped."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from datetime import datetime, timezone

from pairforge.manifests import layout, storage
from pairforge.manifests.manifest import build_manifest, write_manifest, write_sizes
from pairforge.manifests.redact import redact_text
from pairforge.pipeline import outcome, retrypass, workdir
from pairforge.pipeline.checks import check_job, check_ray_address
from pairforge.pipeline.checks_urls import input_warnings
from pairforge.pipeline.config import JobConfig, resolve_stages, to_dict
from pairforge.pipeline.engine import RunSpec
from pairforge.pipeline.fit import Launcher, run_fit
from pairforge.pipeline.progress import ProgressTracker
from pairforge.pipeline.reader import read_index, split_input
from pairforge.pipeline.resume import (  # noqa: F401 - run_state: the CLI says it when a run is interrupted
    fit_mark,
    job_change,
    plan_shards,
    remove_temp_files,
    run_state,
    shard_written,
    write_job_record,
)
from pairforge.pipeline.services import Services
from pairforge.stages import stage_class
from pairforge.stages.base import Stage, StageError


class JobError(RuntimeError):
    #: what ``pairforge run`` exits with (``pipeline.outcome``)
    exit_code = outcome.EXIT_CONFIG


class EmptyInput(JobError):
    """The URL lists hold no rows: there is nothing to run."""

    exit_code = outcome.EXIT_EMPTY_INPUT


class Unreachable(JobError):
    """The Ray cluster the run was told to join does not answer."""

    exit_code = outcome.EXIT_UNREACHABLE


def _log(msg: str) -> None:
    print(f"[pairforge] {redact_text(msg)}", file=sys.stderr, flush=True)


def instantiate(job: JobConfig) -> tuple[list[Stage], Stage]:
    stages = [stage_class(s.name)(s.config) for s in resolve_stages(job).stages]
    return stages[:-1], stages[-1]


def _ray_session(job: JobConfig, address: str | None, verbose: bool = False):
    import logging

    import ray

    from pairforge.pipeline.progress import quiet_ray

    addr = address or job.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        quiet_ray(verbose)
        return ray, False
    level = logging.INFO if verbose else logging.WARNING
    if addr:
        ray.init(address=addr, log_to_driver=True, logging_level=level)
    else:  # a local Ray, started so that nothing leaves loopback (pipeline.raystart)
        from pairforge.pipeline.raystart import init_local

        init_local(num_cpus=job.ray.num_cpus, logging_level=level)
    quiet_ray(verbose)
    return ray, True


def _ray_info(ray) -> dict:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "runner": "ray",
        "address": ray.get_runtime_context().gcs_address,
        "nodes": len(nodes),
        "resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
    }


def _job_record(job: JobConfig) -> dict:
    """What a resumed run must share with the run it finishes: the stages
    and their settings, the input, the shard size (its finished rows and
    fits were made by them); not how it runs (Ray, runner, storage options).
    URL credentials masked; its SHA-256 binds ``_work`` (``pipeline.workdir``)."""
    return workdir.job_record(job)


def _runner(job: JobConfig):
    if job.runner == "local":
        from pairforge.pipeline import local

        return local, Launcher()
    from pairforge.pipeline import plan

    return plan, plan.RayLauncher()


def run_job(
    job: JobConfig,
    *,
    address: str | None = None,
    resume: bool = False,
    clean_work: bool = False,
    verbose: bool = False,
    progress_every: float | None = None,
) -> dict:
    """Run ``job`` and return its manifest (also written to ``OUT/manifest.json``).

    First the whole job is checked (``pipeline.checks``: a ``ConfigError``
    naming every wrong key and value, before Ray starts or anything is written).
    Phases (``pipeline.engine``): the per-row pass over input shards whose
    rows are not on disk yet, each global stage's fit (skipped when nothing
    changed since a finished fit), then every shard not yet written.
    ``verbose``: Ray's own progress bars and INFO logs too; ``progress_every``:
    seconds between progress lines when stderr is not a terminal.
    ``OUT/_work`` must be empty or this job's (``pipeline.workdir``);
    ``clean_work`` deletes it first."""
    for warning in check_job(job):
        _log(f"warning: {warning}")
    job = resolve_stages(job)  # custom stages' modules: imported once the job passed its checks
    addr = address or job.ray.address or os.environ.get("RAY_ADDRESS")
    if job.runner != "local" and addr:
        problem = check_ray_address(addr)
        if problem:
            raise Unreachable(problem)
    out = storage.path(job.output.dir, job.storage)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    if not resume and (layout.shards_dir(out).exists() or layout.manifest_json(out).exists()):
        raise JobError(f"{out} already holds a run; pass --resume to finish it, or choose a new output folder")
    index = read_index(out) if resume else None
    if index is not None:  # checked before anything is written: a refused resume leaves the run as it was
        change = job_change(out, job, index)
        if change:
            raise JobError(change)
    try:  # _work is this job's, or empty (or cleaned on request): before anything is written there
        workdir.bind_work(out, _job_record(job), resume=resume, clean=clean_work)
    except workdir.WorkFolderError as e:
        raise JobError(str(e)) from None
    if index is None:
        index = split_input(job.input, out, job.output.samples_per_shard, config=job.storage)
    if index.total_rows == 0:
        files = ", ".join(f"{f['path']} ({f['rows']} rows)" for f in index.files)
        raise EmptyInput(f"input: the URL lists hold no rows: {files}; nothing to run")
    write_job_record(out, job)
    if resume:
        stale = remove_temp_files(out)
        if stale:
            _log(f"resume: removed {stale} temporary file(s) an interrupted write left")
    shard_ids = sorted(index.shard_rows)
    stages, shard_stage = instantiate(job)
    for warning in input_warnings(stages, out):
        _log(f"warning: {warning}")
    spec = RunSpec(
        out if storage.is_object(out) else str(out),
        tuple(stages),
        shard_stage,
        index.samples_per_shard,
        checkpoint_rows=job.output.checkpoint_rows,
        checkpoint_seconds=job.output.checkpoint_seconds,
    )
    marks = plan_shards(out, shard_ids, resume, refits=bool(spec.fitted))
    written, waiting, todo = marks.written, marks.waiting, marks.todo
    saved, saved_rows = marks.saved, marks.saved_rows  # the chunks saved before a kill: not fetched again
    _log(
        f"{index.total_rows} rows in {len(shard_ids)} shards; {len(todo)} to run, {len(waiting)} with rows done, "
        f"{len(written)} already written" + (f"; {saved_rows} rows of the shards to run were saved" if saved else "")
    )
    runner, launcher = _runner(job)
    ray_info: dict = {"runner": "local"}
    session = _ray_session(job, address, verbose) if job.runner != "local" and (todo or waiting) else None
    services = Services(spec.out, on_ray=session is not None)
    fits: list[dict] = []
    try:
        if session is not None:
            ray_info = _ray_info(session[0])
            if ray_info["nodes"] > 1 and not storage.is_object(out):
                _log(f"warning: {ray_info['nodes']} nodes write to {out}: it must be a folder every node sees (NFS)")
        services.attach(spec.stages)
        t_rows = time.perf_counter()
        if todo:
            tracker = ProgressTracker(spec, {s: index.shard_rows[s] for s in todo}, every=progress_every)
            try:
                for records in saved:
                    tracker.add(records)
                whole = set(tracker.finished)  # every row saved before the kill, only the mark missing
                run = [s for s in todo if s not in whole]
                if run:
                    runner.run_rows(spec, run, tracker)
            finally:
                tracker.close()
            done = set(tracker.finished)
            missing = [s for s in todo if s not in done]
            if missing:
                raise JobError(f"input shards {missing[:5]} did not finish their per-row pass; rerun with --resume")
        rows_seconds = time.perf_counter() - t_rows
        t_retry = time.perf_counter()
        if retrypass.wanted(spec):
            _deferred_retry(runner, launcher, spec, [s for s in shard_ids if s not in written])
        retry_seconds = time.perf_counter() - t_retry
        crawl = services.stats()
        refit = bool(todo)
        for g in spec.fitted:
            mark = fit_mark(out, g.name)
            if mark is None or refit:
                t_fit = time.perf_counter()
                mark = run_fit(launcher, spec, g, shard_ids, index.total_rows)
                refit = True
                _log(f"fit {g.name}: {time.perf_counter() - t_fit:.1f}s")
            fits.append(mark)
        pending = [s for s in shard_ids if s not in written]
        if pending:
            t_write = time.perf_counter()
            runner.write_shards(spec, pending)
            _log(f"wrote {len(pending)} shard(s): {time.perf_counter() - t_write:.1f}s")
    except Exception as e:  # under Ray a StageError arrives wrapped (RayTaskError, UserCodeException)
        found = _find_stage_error(e)
        if found is None:
            raise
        raise JobError(_stage_error(out, found)) from None
    finally:
        services.close()
        if session is not None and session[1]:
            session[0].shutdown()

    all_stats = []
    for sid in shard_ids:
        st = shard_written(out, sid)
        if st is None:
            raise JobError(f"shard {layout.shard_name(sid)} was not written; rerun with --resume")
        all_stats.append(st)
    write_sizes(out, all_stats)
    timing = {
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "rows_seconds": round(rows_seconds, 3),
        "retry_seconds": round(retry_seconds, 3),
        "resumed_shards": len(written),
        "resumed_rows_shards": len(waiting),
        "resumed_saved_rows": saved_rows,
    }
    manifest = build_manifest(
        out,
        to_dict(job),
        index.to_json(),
        [s.name for s in stages] + [shard_stage.name],
        all_stats,
        ray_info,
        timing,
        schema=manifest_schema(spec),
        fits=fits,
        side_tables={t: cols for g in spec.fitted for t, cols in g.side_tables().items()},
    )
    if retrypass.wanted(spec):
        manifest["crawl"] = {
            name: {"hosts": crawl.get(name), "deferred_retry": retrypass.totals(out, shard_ids)} for name in crawl
        } or {"deferred_retry": retrypass.totals(out, shard_ids)}
    path = write_manifest(out, manifest)
    _log(f"shards: {layout.shards_dir(out)}  manifest: {path}")
    # the last line says what happened
    _log(outcome.summary(manifest, timing["wall_seconds"], len(all_stats), outcome.advice_of(spec.stages)))
    return manifest


def _deferred_retry(runner, launcher, spec: RunSpec, shard_ids: list[int]) -> None:
    """One more try for the rows that failed for a transient reason
    (``pipeline.retrypass``), after the per-row pass."""
    todo = retrypass.plan(spec, shard_ids)
    if not todo:
        return
    t = time.perf_counter()
    parts = retrypass.Parts()
    runner.run_rows(retrypass.retry_spec(spec), sorted(todo), parts, only=todo)
    counts = launcher.map(retrypass.merge, sorted(todo), spec=spec, retried=parts.parts)
    tried = sum(c["tried"] for cs in counts for c in cs.values())
    back = sum(c["recovered"] for cs in counts for c in cs.values())
    _log(f"deferred retry: {back} of {tried} rows recovered ({time.perf_counter() - t:.1f}s)")


def manifest_schema(spec: RunSpec) -> list[dict]:
    """The declared columns, with the stage that adds each (``manifest.json``)."""
    return [{**col.to_json(), "stage": owner} for _, (owner, col) in spec.columns.items()]


def _find_stage_error(e: BaseException | None, depth: int = 0) -> StageError | None:
    while e is not None and depth < 12:
        if isinstance(e, StageError):
            return e
        cause = getattr(e, "cause", None)  # RayTaskError keeps the task's exception here
        if isinstance(cause, BaseException) and cause is not e:
            found = _find_stage_error(cause, depth + 1)
            if found is not None:
                return found
        e, depth = e.__cause__ or e.__context__, depth + 1
    return None


def _stage_error(out, e: StageError) -> str:
    """One line for the user; the trace goes to ``OUT/_work/error.log``."""
    log = layout.work_dir(out) / "error.log"
    record = f"{datetime.now(timezone.utc).isoformat()} stage {e.stage}, row {e.key}\n{e.trace}\n"
    storage.append_text(log, redact_text(record))
    where = f"row {e.key}" if e.key is not None else "a batch (no single row fails alone)"
    # the fields, not str(e): under Ray the exception's text is Ray's whole traceback
    line = f"stage {e.stage} failed on {where}: {e.error} (trace in {log}; a stage should reject a bad row, not raise)"
    return redact_text(line)


def with_overrides(job: JobConfig, **output) -> JobConfig:
    return dataclasses.replace(job, output=dataclasses.replace(job.output, **output))
