"""JSON URL lists (JSONL, COCO captions) read within bounds.

Why on its own: pyarrow's JSON reader is fast but trusts its input: a
valid row whose extra field nests arrays 20,000 deep (40 KB) segfaults it
(exit 139, no message), and it reads a whole file into memory. Here a JSONL
file is read line by line, each line checked against the source's
``input.limits`` (``pipeline.inputlimits``: length, nesting depth) before
pyarrow parses it, in chunks of whole lines, so memory is bounded by the
chunk and every problem is a ``ConfigError`` naming the file and the line.
A file that fits in one chunk is parsed in one call, as before (one type
per column for the whole file); a longer one chunk by chunk, each chunk's
types inferred on its own (the reader's permissive concatenation joins
them, e.g. a column that is all null in one chunk).

A COCO captions file is one JSON object: it is read whole, up to
``max_coco_bytes``; a file nested past Python's recursion limit, or whose
fields the reader uses are not what COCO has, is an error naming the file
and the field.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from pairforge.pipeline.inputlimits import InputError, InputLimits, check_column_count, line_problem

#: bytes of whole lines given to pyarrow at once
CHUNK_BYTES = 32 << 20
#: the columns of a ``coco`` file's rows (one per annotation): ``id`` is the
#: annotation's, ``url`` the image's first of :data:`COCO_URL_FIELDS`
COCO_COLUMNS = ("url", "caption", "image_id", "id", "file_name")
COCO_URL_FIELDS = ("coco_url", "flickr_url", "url")
_SCALARS = (str, int, float, bool, type(None))


def checked_blocks(f, path, limits: InputLimits, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(number of its first line, block)``: a JSONL stream in blocks of
    whole lines of about ``block_bytes``, every line within the limits (a
    :class:`InputError` naming the line otherwise). Lines are split and
    measured by ``bytes`` methods, so a line costs no Python step unless it
    holds more brackets than the depth bound."""
    carry, first, seen = b"", 1, 0
    while True:
        data = f.read(max(block_bytes, limits.max_line_bytes + 1))
        seen += len(data)
        if seen > limits.max_file_bytes:
            raise InputError(f"{path}: larger than input.limits.max_file_bytes ({limits.max_file_bytes})")
        if not data:  # the end: what is left is the last line, without its newline
            if carry:  # pieces: 1
                _check_lines(carry, first, path, limits)
                yield first, carry
            return
        data = carry + data
        cut = data.rfind(b"\n") + 1
        block, carry = data[:cut], data[cut:]
        if len(carry) > limits.max_line_bytes:
            at = first + block.count(b"\n")
            raise InputError(f"{path}, line {at}: {_too_long(limits)}")
        if block:
            pieces = _check_lines(block, first, path, limits)
            yield first, block
            first += pieces - 1  # the block ends with a newline: split() gives an empty last piece


def _too_long(limits: InputLimits) -> str:
    return f"longer than input.limits.max_line_bytes ({limits.max_line_bytes})"


def _check_lines(block: bytes, first: int, path, limits: InputLimits) -> int:
    """Raise :class:`InputError` at the first line over a bound; returns
    how many pieces ``block.split(b"\\n")`` has."""
    lines = block.split(b"\n")
    longest = max(map(len, lines))
    if longest > limits.max_line_bytes:
        at = next(i for i, line in enumerate(lines) if len(line) > limits.max_line_bytes)
        raise InputError(f"{path}, line {first + at}: {_too_long(limits)}")
    if block.count(b"[") + block.count(b"{") <= limits.max_json_depth:
        return len(lines)
    # brackets per line, counted by numpy: only a line with more than the
    # depth bound can nest past it, and only such a line is parsed here
    data = np.frombuffer(block, dtype=np.uint8)
    opens = np.flatnonzero((data == ord("[")) | (data == ord("{")))
    newlines = np.flatnonzero(data == ord("\n"))
    per_line = np.bincount(np.searchsorted(newlines, opens), minlength=len(lines))  # the line of each bracket
    for i in np.flatnonzero(per_line > limits.max_json_depth):
        why = line_problem(lines[i], limits)
        if why:
            raise InputError(f"{path}, line {first + int(i)}: {why}")
    return len(lines)


def _parse(first: int, block: bytes, path, limits: InputLimits) -> pa.Table:
    body = block if block.endswith(b"\n") else block + b"\n"
    # pyarrow parses blocks of this size in parallel; a line must fit in one
    opts = pajson.ReadOptions(block_size=max(1 << 20, limits.max_line_bytes + 2))
    try:
        table = pajson.read_json(io.BytesIO(body), read_options=opts)
    except pa.ArrowException as e:
        raise InputError(f"{path}, {_first_bad_line(first, block)}: {e}") from None
    check_column_count(table.column_names, limits, path)
    return table


def _first_bad_line(first: int, block: bytes) -> str:
    """Where pyarrow's error is, in words: the first line that is not a JSON
    object, else the lines the block spans (a type that changes between lines)."""
    lines = block.rstrip(b"\n").split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                return f"line {first + i} (not a JSON object)"
        except ValueError:
            return f"line {first + i} (not JSON)"
    return f"lines {first}-{first + len(lines) - 1}"


def jsonl_batches(path, limits: InputLimits, rows: int) -> Iterator[pa.RecordBatch]:
    """A JSONL file as record batches of at most ``rows`` rows (see the module doc)."""
    with path.open("rb") as f:
        for first, block in checked_blocks(f, path, limits, CHUNK_BYTES):
            if not block.isspace():
                yield from _parse(first, block, path, limits).to_batches(rows)


def jsonl_head_names(path, limits: InputLimits, head_bytes: int = 1 << 20) -> list[str]:
    """The column names of a JSONL file's first lines (about ``head_bytes``,
    whole lines; the first block :func:`checked_blocks` gives)."""
    with path.open("rb") as f:
        first, block = next(checked_blocks(f, path, limits, head_bytes), (1, b""))
    return _parse(first, block, path, limits).column_names if block and not block.isspace() else []


# ------------------------------------------------------------------ COCO


def coco_batches(path, limits: InputLimits, rows: int) -> Iterator[pa.RecordBatch]:
    """COCO captions JSON (``{"images": [{id, file_name, coco_url|flickr_url|url}],
    "annotations": [{id, image_id, caption}]}``) as one row per annotation, in
    the file's order. An annotation whose image is not listed, or has no URL,
    gets an empty URL: it is rejected by ``download``, not lost."""
    with path.open("rb") as f:
        data = f.read(limits.max_coco_bytes + 1)
    if len(data) > limits.max_coco_bytes:
        raise InputError(f"{path}: larger than input.limits.max_coco_bytes ({limits.max_coco_bytes})")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise InputError(f"{path}: not COCO captions JSON: nested deeper than this reader follows") from None
    except ValueError as e:
        raise InputError(f"{path}: not COCO captions JSON: {e}") from None
    lists = isinstance(doc, dict) and all(isinstance(doc.get(k), list) for k in ("images", "annotations"))
    if not lists:
        raise InputError(f"{path}: not COCO captions JSON: expected an object with 'images' and 'annotations' lists")
    images = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im:
            continue
        _scalar_fields(path, f"images[{i}]", im, ("id", "file_name", *COCO_URL_FIELDS))
        url = next((im[f] for f in COCO_URL_FIELDS if im.get(f)), "")
        images[im["id"]] = (str(url), None if im.get("file_name") is None else str(im["file_name"]))
    anns = doc["annotations"]
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            raise InputError(f"{path}: not COCO captions JSON: annotations[{i}] is not an object")
        _scalar_fields(path, f"annotations[{i}]", a, ("id", "image_id", "caption"))
    for i in range(0, len(anns), rows):
        part = anns[i : i + rows]
        seen = [images.get(a.get("image_id"), ("", None)) for a in part]
        yield pa.record_batch(
            {
                "url": pa.array([u for u, _ in seen], pa.string()),
                "caption": pa.array([_text(a.get("caption")) for a in part], pa.string()),
                "image_id": _array([a.get("image_id") for a in part]),
                "id": _array([a.get("id") for a in part]),
                "file_name": pa.array([f for _, f in seen], pa.string()),
            }
        )


def _scalar_fields(path, where: str, obj: dict, names) -> None:
    for name in names:
        if name in obj and not isinstance(obj[name], _SCALARS):
            raise InputError(
                f"{path}: not COCO captions JSON: {where}.{name} is a {type(obj[name]).__name__}, not a string or number"
            )


def _text(v) -> str | None:
    return v if v is None or isinstance(v, str) else json.dumps(v)


def _array(values: list) -> pa.Array:
    """Ids as the file has them (COCO's are integers), strings if they mix."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())
