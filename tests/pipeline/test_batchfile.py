"""Batches round-trip exactly through ``pipeline.batchfile`` (Arrow IPC, no
pickle): dtypes, shapes, each object value's type, NaN bits; and a file
that is not one, or is damaged, is a clear error, never code run."""

from __future__ import annotations

import datetime as dt
import decimal
import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pairforge.pipeline import batchfile
from pairforge.pipeline.batchfile import BatchFileError, dumps, loads

#: examples per property in CI (bounded; each is a few ms)
EXAMPLES = 200


def same(a, b) -> bool:
    """Equal values of the same types (ndarrays: dtype, shape and bytes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype == object:
            return all(same(x, y) for x, y in zip(a.reshape(-1), b.reshape(-1)))
        return a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if isinstance(a, float):  # a NaN stays a NaN; its sign and payload bits are not kept (Arrow's doubles)
        return (a != a and b != b) or np.float64(a).tobytes() == np.float64(b).tobytes()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def same_batch(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(same(a[k], b[k]) for k in a)


def objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def roundtrip(batch):
    back = loads(dumps(batch))
    assert same_batch(batch, back), (batch, back)
    return back


# ------------------------------------------------------------------ the shapes a run has


def test_a_runs_rows_round_trip_exactly():
    n = 4
    batch = {
        "key": objects(["000000", "000001", "000002", "000003"]),
        "shard_id": np.zeros(n, np.int64),
        "status": objects(["ok", "failed", "ok", "dropped"]),
        "image": objects([b"\xff\xd8jpeg", None, b"", b"\x89PNG"]),
        "img_emb": np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32),
        "boxes": objects(
            [np.zeros((0, 4), np.float32), np.ones((2, 4), np.float32), None, np.ones((1, 4), np.float32)]
        ),
        "labels": objects([np.zeros(0, np.int64), np.arange(3), np.arange(1), np.arange(2)]),
        "ok": np.array([True, False, True, False]),
        "half": np.array([1.5, np.nan, -0.0, np.inf], np.float16),
        "__t_download": np.array([0.1, 0.2, 0.3, 0.4]),
        "when": np.array(["2024-01-01", "NaT", "1970-01-01", "2100-12-31"], dtype="datetime64[ns]"),
        "fixed": np.array(["a", "bb", "", "dddd"]),  # numpy unicode
        "big_endian": np.arange(4, dtype=">i4"),
        "grid": np.arange(n * 6, dtype=np.uint8).reshape(n, 2, 3),
        # a URL list's own columns, as table_to_batch and _merge leave them
        "mixed": objects([1, 2.5, None, "x"]),
        "lists": objects([np.array([1, 2]), np.array(["a"], dtype=object), None, np.zeros(0)]),
        "struct": objects([{"a": 1, "b": [1, 2]}, None, {"a": None}, {}]),
        "odd": objects(
            [decimal.Decimal("1.10"), dt.date(2020, 1, 2), dt.datetime(2020, 1, 2, 3, 4, 5, 6), np.float32(2)]
        ),
        "nan_str": objects(["x", float("nan"), np.str_("y"), "\ud800"]),  # a lone surrogate too
        "objgrid": np.array([[None, 1], ["a", b"b"], [2.0, None], [(), []]], dtype=object),
    }
    back = roundtrip(batch)
    assert back["image"][1] is None and back["boxes"][2] is None
    assert all(a.flags.writeable for a in back.values())
    # what pickle gave (which turns a big-endian column into a native one; here it stays as it was)
    pickled = pickle.loads(pickle.dumps(batch))
    assert pickled["big_endian"].dtype == np.int32 and back["big_endian"].dtype == np.dtype(">i4")
    assert same_batch(
        {k: v for k, v in pickled.items() if k != "big_endian"}, {k: v for k, v in back.items() if k != "big_endian"}
    )


def test_empty_and_zero_row_batches():
    roundtrip({})
    roundtrip({"key": objects([]), "v": np.zeros((0, 3), np.float32), "b": np.zeros(0, bool)})
    roundtrip({"w": np.zeros((2, 0), np.float32), "u": np.array(["", ""], dtype="<U1")})


def test_the_file_is_arrow_ipc_a_reader_opens():
    data = dumps({"key": objects(["a", "b"]), "x": np.arange(2.0)})
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    assert table.column("key").to_pylist() == ["a", "b"] and table.column("x").to_pylist() == [0.0, 1.0]


@pytest.mark.parametrize(
    "value",
    [object(), np.ma.masked_array([1]), {1, 2}, bytearray(b"x"), lambda: 0, type("Evil", (), {})()],
    ids=["object", "masked", "set", "bytearray", "function", "class"],
)
def test_a_value_of_another_type_is_an_error_naming_the_column(value):
    with pytest.raises(BatchFileError, match="column 'extra'"):
        dumps({"extra": objects([value, "x"])})


# ------------------------------------------------------------------ hostile files


def test_a_pickle_is_refused_not_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    with pytest.raises(BatchFileError, match="not a pairforge batch file"):
        loads(pickle.dumps({"key": Boom()}), "x.arrow")
    assert not (tmp_path / "PWNED").exists()


def test_damaged_files_are_errors():
    data = dumps({"key": objects(["a", "b", "c"]), "boxes": objects([np.ones((2, 4), np.float32)] * 3)})
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(BatchFileError):
            loads(data[:cut])
    # an object dtype smuggled into the description
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    meta = table.schema.metadata[batchfile.META_KEY].replace(b'"<f4"', b'"|O"')
    bad = table.replace_schema_metadata({batchfile.META_KEY: meta})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, bad.schema) as w:
        w.write_table(bad)
    with pytest.raises(BatchFileError, match="holds objects"):
        loads(sink.getvalue().to_pybytes())
    # descriptions that lie about their columns
    for lie in (b'"enc": "ragged"', b'"enc": "nope"', b'"shape": [1000000000000]'):
        meta = table.schema.metadata[batchfile.META_KEY].replace(b'"enc": "str"', lie, 1)
        bad = table.replace_schema_metadata({batchfile.META_KEY: meta})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, bad.schema) as w:
            w.write_table(bad)
        with pytest.raises(BatchFileError, match="column 'key'"):
            loads(sink.getvalue().to_pybytes())
    for meta in (b'{"version": 1, "rows": 3, "columns": 7}', b"[]", b'{"rows": "x"}'):
        bad = table.replace_schema_metadata({batchfile.META_KEY: meta})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, bad.schema) as w:
            w.write_table(bad)
        with pytest.raises(BatchFileError):
            loads(sink.getvalue().to_pybytes())


# ------------------------------------------------------------------ properties

_dtypes = st.sampled_from(["<f4", "<f8", "<f2", "<i8", "<i4", "<u1", "|b1", ">f8", "<M8[us]", "<U3", "|S2", "<c8"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
    ),
    max_leaves=6,
)


@st.composite
def _column(draw, n: int):
    kind = draw(st.sampled_from(["array", "strings", "bytes", "ragged", "values"]))
    if kind == "array":
        shape = (n, *draw(st.lists(st.integers(0, 3), max_size=2)))
        return draw(hnp.arrays(np.dtype(draw(_dtypes)), shape))
    if kind == "strings":
        return objects(draw(st.lists(st.one_of(st.none(), st.text(max_size=10)), min_size=n, max_size=n)))
    if kind == "bytes":
        return objects(draw(st.lists(st.one_of(st.none(), st.binary(max_size=10)), min_size=n, max_size=n)))
    if kind == "ragged":
        dtype = np.dtype(draw(st.sampled_from(["<f4", "<i8", "|u1"])))
        tail = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
        rows = [draw(st.one_of(st.none(), hnp.arrays(dtype, (draw(st.integers(0, 3)), *tail)))) for _ in range(n)]
        return objects(rows)
    return objects(draw(st.lists(_values, min_size=n, max_size=n)))


@st.composite
def batches(draw):
    n = draw(st.integers(0, 6))
    names = draw(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=5))
    return {name: draw(_column(n)) for name in names}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_any_batch_round_trips_exactly(batch):
    roundtrip(batch)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_an_error_not_a_crash(data):
    with pytest.raises(BatchFileError):
        loads(data)
