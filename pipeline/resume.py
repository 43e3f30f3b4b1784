"""Resume: what a run leaves under ``OUT`` to go on from, and how the next
run with ``--resume`` reads it. Every mark is read and written here.

Why one module: a resumed run is only as right as its reading of what the
last one left, and that reading used to be spread over the job driver, the
phases (``pipeline.engine``), the fit (``pipeline.fit``), the chunks
(``pipeline.chunks``) and the shard writer's stats. Here it is in one place,
from the finest grain to the coarsest:

* **parts** (``_work/rows/S/<part>.rows.arrow`` + ``.fit.parquet``): the
  chunks of an input shard's rows a task saved as it went
  (``engine.save_rows``). A part counts once its fit file exists; a resume
  runs only the rows no saved part holds (:func:`saved_parts`).
* **rows marks** (``_work/rows/S.done``): all of an input shard's rows are
  on disk, in the parts the mark names (:class:`RowsTracker` writes it on the
  driver; :func:`rows_mark` reads it, never trusting a part name read back).
* **fit marks** (``_work/fit/<stage>/done.json``): a global stage's fit
  finished, with its counters (:func:`fit_mark`).
* **shard stats** (``shards/S_stats.json``, ``manifests.shards``): a shard is
  written, every file it lists there (:func:`shard_written`).

:func:`plan_shards` turns them into what a run does with each shard; the
job record (``_work/job.json``, :func:`write_job_record`) lets
:func:`job_change` refuse a resume of another job or other URL lists before
anything is written; :func:`run_state` says in one line what an interrupted
run left.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from pairforge.manifests import layout, storage
from pairforge.manifests.shards import read_stats
from pairforge.pipeline.config import JobConfig
from pairforge.pipeline.reader import input_files, read_index
from pairforge.pipeline.workdir import job_record
from pairforge.stages.base import STATUS_OK, Batch, batch_len

#: a part's rows file and its fit-columns file, beside each other in ``rows_dir``
PART_ROWS, PART_FIT = ".rows.arrow", ".fit.parquet"
#: a part's name: what ``save_rows`` gives (a uuid's hex) or another writer's of the same alphabet
PART_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def checked_name(name: str) -> str:
    """``name`` if it is a part's name (:data:`PART_NAME`), else ``ValueError``:
    a name read from ``_work`` never becomes a path outside its folder."""
    if not isinstance(name, str) or not PART_NAME.fullmatch(name):
        raise ValueError(f"part name {name!r}: expected 1-64 of A-Z a-z 0-9 _ -")
    return name


def part_files(name: str, images: bool = True) -> list[str]:
    """The file names of part ``name``: its fit file and, with ``images``,
    its rows file (removed once its shard is written)."""
    return [f"{name}{PART_FIT}"] + ([f"{name}{PART_ROWS}"] if images else [])


def remove_part(folder, name: str, fit: bool = True) -> None:
    """Remove part ``name``'s rows file (and, with ``fit``, its fit file)."""
    (folder / f"{checked_name(name)}{PART_ROWS}").unlink(missing_ok=True)
    if fit:
        (folder / f"{name}{PART_FIT}").unlink(missing_ok=True)


def records(parts: list[tuple[int, str, np.ndarray, np.ndarray]]) -> Batch:
    """One record per part (shard, part name, its rows' status and stage):
    what the driver's tracker reads."""
    dropped = []
    for _, _, status, stage in parts:
        gone = np.asarray(status, dtype=object) != STATUS_OK
        stages, counts = np.unique(np.asarray(stage, dtype=object)[gone].astype(str), return_counts=True)
        dropped.append(json.dumps(dict(zip(stages.tolist(), counts.tolist()))))
    return {
        "shard_id": np.array([p[0] for p in parts], dtype=np.int64),
        "rows": np.array([len(p[2]) for p in parts], dtype=np.int64),
        "part": np.array([p[1] for p in parts], dtype=object),
        # rows rejected so far per stage, as JSON: the driver's progress line reads it
        "dropped": np.array(dropped, dtype=object),
    }


def saved_parts(out, shard_id: int) -> tuple[Batch, set[str]]:
    """The parts an unfinished input shard already saved, as records (what
    ``engine.save_rows`` returned for them), and the keys of their rows.

    A part is saved once its fit file exists: ``engine.write_part`` writes the
    rows file first, each file atomically. A rows file without its fit file
    (a kill between the two) is removed, so the resume writes those rows again."""
    folder = layout.rows_dir(out, shard_id)
    try:
        names = [p.name for p in folder.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    rows = {n[: -len(PART_ROWS)] for n in names if n.endswith(PART_ROWS)}
    fits = {n[: -len(PART_FIT)] for n in names if n.endswith(PART_FIT)}
    saved = sorted(p for p in rows & fits if PART_NAME.fullmatch(p))
    for p in sorted((rows | fits) - set(saved)):
        if PART_NAME.fullmatch(p):
            remove_part(folder, p)
    recs, keys = [], set()
    for p in saved:
        t = storage.read_parquet(folder / f"{p}{PART_FIT}", columns=["key", "status", "stage"])
        mine = t.column("key").to_pylist()
        if keys.intersection(mine):  # a task Ray retried while its first try still ran: one copy of a row
            remove_part(folder, p)
            continue
        status, stage = (t.column(c).to_numpy(zero_copy_only=False) for c in ("status", "stage"))
        recs.append((int(shard_id), p, status, stage))
        keys.update(mine)
    return records(recs), keys


# ------------------------------------------------------------------ rows marks


class RowsTracker:
    """On the driver: counts the rows each input shard has on disk and marks
    the shard finished when all of them are (state: the parts of the shards
    in flight). A part reported twice (a resumed shard's saved parts, a
    retried task) counts once."""

    def __init__(self, spec, expected: dict[int, int]):
        self.spec, self.expected = spec, expected
        self.rows: dict[int, int] = {}
        self.parts: dict[int, list[str]] = {}
        self.finished: list[int] = []
        self._finished: set[int] = set()

    def add(self, records: Batch) -> np.ndarray:
        """Count the parts ``records`` name; returns which records were new."""
        new = np.zeros(batch_len(records), dtype=bool)
        for i, (sid, n, part) in enumerate(zip(records["shard_id"], records["rows"], records["part"])):
            sid = int(sid)
            if sid in self._finished or str(part) in self.parts.get(sid, ()):
                continue
            new[i] = True
            self.rows[sid] = self.rows.get(sid, 0) + int(n)
            self.parts.setdefault(sid, []).append(str(part))
            want = self.expected[sid]
            if self.rows[sid] > want:
                raise RuntimeError(f"input shard {sid}: {self.rows[sid]} rows saved, expected {want}")
            if self.rows[sid] == want:
                mark = {"rows": want, "parts": sorted(self.parts.pop(sid))}
                write_rows_mark(self.spec.out, sid, mark)
                self.finished.append(sid)
                self._finished.add(sid)
                self.rows.pop(sid)
        return new


def write_rows_mark(out, shard_id: int, mark: dict) -> None:
    """Write an input shard's finished mark (what :func:`rows_mark` reads), atomically."""
    layout.atomic_write_bytes(layout.rows_done(out, shard_id), json.dumps(mark).encode())


def rows_mark(out, shard_id: int, images: bool = True) -> dict | None:
    """The finished mark of an input shard's rows, or ``None`` if the shard
    has not finished its per-row pass (or, with ``images``, its image parts
    are gone because its shard was written)."""
    try:
        mark = json.loads(layout.rows_done(out, shard_id).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not _valid_mark(mark):
        return None
    folder = layout.rows_dir(out, shard_id)
    need = [f for p in mark["parts"] for f in part_files(p, images)]
    return mark if all((folder / n).exists() for n in need) else None


def _valid_mark(mark) -> bool:
    """A mark read from ``_work`` names parts by safe names only: a planted
    ``../`` never becomes a path that is read or deleted."""
    if not isinstance(mark, dict) or not isinstance(mark.get("parts"), list) or type(mark.get("rows")) is not int:
        return False
    return all(isinstance(p, str) and PART_NAME.fullmatch(p) for p in mark["parts"])


def clear_rows(out, shard_id: int) -> None:
    """Forget an unfinished per-row pass of one input shard."""
    storage.rmtree(layout.rows_dir(out, shard_id))


# ------------------------------------------------------------ fits, shards


def write_fit_mark(out, stage: str, info: dict) -> None:
    """A global stage's fit finished, with its counters (what :func:`fit_mark` reads)."""
    layout.atomic_write_bytes(layout.fit_done(out, stage), json.dumps(info, sort_keys=True).encode())


def fit_mark(out, stage: str) -> dict | None:
    """The counters of ``stage``'s finished fit, or ``None`` when it has not finished."""
    try:
        return json.loads(layout.fit_done(out, stage).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_written(out, shard_id: int) -> dict | None:
    """The stats of a written shard (``manifests.shards.read_stats``), or
    ``None`` when it is not written whole."""
    return read_stats(out, shard_id)


# ------------------------------------------------------------------ a resumed run


@dataclass
class ShardPlan:
    """What a run does with each input shard, from what the last one left."""

    #: shards written whole (only on ``--resume``): nothing to do
    written: list[int] = field(default_factory=list)
    #: shards whose rows are all on disk: to fit and write
    waiting: list[int] = field(default_factory=list)
    #: shards whose per-row pass runs (again)
    todo: list[int] = field(default_factory=list)
    #: the records of the parts shards of ``todo`` saved before a kill: their rows are not run again
    saved: list[Batch] = field(default_factory=list)

    @property
    def saved_rows(self) -> int:
        return sum(int(r["rows"].sum()) for r in self.saved)


def plan_shards(out, shard_ids: list[int], resume: bool, refits: bool) -> ShardPlan:
    """Read every shard's marks: written, rows done, or to run. ``refits``:
    the job has global stages, which rerun when any shard runs its rows, so
    a written shard whose fit files are gone runs again too. Parts of a
    shard to run are kept on ``--resume`` (its rows are not fetched again)
    and cleared otherwise."""
    written = [s for s in shard_ids if resume and shard_written(out, s) is not None]
    have_fit = {s for s in shard_ids if rows_mark(out, s, images=False) is not None}
    waiting = [s for s in shard_ids if s not in written and rows_mark(out, s) is not None]
    todo = [s for s in shard_ids if s not in written and s not in waiting]
    if todo and refits:  # fits will rerun: every written shard needs its fit files
        lost = [s for s in written if s not in have_fit]
        written = [s for s in written if s not in lost]
        todo = sorted(todo + lost)
    saved = []
    for s in todo:
        if not resume or layout.rows_done(out, s).exists():  # a written shard's parts have lost their images
            clear_rows(out, s)
        else:
            recs, _ = saved_parts(out, s)
            if batch_len(recs):
                saved.append(recs)
    return ShardPlan(written, waiting, todo, saved)


def remove_temp_files(out) -> int:
    """Remove what interrupted writes left (every file is written under a
    temporary name, then renamed); returns how many."""
    stale = layout.temp_files(out)
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def write_job_record(out, job: JobConfig) -> None:
    """Record what a resume of this run must share with it (``_work/job.json``,
    ``pipeline.workdir.job_record``), read back by :func:`job_change`."""
    layout.atomic_write_bytes(layout.job_record(out), json.dumps(job_record(job), sort_keys=True).encode())


def job_change(out, job: JobConfig, index) -> str | None:
    """Why ``job`` cannot resume the run in ``out`` (its settings against
    ``_work/job.json``, its URL lists against the index), or ``None``."""
    path = layout.job_record(out)
    if path.exists():
        old, new = json.loads(path.read_text()), job_record(job)
        if old != new:
            changed = _changed_keys(old, new)
            return (
                f"{out}: the job changed since the interrupted run ({'; '.join(changed[:5])}); resume needs the "
                "same job (nothing was changed on disk)"
            )
    files = input_files(job.input, job.storage)
    was = [{k: f.get(k) for k in ("path", "format", "rows")} for f in index.files]
    if files != was or index.samples_per_shard != job.output.samples_per_shard:
        diff = [f"{a['path']}: {a['rows']} -> {b['rows']} rows" for a, b in zip(was, files) if a != b]
        if len(was) != len(files):
            diff.append(f"{len(was)} -> {len(files)} files")
        return (
            f"{out}: the URL lists changed since the interrupted run ({'; '.join(diff[:5])}); resume needs the same "
            "input (nothing was changed on disk)"
        )
    return None


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs (stages by position)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line for k in sorted(set(old) | set(new)) for line in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in _changed_keys(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def run_state(out_dir, config: storage.StorageConfig | None = None) -> str:
    """What an interrupted run left on disk, in one line."""
    out = storage.path(out_dir, config)
    index = read_index(out)
    if index is None:
        return "no input shard was written yet"
    sids = sorted(index.shard_rows)
    rows = sum(rows_mark(out, s, images=False) is not None for s in sids)
    shards = sum(shard_written(out, s) is not None for s in sids)
    return f"{rows} of {len(sids)} input shards have their rows on disk, {shards} of {len(sids)} shards are written"
