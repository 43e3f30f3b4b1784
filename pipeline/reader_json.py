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


def checked_lines(stream, path, limits: InputLimits, max_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of a JSONL stream, each within the limits
    (a :class:`InputError` naming the line otherwise). ``max_bytes``: stop
    after about this many bytes (a head for the check before a run)."""
    seen = 0
    number = 0
    while True:
        line = stream.readline(limits.max_line_bytes + 1)
        if not line:
            return
        number += 1
        seen += len(line)
        if len(line) > limits.max_line_bytes:
            raise InputError(
                f"{path}, line {number}: longer than input.limits.max_line_bytes ({limits.max_line_bytes})"
            )
        if seen > limits.max_file_bytes:
            raise InputError(f"{path}: larger than input.limits.max_file_bytes ({limits.max_file_bytes})")
        why = line_problem(line, limits)
        if why:
            raise InputError(f"{path}, line {number}: {why}")
        yield number, line
        if max_bytes is not None and seen >= max_bytes:
            return


def _parse(lines: list[tuple[int, bytes]], path, limits: InputLimits) -> pa.Table:
    body = b"".join(line if line.endswith(b"\n") else line + b"\n" for _, line in lines)
    try:
        table = pajson.read_json(io.BytesIO(body), read_options=pajson.ReadOptions(block_size=max(1 << 20, len(body))))
    except pa.ArrowException as e:
        raise InputError(f"{path}, {_first_bad_line(lines)}: {e}") from None
    check_column_count(table.column_names, limits, path)
    return table


def _first_bad_line(lines: list[tuple[int, bytes]]) -> str:
    """Where pyarrow's error is, in words: the first line that is not a JSON
    object, else the lines the chunk spans (a type that changes between lines)."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                return f"line {number} (not a JSON object)"
        except ValueError:
            return f"line {number} (not JSON)"
    return f"lines {lines[0][0]}-{lines[-1][0]}" if lines else "line 1"


class _Raw(io.RawIOBase):
    """A file that only reads (a pyarrow stream on object storage) as a raw
    stream, so that ``io.BufferedReader`` gives it ``readline``."""

    def __init__(self, f):
        super().__init__()
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._f.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _lines(f):
    return f if isinstance(f, io.BufferedIOBase) else io.BufferedReader(_Raw(f), 1 << 20)


def jsonl_batches(path, limits: InputLimits, rows: int) -> Iterator[pa.RecordBatch]:
    """A JSONL file as record batches of at most ``rows`` rows (see the module doc)."""
    with path.open("rb") as f:
        stream = _lines(f)
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for number, line in checked_lines(stream, path, limits):
            chunk.append((number, line))
            size += len(line)
            if size >= CHUNK_BYTES:
                yield from _parse(chunk, path, limits).to_batches(rows)
                chunk, size = [], 0
        if chunk and any(line.strip() for _, line in chunk):
            yield from _parse(chunk, path, limits).to_batches(rows)


def jsonl_head_names(path, limits: InputLimits, head_bytes: int = 1 << 20) -> list[str]:
    """The column names of a JSONL file's first lines (about ``head_bytes``)."""
    with path.open("rb") as f:
        lines = list(checked_lines(_lines(f), path, limits, max_bytes=head_bytes))
    return _parse(lines, path, limits).column_names if any(line.strip() for _, line in lines) else []


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
