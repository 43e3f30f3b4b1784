"""Before the run: what the stages have to say about the URL lists' first rows.

Why this exists: some mistakes show only in the data, and a run of
hundreds of millions of rows should not be where a user finds them (a
server of one's own on ``127.0.0.1`` that ``download`` refuses ended as a
run whose rows all failed ``blocked_address``). The first
:data:`SAMPLE_ROWS` rows of the input shards the reader wrote are read
once, on the driver, and each stage says what it sees in them
(``Stage.input_warnings``: one line each). Warnings, not errors: the rows
that would fail still fail as rows, with their reason. Nothing here names a
stage; reading the sample makes no request but to the output's own storage.
"""

from __future__ import annotations

from pairforge.manifests import layout, storage
from pairforge.pipeline.batches import table_to_batch
from pairforge.pipeline.reader import read_index
from pairforge.stages.base import Batch, Stage, batch_len, concat

#: rows looked at (the first input shards'): enough to see a pattern, cheap to read
SAMPLE_ROWS = 10_000


def first_rows(out, limit: int = SAMPLE_ROWS) -> Batch:
    """The first ``limit`` rows of the input shards under ``out`` (as the
    reader wrote them), in shard order; empty before the reader ran."""
    index = read_index(out)
    if index is None:
        return {}
    parts, n = [], 0
    for sid in sorted(index.shard_rows):
        if n >= limit:
            break
        table = storage.read_parquet(layout.input_shard(out, sid))
        part = table_to_batch(table.slice(0, limit - n))
        parts.append(part)
        n += table.num_rows
    if not parts:
        return {}
    # the columns every part has: lists of several sources may differ in
    # their extra columns (a ``license`` in one), never in url and caption
    common = [c for c in parts[0] if all(c in p for p in parts[1:])]
    return concat([{c: p[c] for c in common} for p in parts])


def input_warnings(stages: list[Stage], out) -> list[str]:
    """Each stage's warnings about the first rows of the URL lists
    (``Stage.input_warnings``), in stage order; ``stages[i]`` is named
    ``stages[i](<name>)`` in them."""
    rows = first_rows(out)
    if not batch_len(rows):
        return []
    lines: list[str] = []
    for i, st in enumerate(stages):
        lines.extend(st.input_warnings(rows, f"stages[{i}]({st.name})"))
    return lines
