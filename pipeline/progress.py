"""pairforge's own progress, and Ray's kept quiet unless asked for.

Why: Ray Data's progress is per operator and, without a TTY, a 10-line
status block every 10 s (hundreds of lines for a small job), with INFO logs
and warnings that do not apply to this plan in between. What a user wants to
know is the run's: rows done of total, rows/s, ETA, and how many rows each
stage dropped so far. :class:`ProgressTracker` shows that for the per-row
pass, a tqdm bar in a terminal and one line every ``every`` seconds in a log.
:func:`quiet_ray` turns Ray Data's progress bars and INFO console logs off
(its log file in the Ray session folder keeps everything); ``--verbose``
leaves Ray as it is.

Drops so far: the driver gets one record per saved part (shard, rows, part
name) and nothing about the rows' fates, so each part's ``stage`` column is
read from its fit file (a few bytes a row, beside the part on ``OUT``). The
global stages' drops are decided after the pass and are not in these counts.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from pairforge.manifests import layout, storage
from pairforge.pipeline.engine import RunSpec
from pairforge.pipeline.resume import RowsTracker

#: seconds between progress lines when stderr is not a terminal
DEFAULT_EVERY = 30.0
#: Ray Data console messages that are wrong for this plan (it bounds its own
#: concurrency) or only restate a choice made here
QUIET_MESSAGES = (
    "Progress bars disabled",
    "Warning: The Ray cluster currently does not have any available CPUs",
)


def _log(msg: str) -> None:
    print(f"[pairforge] {msg}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressTracker(RowsTracker):
    """A :class:`RowsTracker` that also shows the per-row pass's progress:
    rows of ``expected`` saved, their rate, an ETA and drops by stage. A
    thread of its own refreshes the bar each second, or prints a line every
    ``every`` seconds, also while no part lands (a large input shard is one
    task); :meth:`close` stops it and prints the totals."""

    def __init__(self, spec: RunSpec, expected: dict[int, int], *, every: float | None = None, tty: bool | None = None):
        super().__init__(spec, expected)
        self.total = sum(expected.values())
        self.done = 0
        self.dropped: Counter[str] = Counter()
        self.every = DEFAULT_EVERY if every is None else float(every)
        self._t0 = time.monotonic()
        self._read_drops = True
        tty = sys.stderr.isatty() if tty is None else tty
        self._bar = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="row", desc="[pairforge] rows", file=sys.stderr, dynamic_ncols=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="pairforge-progress", daemon=True)
        self._beat.start()

    def add(self, records) -> None:
        new = super().add(records)
        records = {k: np.asarray(v)[new] for k, v in records.items()}
        n = int(sum(int(r) for r in records["rows"]))
        with self._lock:
            self.done += n
            if "dropped" in records:  # counted by the task that saved the part
                for d in records["dropped"]:
                    self.dropped.update(json.loads(str(d)))
                self._read_drops = True
            else:
                for sid, part in zip(records["shard_id"], records["part"]):
                    self._count_drops(int(sid), str(part))
            if self._bar is not None:
                self._bar.set_postfix_str(self._drops_text(), refresh=False)
                self._bar.update(n)

    def _heartbeat(self) -> None:
        period = 1.0 if self._bar is not None else max(self.every, 0.1)
        while not self._stop.wait(period):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()
                else:
                    _log(self.line())

    def _count_drops(self, shard_id: int, part: str) -> None:
        if not self._read_drops:
            return
        path = layout.rows_dir(self.spec.out, shard_id) / f"{part}.fit.parquet"
        try:
            stage = storage.read_parquet(path, columns=["stage"]).column("stage")
        except (OSError, KeyError, ValueError):  # not readable from the driver: show no drops
            self._read_drops = False
            return
        for item in pc.value_counts(pc.filter(stage, pc.not_equal(stage, ""))).to_pylist():
            self.dropped[item["values"]] += item["counts"]

    def _drops_text(self) -> str:
        if not self.dropped:
            return "dropped: -" if self._read_drops else ""
        return "dropped: " + " ".join(f"{s}={n:,}" for s, n in sorted(self.dropped.items()))

    def line(self) -> str:
        """One line: rows done of total, rows/s, ETA, drops by stage."""
        secs = max(time.monotonic() - self._t0, 1e-9)
        rate = self.done / secs
        left = self.total - self.done
        eta = duration(left / rate) if rate > 0 and left > 0 else ("-" if left else "0s")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"rows {self.done:,}/{self.total:,} ({pct:.0f}%)  {rate:,.1f} rows/s  ETA {eta}  "
            f"{self._drops_text()}".rstrip()
        )

    def close(self) -> None:
        """Stop the heartbeat; end the bar and print the pass's totals."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._beat.join()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        _log(f"{self.line()}  in {duration(time.monotonic() - self._t0)}")


class _Hide(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_MESSAGES)


_HIDE = _Hide()


def quiet_ray(verbose: bool = False) -> None:
    """Ray Data as pairforge runs it: no progress bars of its own, warnings
    and errors only on the console (its INFO logs still go to
    ``ray-data.log`` in the Ray session's log folder), without the messages
    in :data:`QUIET_MESSAGES`. ``verbose``: Ray Data's defaults."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
            if verbose:
                handler.removeFilter(_HIDE)
            else:
                handler.addFilter(_HIDE)
