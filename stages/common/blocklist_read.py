"""Reading opt-out and takedown lists from files.

Lists come from many hands (a publisher's own takedown log, opt-out
registry exports, hash lists from a safety partner), so the formats are the
plain ones: a text file with one entry a line (``#`` comments, blank lines;
``.gz`` too), or one column of a parquet or CSV table. Entries are read as
columns (``blocklist_norm.classify``), so a list of a million URLs loads in
seconds.

A line that cannot be read fails the whole list (:class:`ListError`, naming
the file, the line and why): a takedown list applied in part would leave
rows a publisher was asked to remove, and nobody reads a skip counter.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pairforge.stages.common.blocklist_norm import KINDS, classify, parse_entry

#: bad lines quoted in a :class:`ListError` (the count says how many more)
SHOW_BAD = 10


class ListError(ValueError):
    """A list that cannot be used as it is (a bad line, a missing column)."""


@dataclass
class Entries:
    """What one list file holds, by kind: normal forms and their line numbers
    (1-based; the row number for a table), in file order."""

    values: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    lines: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in KINDS})
    skipped: int = 0  # blank lines, comments, empty cells
    sha256: str = ""  # of the file's bytes
    bytes: int = 0

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.values.items() if v}


def _text_column(data: bytes, path: str):
    """The lines of a text list without comments (a whole-line ``#``, or one
    after white space: a URL's fragment has no space before its ``#``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ListError(f"{path}: not UTF-8 text ({e}); a parquet or CSV list needs a .parquet or .csv name") from None
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()  # the end of the last line
    s = pc.utf8_trim_whitespace(pa.array(lines, pa.string()))
    if "#" not in text:
        return s
    s = pc.replace_substring_regex(s, r"^#.*$", "")
    return pc.utf8_rtrim_whitespace(pc.replace_substring_regex(s, r"[ \t]#.*$", ""))


def _table_column(data: bytes, path: str, column: str | None, fmt: str):
    import csv

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            table = pq.read_table(io.BytesIO(data))
        else:  # every column as text: a pHash of 16 decimal digits must not become a number
            header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8-sig", "replace")]), [])
            types = {name: pa.string() for name in header}
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types))
    except (pa.ArrowException, OSError) as e:
        raise ListError(f"{path}: cannot read it as {fmt}: {e}") from None
    if column is None:
        if table.num_columns != 1:
            raise ListError(f"{path}: column: expected the name of one of {table.column_names}, got None")
        column = table.column_names[0]
    if column not in table.column_names:
        raise ListError(f"{path}: column: expected one of {table.column_names}, got {column!r}")
    values = table.column(column).combine_chunks()
    try:
        values = values.cast(pa.string())
    except pa.ArrowException as e:
        raise ListError(f"{path}: column {column!r} ({values.type}) cannot be read as text: {e}") from None
    return pc.fill_null(pc.utf8_trim_whitespace(values), "")


def table_format(path: str) -> str:
    """``parquet``, ``csv`` or ``text``, by the file's name (``.gz`` aside)."""
    name = path.lower().removesuffix(".gz")
    return "parquet" if name.endswith(".parquet") else "csv" if name.endswith(".csv") else "text"


def read_list(path: str, kind: str = "auto", column: str | None = None) -> Entries:
    """Every entry of the list at ``path``. Raises :class:`ListError` naming the
    file and each bad line (the first :data:`SHOW_BAD`, and how many)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ListError(f"{path}: cannot read the list: {e.strerror or e}") from None
    out = Entries(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    if path.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ListError(f"{path}: not a gzip file: {e}") from None
    fmt = table_format(path)
    cells = _text_column(data, path) if fmt == "text" else _table_column(data, path, column, fmt)
    filled = pc.not_equal(cells, "").to_numpy(zero_copy_only=False)
    out.skipped = int((~filled).sum())
    line_no = np.flatnonzero(filled) + 1
    texts = cells.filter(pa.array(filled))
    kinds, norms = classify(texts, kind)
    bad = [i for i, v in enumerate(norms) if v is None]
    if bad:
        shown = []
        for i in bad[:SHOW_BAD]:
            text = texts[i].as_py()
            try:
                parse_entry(text, kind)
                why = "no entry"  # the column form and the scalar form disagree: say so rather than guess
            except ValueError as e:
                why = str(e)
            shown.append(f"{path}:{line_no[i]}: {text[:120]!r}: {why}")
        more = f"\n... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        raise ListError(f"{path}: {len(bad)} line(s) that are no entry:\n" + "\n".join(shown) + more)
    lines = line_no.tolist()
    for k, name in enumerate(KINDS):
        idx = np.flatnonzero(kinds == k).tolist()
        out.values[name] = [norms[i] for i in idx]
        out.lines[name] = [lines[i] for i in idx]
    return out
