"""What the steps of a global stage's fit hand each other, as data.

Why objects rather than attributes of the stage: the fit's steps run in
different processes (a Ray task each), so state kept on the stage by one
step (k-means centroids, a score cut) only reached the next one because a
runner shipped the mutated stage along, and a test could not tell what a
step depended on. Here each step returns what it found and the next step
takes it as an argument (``stages.base.GlobalStage``):

* :class:`Learned`: what ``learn`` fitted on a sample, and the rule
  ``combine`` found for ``decide_rows`` (``FitResult.rule``). Its
  ``values`` are small and plain (JSON); its ``arrays`` may grow with the
  data (centroids, a set of token hashes): the Ray runner writes them as
  ``.npy`` files (never pickle: the work folder lives under the user's output
  folder) and each task reads them back, so no task argument grows with the
  dataset.
* :class:`FitResult`: what ``combine`` (or ``decide_rows``) decided:
  decisions by key, side tables, counters, and the rule.

The stage itself is never changed by its fit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pairforge.stages.batch import Batch

#: an array's name in :attr:`Learned.arrays` (a file name in the work folder)
ARRAY_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass(frozen=True)
class Learned:
    """What a fit step learnt, for the steps after it.

    ``values``: small things, JSON-able (numbers, strings, lists, dicts:
    a score window, a cut). ``arrays``: numeric ``numpy`` arrays by name
    (``[A-Za-z0-9_]``, at most 64), for what grows with the data. The arrays
    are read-only: every task of a process shares them.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        try:
            json.dumps(dict(self.values), allow_nan=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"Learned.values: expected JSON-able values, got {self.values!r} ({e})") from None
        frozen = {}
        for name, arr in dict(self.arrays).items():
            if not ARRAY_NAME.fullmatch(str(name)):
                raise ValueError(f"Learned.arrays: name {name!r}: expected 1-64 of A-Z a-z 0-9 _")
            a = np.asarray(arr)
            if a.dtype.kind not in "biufc":  # an object array would need pickle to be written
                raise ValueError(f"Learned.arrays[{name!r}]: expected a numeric array, got dtype {a.dtype}")
            a = a.view()
            a.flags.writeable = False
            frozen[str(name)] = a
        object.__setattr__(self, "values", dict(self.values))
        object.__setattr__(self, "arrays", frozen)


@dataclass(frozen=True)
class FitResult:
    """What a global stage's fit decides, as data.

    ``decisions``: a batch with ``key``, ``reason`` (``""``: the row stays,
    only columns are set), ``detail`` (JSON or dict), optionally ``survivor``
    (bool: this kept row represents dropped duplicates), and any of the stage's
    declared output columns to set on those rows. ``tables``: side tables,
    name -> rows (see ``GlobalStage.side_tables``). ``counters``: named
    counts (rows per kind, skips per reason) the manifest sums under the fit.
    ``rule``: returned by ``combine`` only, when the decisions are made per
    shard afterwards: what ``decide_rows`` needs (a score cut, the entries
    over a limit); ``None``: ``combine``'s decisions are all there is.
    """

    decisions: Batch = field(default_factory=dict)
    tables: dict[str, Batch] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    rule: Learned | None = None
