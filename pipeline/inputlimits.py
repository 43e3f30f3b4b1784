"""Bounds on what a URL list may hold, applied as it is read.

Why this exists: a URL list is data from anywhere (a scrape, a published
dataset, a colleague's export), and the reader is the first code that
touches it, on the driver. Unbounded, a few kilobytes could take the run
down before it started: a JSON line nested 20,000 deep made pyarrow's JSON
reader segfault; two 50 MB captions in a 2 KB parquet cost 378 MB; 50,000
columns cost 817 MB for one row; an input column named ``__t_shard`` was
summed as stage time. Each bound here is either a clear job error naming
the file (and line), or a per-row status: the row is kept, rejected by the
``input`` stage with a reason, its oversized value cut to the bound, so
nothing is lost silently and one bad row never stops a run.

The bounds (``input.limits`` in a job, per source; docs/security.md):

=====================  =========  ============================================
``max_caption_chars``  16384      longer captions: row rejected ``caption_too_long``
``max_url_chars``      8192       longer URLs: row rejected ``url_too_long``
``max_columns``        1024       more columns in a file: job error
``max_line_bytes``     1 MiB      a longer JSON line: job error naming the line
``max_json_depth``     32         deeper JSON (a JSONL line): job error naming the line
``max_file_bytes``     64 GiB     a larger JSONL, CSV or TSV file: job error
``max_coco_bytes``     2 GiB      a larger COCO file (read whole): job error
=====================  =========  ============================================

An input ``image_ext`` column (a job without ``download`` passes it to the
shard writer as the tar member's extension) must be 1-16 ASCII letters or
digits; another value rejects the row (``invalid_image_ext``).

Column names: a name starting with ``_`` is pairforge's (``__t_`` stage
timings, ``__pf_`` scratch columns; the shard writer leaves every ``_``
column out of the parquet), so an input column so named is carried as
``input_<name>`` (``__t_x`` -> ``input___t_x``), as a name that collides
with a column pairforge sets is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairforge.manifests.members import MEMBER_EXT as SAFE_EXT  # what an ``image_ext`` may be
from pairforge.stages.base import READ_STAGE, STATUS_FAILED, STATUS_OK, require


@dataclass(frozen=True)
class InputLimits:
    """A source's bounds (see the module doc for what each one does)."""

    max_caption_chars: int = 16384
    max_url_chars: int = 8192
    max_columns: int = 1024
    max_line_bytes: int = 1 << 20
    max_json_depth: int = 32
    max_file_bytes: int = 64 << 30
    max_coco_bytes: int = 2 << 30

    def __post_init__(self):
        for name, value in self.__dict__.items():
            require(type(value) is int and value >= 1, name, value, "an integer >= 1")


class InputError(ValueError):
    """A file breaks a bound; the reader turns it into a ``ConfigError``."""


# ------------------------------------------------------------------ columns


def check_column_count(names, limits: InputLimits, path) -> None:
    if len(names) > limits.max_columns:
        raise InputError(f"{path}: {len(names)} columns, more than input.limits.max_columns ({limits.max_columns})")


def is_reserved_name(name: str) -> bool:
    """A name pairforge keeps for itself (timings, scratch, bookkeeping)."""
    return name.startswith("_")


# ------------------------------------------------------------------ JSON depth


def json_depth(value) -> int:
    """How deep ``value`` (parsed JSON) nests: 0 for a scalar, 1 for a flat
    list or object. Iterative, so no depth can exhaust the stack here."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        todo.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def line_problem(line: bytes, limits: InputLimits) -> str:
    """``""`` when a JSON line is within the depth bound, else why not.
    Most lines hold fewer brackets than the bound and cost two counts; a
    line with more is parsed (Python's parser stops at its recursion limit
    with an error, it does not crash) and measured."""
    if line.count(b"[") + line.count(b"{") <= limits.max_json_depth:
        return ""
    try:
        depth = json_depth(json.loads(line))
    except RecursionError:
        depth = -1
    except ValueError as e:
        return f"not JSON: {e}"
    if depth < 0 or depth > limits.max_json_depth:
        shown = "more than 900" if depth < 0 else str(depth)
        return f"nested {shown} deep, more than input.limits.max_json_depth ({limits.max_json_depth})"
    return ""


# ------------------------------------------------------------------ rows


def bound_rows(table: pa.Table, limits: InputLimits) -> pa.Table:
    """``table`` (``url``, ``caption``, carried columns) with the identity
    columns of a row's fate set: a row over a per-row bound is rejected by
    :data:`READ_STAGE` with the reason and the values behind it, its
    oversized value cut to the bound."""
    n = table.num_rows
    reasons: list[tuple[str, np.ndarray, dict]] = []
    cols = {name: table.column(name) for name in table.column_names}
    per_row = (("url", "url_too_long", limits.max_url_chars), ("caption", "caption_too_long", limits.max_caption_chars))
    for col, reason, bound in per_row:
        chars = pc.fill_null(pc.utf8_length(cols[col]), 0).to_numpy(zero_copy_only=False)
        over = chars > bound
        if over.any():
            reasons.append((reason, over, {"column": col, "chars": chars, "max_chars": bound}))
            cols[col] = pc.utf8_slice_codeunits(cols[col], 0, bound)
    if "image_ext" in cols:
        ok = _safe_ext(cols["image_ext"])
        if not ok.all():
            reasons.append(("invalid_image_ext", ~ok, {"column": "image_ext", "allowed": SAFE_EXT.pattern}))
    status = np.full(n, STATUS_OK, dtype=object)
    stage = np.full(n, "", dtype=object)
    reason = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    for why, mask, facts in reasons:
        for i in np.flatnonzero(mask & (reason == "")):
            d = {k: (int(v[i]) if isinstance(v, np.ndarray) else v) for k, v in facts.items()}
            status[i], stage[i], reason[i], detail[i] = STATUS_FAILED, READ_STAGE, why, json.dumps(d, sort_keys=True)
    fate = {"status": status, "stage": stage, "reason": reason, "detail": detail}
    return pa.table({**cols, **{k: pa.array(v.tolist(), pa.string()) for k, v in fate.items()}})


def _safe_ext(ext: pa.ChunkedArray) -> np.ndarray:
    """Per row: a null or an extension of :data:`SAFE_EXT` (numbers as their text)."""
    try:
        values = pc.cast(ext, pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # lists, structs: no extension
        return np.array([v is None for v in ext.to_pylist()], dtype=bool)
    return np.array([v is None or SAFE_EXT.fullmatch(v) is not None for v in values], dtype=bool)
