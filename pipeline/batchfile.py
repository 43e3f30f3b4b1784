"""A batch (``dict[str, numpy.ndarray]``) as an Arrow IPC file, exactly.

Why this exists: the rows a run leaves under ``OUT/_work`` between its
phases (``pipeline.engine`` parts, ``pipeline.fit`` samples and reduced
buckets) used to be pickles, and unpickling runs whatever code the file
names: anyone who could write under ``OUT`` (a shared bucket, an NFS
folder, a planted ``_work`` in a reused folder) ran code on every node.
An Arrow IPC file holds only typed buffers and a JSON description; reading
it builds numpy arrays, ``str``, ``bytes`` and the few plain Python values
listed below, never an object of a type the file names.

The round trip is exact, as pickle's was, because the shards written from
these rows must be byte-identical whichever runner or resume wrote them:
every column keeps its dtype, its shape and, for object columns, each
value's type (``str`` or ``bytes``, ``None``, an ndarray with its dtype and
shape, a Python ``float`` or ``int``, a numpy scalar). Per column:

* ``array``: a non-object ndarray of any shape ``(n, ...)``: a primitive
  Arrow column (or a fixed-size list of one, per row) where Arrow has the
  numpy type in native byte order, else each row's raw bytes
  (``fixed_size_binary``) with the dtype in the description;
* ``str`` / ``bytes``: object columns of ``str`` (or of ``bytes``) and
  ``None``: Arrow ``large_string`` / ``large_binary`` with nulls;
* ``ragged``: object columns of ndarrays of one dtype and one shape past
  the first axis (K x 4 boxes, K x D features), ``None`` allowed: a
  ``large_list`` of the flattened values;
* ``any``: anything else (mixed types from a URL list's own columns): each
  value as tagged JSON text (:func:`_enc`), which names only the types
  above plus ``list``, ``tuple``, ``dict``, ``Decimal`` and the ``datetime``
  types. A value of another type is a :class:`BatchFileError` naming the
  column, never a silent conversion.

A file that does not parse, does not validate (Arrow's full validation of
offsets and lengths) or whose description does not match its columns is a
:class:`BatchFileError` naming the problem.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json

import numpy as np
import pyarrow as pa

from pairforge.stages.batch import Batch

#: the schema metadata key holding the column descriptions
META_KEY = b"pairforge.batch"
VERSION = 1
#: numpy kinds Arrow holds natively (native byte order only)
_PRIMITIVE_KINDS = "biuf"


class BatchFileError(ValueError):
    """A batch that cannot be stored exactly, or a file that is not one."""


# ------------------------------------------------------------------ writing


def dumps(batch: Batch) -> bytes:
    """``batch`` as the bytes of an Arrow IPC file (see the module doc)."""
    n = _length(batch)
    arrays, fields, described = [], [], []
    for name, v in batch.items():
        if not isinstance(name, str):
            raise BatchFileError(f"column {name!r}: names must be strings")
        arr, desc = _encode_column(name, np.asarray(v) if not isinstance(v, np.ndarray) else v, n)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
        described.append(desc)
    meta = {"version": VERSION, "rows": n, "columns": described}
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch(arrays, schema=schema))
    return sink.getvalue().to_pybytes()


def _length(batch: Batch) -> int:
    lengths = {len(v) for v in batch.values()}
    if len(lengths) > 1:
        raise BatchFileError(f"columns of different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _encode_column(name: str, v: np.ndarray, n: int) -> tuple[pa.Array, dict]:
    if v.ndim == 0:
        raise BatchFileError(f"column {name!r}: a 0-d array is not a column")
    if v.dtype != object:
        return _encode_array(v)
    if v.ndim > 1:
        return _encode_any(name, [[*row.reshape(-1)] for row in v], shape=v.shape[1:])
    kinds = {type(x) for x in v}
    for kind, typ in (("str", pa.large_string()), ("bytes", pa.large_binary())):
        if kinds <= {str if kind == "str" else bytes, type(None)}:
            try:
                return pa.array(v, typ), {"enc": kind}
            except (pa.ArrowException, UnicodeError):  # a lone surrogate: not UTF-8, but JSON escapes it
                break
    ragged = _encode_ragged(v) if kinds <= {np.ndarray, type(None)} else None
    if ragged is not None:
        return ragged
    return _encode_any(name, v)


def _native(dtype: np.dtype) -> bool:
    return dtype.kind in _PRIMITIVE_KINDS and dtype.byteorder in ("=", "|", "<" if np.little_endian else ">")


def _encode_array(v: np.ndarray) -> tuple[pa.Array, dict]:
    n, shape = len(v), v.shape[1:]
    width = int(np.prod(shape)) if shape else 1
    desc = {"enc": "array", "dtype": v.dtype.str, "shape": list(shape)}
    if v.dtype.hasobject:  # a structured dtype with an object field
        raise BatchFileError(f"dtype {v.dtype} holds objects")
    if _native(v.dtype) and width:
        flat = pa.array(np.ascontiguousarray(v).reshape(-1))
        return (flat if not shape else pa.FixedSizeListArray.from_arrays(flat, width)), desc
    row_bytes = v.dtype.itemsize * width
    if not row_bytes:
        return pa.nulls(n), desc
    buf = pa.py_buffer(np.ascontiguousarray(v).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, buf]), {**desc, "raw": True}


def _encode_ragged(v: np.ndarray) -> tuple[pa.Array, dict] | None:
    """Ndarrays of one native dtype and one shape past the first axis (and
    ``None``s), or ``None`` when the column is not that."""
    present = [x for x in v if x is not None]
    if not present:
        return None
    dtype, tail = present[0].dtype, present[0].shape[1:]
    if not _native(dtype) or any(x.ndim == 0 or x.dtype != dtype or x.shape[1:] != tail for x in present):
        return None
    if tail and not int(np.prod(tail)):  # K x 0 rows: K is not in the values
        return None
    mask = np.array([x is None for x in v], dtype=bool)
    lengths = np.array([0 if x is None else x.size for x in v], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([x.reshape(-1) for x in present]) if present else np.zeros(0, dtype)
    values = pa.array(flat.astype(dtype, copy=False))
    arr = pa.LargeListArray.from_arrays(pa.array(offsets), values, mask=pa.array(mask) if mask.any() else None)
    return arr, {"enc": "ragged", "dtype": dtype.str, "shape": list(tail)}


def _encode_any(name: str, values, shape: tuple = ()) -> tuple[pa.Array, dict]:
    try:
        texts = [json.dumps(_enc(x), allow_nan=True, separators=(",", ":")) for x in values]
    except BatchFileError as e:
        raise BatchFileError(f"column {name!r}: {e}") from None
    return pa.array(texts, pa.large_string()), {"enc": "any", "shape": list(shape)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _enc(x):
    """One value as JSON data: ``None``, ``bool``, ``int``, ``float`` and
    ``str`` as themselves, everything else as a one-key object whose key
    names its type."""
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is bytes:
        return {"bytes": _b64(x)}
    if t is list:
        return {"list": [_enc(e) for e in x]}
    if t is tuple:
        return {"tuple": [_enc(e) for e in x]}
    if t is dict:
        return {"dict": [[_enc(k), _enc(e)] for k, e in x.items()]}
    if t is np.ndarray:
        if x.dtype.hasobject:
            return {"objects": list(x.shape), "values": [_enc(e) for e in x.reshape(-1)]}
        return {"ndarray": x.dtype.str, "shape": list(x.shape), "data": _b64(np.ascontiguousarray(x).tobytes())}
    if isinstance(x, np.generic) and not x.dtype.hasobject:
        return {"scalar": x.dtype.str, "data": _b64(np.asarray(x).tobytes())}
    if t is decimal.Decimal:
        return {"decimal": str(x)}
    if t in (dt.datetime, dt.date, dt.time):
        return {t.__name__: x.isoformat()}
    if t is dt.timedelta:
        return {"timedelta": [x.days, x.seconds, x.microseconds]}
    raise BatchFileError(f"a {t.__module__}.{t.__qualname__} value cannot be stored")


# ------------------------------------------------------------------ reading


def loads(data: bytes, where: str = "batch file") -> Batch:
    """The batch :func:`dumps` wrote; ``where`` names the file in errors."""
    try:
        reader = pa.ipc.open_file(pa.BufferReader(data))
        table = reader.read_all()
        table.validate(full=True)
        meta = json.loads((table.schema.metadata or {})[META_KEY])
        columns = meta["columns"]
        n = int(meta["rows"])
    except (pa.ArrowException, KeyError, TypeError, ValueError, RecursionError) as e:
        raise BatchFileError(f"{where}: not a pairforge batch file ({type(e).__name__}: {e})") from None
    described = isinstance(columns, list) and all(isinstance(d, dict) for d in columns)
    if meta.get("version") != VERSION or not described or len(columns) != table.num_columns or table.num_rows != n:
        raise BatchFileError(f"{where}: its description does not match its columns")
    out: Batch = {}
    for name, desc in zip(table.column_names, columns):
        col = table.column(name)
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        try:
            out[name] = _decode_column(arr, desc, n)
        except Exception as e:  # noqa: BLE001 - a file that lies about a column: whatever breaks, it is this file
            raise BatchFileError(f"{where}: column {name!r}: {type(e).__name__}: {e}") from None
    return out


def _dtype(text) -> np.dtype:
    d = np.dtype(str(text))
    if d.hasobject:
        raise ValueError(f"dtype {text!r} holds objects")
    return d


def _decode_column(arr: pa.Array, desc: dict, n: int) -> np.ndarray:
    enc = desc["enc"]
    if enc in ("str", "bytes"):
        out = np.empty(n, dtype=object)
        out[:] = arr.to_pylist()
        return out
    if enc == "array":
        dtype, shape = _dtype(desc["dtype"]), tuple(int(s) for s in desc["shape"])
        if desc.get("raw"):
            raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
            width = dtype.itemsize * (int(np.prod(shape)) if shape else 1)
            raw = raw[arr.offset * width : (arr.offset + n) * width]
            return raw.view(dtype).reshape(n, *shape).copy()
        if isinstance(arr, pa.NullArray):
            return np.zeros((n, *shape), dtype=dtype)
        flat = arr.flatten() if shape else arr
        return np.array(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape(n, *shape)
    if enc == "ragged":
        dtype, tail = _dtype(desc["dtype"]), tuple(int(s) for s in desc["shape"])
        values = np.array(arr.values.to_numpy(zero_copy_only=False), dtype=dtype)
        offsets = arr.offsets.to_numpy()
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        out = np.empty(n, dtype=object)
        for i in range(n):
            out[i] = values[offsets[i] : offsets[i + 1]].reshape(-1, *tail).copy() if valid[i] else None
        return out
    if enc == "any":
        shape = tuple(int(s) for s in desc["shape"])
        values = [_dec(json.loads(t)) for t in arr.to_pylist()]
        out = np.empty((n, *shape), dtype=object)
        for i, v in enumerate(values):
            if shape:
                row = np.empty(int(np.prod(shape)), dtype=object)
                row[:] = v
                out[i] = row.reshape(shape)
            else:
                out[i] = v
        return out
    raise ValueError(f"unknown encoding {enc!r}")


def _dec(x):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if not isinstance(x, dict) or len(x) not in (1, 2, 3):
        raise ValueError(f"not a stored value: {str(x)[:80]}")
    if "bytes" in x:
        return base64.b64decode(x["bytes"])
    if "list" in x:
        return [_dec(e) for e in x["list"]]
    if "tuple" in x:
        return tuple(_dec(e) for e in x["tuple"])
    if "dict" in x:
        return {_dec(k): _dec(v) for k, v in x["dict"]}
    if "objects" in x:
        out = np.empty(int(np.prod(x["objects"])), dtype=object)
        out[:] = [_dec(e) for e in x["values"]] or []
        return out.reshape([int(s) for s in x["objects"]])
    if "ndarray" in x:
        d = _dtype(x["ndarray"])
        return np.frombuffer(base64.b64decode(x["data"]), dtype=d).reshape([int(s) for s in x["shape"]]).copy()
    if "scalar" in x:
        return np.frombuffer(base64.b64decode(x["data"]), dtype=_dtype(x["scalar"]))[0]
    if "decimal" in x:
        return decimal.Decimal(x["decimal"])
    for t in (dt.datetime, dt.date, dt.time):
        if t.__name__ in x:
            return t.fromisoformat(x[t.__name__])
    if "timedelta" in x:
        return dt.timedelta(*x["timedelta"])
    raise ValueError(f"not a stored value: {str(x)[:80]}")
