"""What the largest task of each step costs: its peak memory, for benches.

Why: a driver that stays flat is not enough at web scale: one task whose
memory grows with the dataset (a ``combine`` over every duplicate pair, a
fit step fed the whole centroid table) fails the run on the largest input
however many nodes there are. ``bench/scale.py`` reports, per size, the
peak memory of the largest task of each step, so what grows shows.

With ``PAIRFORGE_TASK_MEMORY`` set in the environment of the run (Ray
workers inherit it from the driver that starts a local Ray), each measured
step resets its process's peak RSS (Linux: ``/proc/self/clear_refs``),
runs, and leaves one small JSON record under ``OUT/_work/taskmem/``:
resident memory at the start and the peak, in bytes. Worker processes are
reused, so the peak counts the process's own baseline (imports, caches);
the growth above the start is what the task itself needed. Off (the
default), :func:`measure` costs one environment lookup.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager

from pairforge.manifests import layout, storage

ENV = "PAIRFORGE_TASK_MEMORY"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def _status() -> dict[str, int]:
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or not allowed: the peak is the process's lifetime peak
        return False


def folder(out):
    return layout.work_dir(out) / "taskmem"


#: measured blocks open in this process: only the outermost one records (an inner reset would hide its peak)
_DEPTH = [0]


@contextmanager
def measure(out, step: str):
    """Record the peak memory of the ``with`` block as one task of ``step``
    (inside another measured block, nothing: the outer one counts it)."""
    if not enabled() or _DEPTH[0]:
        yield
        return
    _DEPTH[0] += 1
    reset = _reset_peak()
    start = _status().get("VmRSS", 0)
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        peak = _status().get("VmHWM", 0)
        rec = {"step": step, "start": start, "peak": peak, "reset": reset, "pid": os.getpid()}
        path = folder(out) / f"{uuid.uuid4().hex}.json"
        storage.write_atomic(path, json.dumps(rec).encode(), fsync=False)


def largest(out) -> dict[str, dict]:
    """Per step: the task with the highest peak (``peak``, ``growth`` above
    its start, in bytes) and how many tasks ran."""
    by: dict[str, dict] = {}
    base = folder(out)
    if not base.exists():
        return by
    for path in base.iterdir():
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cur = by.setdefault(rec["step"], {"peak": 0, "growth": 0, "tasks": 0})
        cur["tasks"] += 1
        cur["peak"] = max(cur["peak"], int(rec["peak"]))
        cur["growth"] = max(cur["growth"], int(rec["peak"]) - int(rec["start"]))
    return by
