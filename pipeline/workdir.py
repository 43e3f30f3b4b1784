"""``OUT/_work`` belongs to one job: a fingerprint written when a run starts.

Why this exists: what a run leaves under ``OUT/_work`` (finished rows,
fits, decisions) is trusted by the next run into that folder, which skips
the work it finds done. A fresh run used to trust it too: a job run into
the folder of another, interrupted one took that job's finished rows as
its own and wrote the old job's URLs into its rejects, and files planted
under ``_work`` (a shared bucket, NFS) were taken as finished work. So:

* a fresh run (no ``--resume``) starts only on an absent or empty
  ``_work``; a non-empty one is refused with what it holds (an interrupted
  run of this same job: ``--resume`` finishes it; another job's, or
  unbound: choose another folder), unless ``--clean-work`` deletes it;
* a run writes ``_work/run.json`` first of all, with the fingerprint of its
  job (a SHA-256 of the job as recorded, less how it is run: the runner,
  the Ray address, how the bucket is reached);
* ``--resume`` goes on only with a ``_work`` bound to the same fingerprint.

The fingerprint guards against mistakes, not against someone who can write
under ``OUT``: they can write a matching ``run.json`` too. What keeps
them from running code is that nothing under ``OUT`` is code (no pickle:
``pipeline.batchfile``) and every path read from there is checked
(``pipeline.resume.rows_mark``); see docs/security.md.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from pairforge.manifests import layout, storage
from pairforge.manifests.redact import redact
from pairforge.pipeline.config import JobConfig, to_dict

#: the version of ``run.json``
RUN_RECORD_VERSION = 1


class WorkFolderError(RuntimeError):
    """``OUT/_work`` holds work this run must not take as its own."""


def run_record(out):
    return layout.work_dir(out) / "run.json"


def job_record(job: JobConfig) -> dict:
    """What a resumed run must share with the interrupted one (``_work/job.json``):
    the job as plain data, less how it is run (both runners give the same
    rows) and where (the output folder; how the bucket is reached)."""
    rec = to_dict(job)
    for key in ("ray", "runner", "storage"):
        rec.pop(key, None)
    # the checkpoint grain is how rows are saved, not which: a resume may change it
    how = ("dir", "checkpoint_rows", "checkpoint_seconds")
    rec["output"] = {k: v for k, v in rec["output"].items() if k not in how}
    return json.loads(json.dumps(redact(rec), default=str))


def fingerprint(record: dict) -> str:
    """The SHA-256 of a job's record (:func:`job_record`)."""
    text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _old_record(out) -> dict | None:
    try:
        old = json.loads(layout.job_record(out).read_text())
        return old if isinstance(old, dict) else None
    except (FileNotFoundError, ValueError):
        return None


def _is_empty(folder) -> bool:
    return next(iter(storage.walk_files(folder)), None) is None


def _bound_to(out) -> str | None:
    """The fingerprint ``_work`` is bound to, or ``None`` (none, or unreadable)."""
    try:
        data = json.loads(run_record(out).read_text())
        return str(data["fingerprint"]) if isinstance(data, dict) else None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def bind_work(out, record: dict, *, resume: bool, clean: bool) -> str:
    """Check ``OUT/_work`` against this job and bind it (see the module doc);
    returns the job's fingerprint. Raises :class:`WorkFolderError`."""
    if resume and clean:
        raise WorkFolderError("--resume finishes the work under _work and --clean-work deletes it: give one")
    mine = fingerprint(record)
    work = layout.work_dir(out)
    if not _is_empty(work):
        bound = _bound_to(out)
        old = _old_record(out)
        if bound is None and old is not None and fingerprint(old) == mine:
            bound = mine  # an interrupted run of a pairforge before run.json: its job.json binds it
        if clean:
            storage.rmtree(work)
        elif resume and bound != mine:
            if old is not None and bound is not None:
                changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
                raise WorkFolderError(
                    f"{out}: the job changed since the interrupted run ({', '.join(changed)}); resume needs the same job"
                )
            what = "is not bound to a job" if bound is None else f"belongs to another job ({bound[:12]})"
            raise WorkFolderError(
                f"{work} {what}: this job ({mine[:12]}) cannot resume it. Choose another output folder, "
                "or pass --clean-work (without --resume) to delete it and start over"
            )
        elif not resume:
            if bound == mine:
                what = "holds an interrupted run of this job: pass --resume to finish it"
            elif bound is None:
                what = "holds files of no known job (an older pairforge, another tool, or planted): choose another output folder"
            else:
                what = f"holds the work of another job ({bound[:12]}; this one is {mine[:12]}): choose another output folder"
            raise WorkFolderError(f"{work} {what}, or pass --clean-work to delete it and start over")
    if _bound_to(out) != mine:
        rec = {
            "version": RUN_RECORD_VERSION,
            "fingerprint": mine,
            "started": datetime.now(timezone.utc).isoformat(),
        }
        layout.atomic_write_bytes(run_record(out), json.dumps(rec, sort_keys=True).encode())
    return mine
