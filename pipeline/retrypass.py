"""The deferred retry pass: rows that failed for a transient reason get one
more try at the end of the per-row pass.

Why at the end, not at once. A host that answers ``503`` or times out is
often busy or restarting for seconds to minutes; trying its rows again in the
same breath fails them again and adds to its load (img2dataset users re-run
whole jobs to recover such rows). By the end of the pass the host's pause
(its ``Retry-After``, or the gate's back-off) has run out, and the rows are
few. A stage says which of its failures qualify (``Stage.retry_later``;
download: timeouts, broken connections, 5xx, 429, a host that was down).

How. :func:`plan` reads the fit files of shards whose rows are on disk and
not yet retried, and lists the keys to try again per shard. The runner sends
those rows of the input shards through every per-row stage again (the stages'
``for_retry`` copies, so a down host's rows wait for its probe), saving them
as parts of their own (``engine.save_rows``). :func:`merge` then replaces, per
shard, each retried row in its part by its new version, in the same order,
writes the new parts, and rewrites the shard's finished mark with the new
parts and its retry counts, last, so that an interruption leaves the old mark
valid. A mark that says ``retried`` is never retried again, on a resume too.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np

from pairforge.manifests import layout
from pairforge.pipeline import engine, resume
from pairforge.pipeline.engine import RunSpec
from pairforge.stages.base import STATUS_OK, Batch, Stage, batch_len, concat, take


def wanted(spec: RunSpec) -> bool:
    """Whether a stage of the run may ask for retries."""
    return any(type(s).retry_later is not Stage.retry_later for s in spec.stages)


def plan(spec: RunSpec, shard_ids: list[int]) -> dict[int, list[str]]:
    """Per shard whose rows are on disk and not yet retried, the keys of its
    rows to try again (shards with none are marked retried here)."""
    stages = {s.name: s for s in spec.stages}
    out: dict[int, list[str]] = {}
    for sid in shard_ids:
        mark = resume.rows_mark(spec.out, sid)
        if mark is None or "retried" in mark:
            continue
        rows = engine.read_fit_rows(spec, sid, ())
        keys = [
            str(k)
            for k, st, stage, reason in zip(rows["key"], rows["status"], rows["stage"], rows["reason"])
            if st != STATUS_OK and str(stage) in stages and stages[str(stage)].retry_later(str(reason))
        ]
        if keys:
            out[sid] = keys
        else:
            resume.write_rows_mark(spec.out, sid, {**mark, "retried": {}})
    return out


def retry_spec(spec: RunSpec) -> RunSpec:
    return dataclasses.replace(spec, stages=tuple(s.for_retry() for s in spec.stages))


class Parts:
    """Collects the records ``engine.save_rows`` returns for the retried rows."""

    def __init__(self):
        self.parts: dict[int, list[str]] = {}
        self.finished: list[int] = []

    def add(self, records: Batch) -> None:
        for sid, part in zip(records["shard_id"], records["part"]):
            self.parts.setdefault(int(sid), []).append(str(part))


def merge(shard_id: int, spec: RunSpec, retried: dict) -> dict:
    """Put the retried rows of one shard in place of their first tries.
    Returns its counts per first reason: ``tried``, ``recovered``, and the
    reasons the rest failed with in the end."""
    folder = layout.rows_dir(spec.out, shard_id)
    mark = resume.rows_mark(spec.out, shard_id)
    if mark is None or "retried" in mark:
        return mark.get("retried", {}) if mark else {}
    new_parts = retried.get(shard_id, [])
    new = concat([engine.read_part(folder, p) for p in new_parts]) if new_parts else {}
    at = {str(k): i for i, k in enumerate(new.get("key", ()))}
    counts: dict[str, dict] = {}
    names = []
    for p in mark["parts"]:
        old = engine.read_part(folder, p)
        keys = [str(k) for k in old["key"]]
        hit = [i for i, k in enumerate(keys) if k in at]
        if not hit:
            names.append(p)
            continue
        for i in hit:
            first, again = str(old["reason"][i]), at[keys[i]]
            c = counts.setdefault(first, {"tried": 0, "recovered": 0, "failed": {}})
            c["tried"] += 1
            if new["status"][again] == STATUS_OK:
                c["recovered"] += 1
            else:
                why = str(new["reason"][again])
                c["failed"][why] = c["failed"].get(why, 0) + 1
        rows = _replaced(old, new, [at[keys[i]] for i in hit], hit)
        name = uuid.uuid4().hex
        engine.write_part(folder, name, rows, spec)
        names.append(name)
    resume.write_rows_mark(spec.out, shard_id, {**mark, "parts": sorted(names), "retried": counts})
    for p in set(mark["parts"]) - set(names):
        resume.remove_part(folder, p)
    for p in new_parts:
        resume.remove_part(folder, p)
    return counts


def _replaced(old: Batch, new: Batch, new_idx: list[int], old_idx: list[int]) -> Batch:
    """``old`` with rows ``old_idx`` replaced by ``new``'s rows ``new_idx``, in order."""
    n = batch_len(old)
    keep = np.setdiff1d(np.arange(n), old_idx)
    both = concat([take(old, keep), take(new, np.array(new_idx, dtype=np.int64))])
    position = np.concatenate([keep, np.array(old_idx, dtype=np.int64)])
    return take(both, np.argsort(position, kind="stable"))


def totals(out, shard_ids: list[int]) -> dict:
    """The retry counts of every shard's mark added up, per first reason."""
    total: dict[str, dict] = {}
    for sid in shard_ids:
        mark = resume.rows_mark(out, sid, images=False)
        for reason, c in ((mark or {}).get("retried") or {}).items():
            t = total.setdefault(reason, {"tried": 0, "recovered": 0, "failed": {}})
            t["tried"] += c["tried"]
            t["recovered"] += c["recovered"]
            for why, k in c["failed"].items():
                t["failed"][why] = t["failed"].get(why, 0) + k
    return dict(sorted(total.items()))
