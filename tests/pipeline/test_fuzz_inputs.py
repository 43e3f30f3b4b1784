"""Fuzz tests (hypothesis) of the input readers and the job loader (issue
29): random and hostile URL lists in every format (parquet, csv, tsv,
jsonl, COCO) end either as a ``ConfigError`` naming the file, from the
check before the run or from the reader, or as input shards that hold
every row of the file (kept, or rejected by the ``input`` stage with a
reason); random job files end as a ``ConfigError`` or a job. Never another
exception, never a crash, never a lost row.

Examples per test: :data:`EXAMPLES` (200 in CI; ``PAIRFORGE_FUZZ_EXAMPLES``
raises it for a longer hunt). The bounds are set low here (``LIMITS``) so
that random inputs reach them.
"""

from __future__ import annotations

import io
import json
import os
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairforge.manifests import layout
from pairforge.pipeline.checks_columns import input_columns
from pairforge.pipeline.config import ConfigError, JobConfig, load_job
from pairforge.pipeline.reader import split_input

EXAMPLES = int(os.environ.get("PAIRFORGE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
LIMITS = {
    "max_caption_chars": 40,
    "max_url_chars": 60,
    "max_columns": 8,
    "max_line_bytes": 3000,
    "max_json_depth": 6,
    "max_file_bytes": 60_000,
    "max_coco_bytes": 60_000,
}

# ------------------------------------------------------------------ values

_names = st.one_of(
    st.sampled_from(["url", "caption", "key", "status", "__t_shard", "_x", "image_ext", "source", "input__x", "lang"]),
    st.text(min_size=1, max_size=6),
)
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=60)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=12,
)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def jsonl_files(draw) -> tuple[bytes, int | None]:
    """A JSONL file and how many rows it holds when it is valid (else None)."""
    kind = draw(st.sampled_from(["rows", "rows", "garbage", "deep"]))
    if kind == "garbage":
        return draw(st.binary(max_size=400)), None
    rows = draw(st.lists(st.dictionaries(_names, _json, max_size=5), max_size=12))
    lines = [json.dumps(r) for r in rows]
    if kind == "deep":
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, '{"url": "u", "caption": "c", "x": ' + _deep(draw(st.integers(7, 3000))) + "}")
    if lines and draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), "")  # a blank line
    return ("\n".join(lines) + ("\n" if draw(st.booleans()) else "")).encode(), None


@st.composite
def delimited_files(draw, sep: str) -> tuple[bytes, int | None]:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=400)), None
    cols = draw(st.lists(_names, min_size=1, max_size=10))
    cells = st.text(alphabet=string.printable + "é\u2028\x00", max_size=70)
    rows = draw(st.lists(st.lists(cells, min_size=len(cols), max_size=len(cols)), max_size=10))
    buf = io.StringIO()
    import csv

    w = csv.writer(buf, delimiter=sep, lineterminator="\n")
    w.writerow(cols)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogatepass"), None


_arrow_types = st.sampled_from(
    [
        pa.int64(),
        pa.float64(),
        pa.string(),
        pa.binary(),
        pa.bool_(),
        pa.list_(pa.int32()),
        pa.null(),
        pa.timestamp("ms"),
    ]
)


@st.composite
def parquet_files(draw) -> tuple[bytes, int | None]:
    if draw(st.integers(0, 5)) == 0:
        return b"PAR1" + draw(st.binary(max_size=300)) + b"PAR1", None
    n = draw(st.integers(0, 8))
    names = draw(st.lists(_names, min_size=1, max_size=11, unique=True))
    cols = {}
    for name in names:
        t = draw(_arrow_types)
        if t == pa.string():
            values = draw(st.lists(st.one_of(st.none(), st.text(max_size=90)), min_size=n, max_size=n))
        elif t == pa.binary():
            values = draw(st.lists(st.one_of(st.none(), st.binary(max_size=20)), min_size=n, max_size=n))
        elif t == pa.int64():
            values = draw(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=n, max_size=n))
        elif t == pa.float64():
            values = draw(st.lists(st.one_of(st.none(), st.floats()), min_size=n, max_size=n))
        elif t == pa.bool_():
            values = draw(st.lists(st.one_of(st.none(), st.booleans()), min_size=n, max_size=n))
        elif t == pa.list_(pa.int32()):
            values = draw(
                st.lists(st.one_of(st.none(), st.lists(st.integers(-5, 5), max_size=3)), min_size=n, max_size=n)
            )
        elif t == pa.timestamp("ms"):
            values = draw(st.lists(st.one_of(st.none(), st.integers(0, 2**40)), min_size=n, max_size=n))
        else:
            values = [None] * n
        cols[name] = pa.array(values, t)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue(), n


@st.composite
def coco_files(draw) -> tuple[bytes, int | None]:
    kind = draw(st.sampled_from(["coco", "coco", "json", "garbage", "deep"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300)), None
    if kind == "json":
        return json.dumps(draw(_json)).encode(), None
    if kind == "deep":
        return ('{"images": [], "annotations": [], "x": ' + _deep(draw(st.integers(10, 5000))) + "}").encode(), None
    ids = st.one_of(st.integers(0, 5), st.text(max_size=3), st.none(), _json)
    images = draw(
        st.lists(
            st.dictionaries(st.sampled_from(["id", "file_name", "coco_url", "url", "x"]), ids, max_size=4), max_size=5
        )
    )
    anns = draw(
        st.lists(
            st.dictionaries(
                st.sampled_from(["id", "image_id", "caption", "y"]), st.one_of(ids, st.text(max_size=80)), max_size=4
            ),
            max_size=8,
        )
    )
    return json.dumps({"images": images, "annotations": anns}).encode(), len(anns)


FILES = {
    "jsonl": jsonl_files(),
    "csv": delimited_files(","),
    "tsv": delimited_files("\t"),
    "parquet": parquet_files(),
    "coco": coco_files(),
}


# ------------------------------------------------------------------ the readers


def _read(folder, fmt: str, data: bytes, rows: int | None, samples_per_shard: int = 3) -> None:
    """The check before the run, then the reader: each ends in a ConfigError
    naming the file, or every row of the file is in an input shard."""
    name = f"in.{'json' if fmt == 'coco' else fmt}"
    (folder / name).write_bytes(data)
    out = folder / "out"
    job = load_job(
        {"input": {"paths": [name], "format": fmt, "limits": LIMITS}, "output": {"dir": "out"}, "stages": ["shard"]},
        base_dir=folder,
    )
    problems: list[str] = []
    input_columns(job, problems)
    assert all(name in p or "url_col" in p or "caption_col" in p or "columns" in p for p in problems), problems
    try:
        index = split_input(job.input, out, samples_per_shard)
    except ConfigError as e:
        assert name in str(e) or "columns" in str(e), str(e)
        return
    if rows is not None:
        assert index.total_rows == rows
    assert sum(index.shard_rows.values()) == index.total_rows
    seen = 0
    for sid, n in index.shard_rows.items():
        t = pq.read_table(layout.input_shard(out, sid))
        assert t.num_rows == n <= samples_per_shard
        for r in t.select(["status", "stage", "reason"]).to_pylist():
            assert (r["status"], r["stage"], r["reason"]) == ("ok", "", "") or (
                r["status"] == "failed" and r["stage"] == "input" and r["reason"]
            ), r
        caps = [c for c in t.column("caption").to_pylist()]
        assert all(len(c) <= LIMITS["max_caption_chars"] for c in caps)
        seen += n
    assert seen == index.total_rows


@pytest.mark.parametrize("fmt", list(FILES))
def test_random_and_hostile_url_lists_end_in_an_error_or_every_row(fmt, tmp_path_factory):
    @FUZZ
    @given(FILES[fmt])
    def run(file):
        data, rows = file
        _read(tmp_path_factory.mktemp(fmt), fmt, data, rows)

    run()


# ------------------------------------------------------------------ the job loader

_keys = st.sampled_from(
    [
        "input",
        "output",
        "stages",
        "ray",
        "runner",
        "storage",
        "paths",
        "format",
        "dir",
        "samples_per_shard",
        "name",
        "limits",
        "columns",
        "source",
        "url_col",
        "endpoint_url",
        "address",
        "num_cpus",
        "timeout",
        "retries",
        "zzz",
    ]
)
_stage_names = st.sampled_from(
    ["download", "basic_filter", "dedup_exact", "shard", "nope", "json:loads", "no_such_mod_pf:X", "a:b:c", "../x:Y"]
)
_values = st.recursive(
    st.one_of(_json_scalars, _stage_names),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(_keys, st.text(max_size=3)), inner, max_size=4)
    ),
    max_leaves=15,
)


@st.composite
def jobs(draw) -> dict:
    job = draw(st.dictionaries(_keys, _values, max_size=5))
    if draw(st.booleans()):  # closer to a real job, so the deeper checks are reached
        job.update(
            input=draw(
                st.one_of(
                    _values,
                    st.fixed_dictionaries(
                        {"paths": st.just(["in.parquet"])}, optional={"limits": _values, "format": _values}
                    ),
                )
            ),
            output=draw(
                st.one_of(
                    _values, st.fixed_dictionaries({"dir": st.just("out")}, optional={"samples_per_shard": _values})
                )
            ),
            stages=draw(
                st.lists(
                    st.one_of(
                        _stage_names, st.dictionaries(st.sampled_from(["name", "timeout", "retries", "zzz"]), _values)
                    ),
                    max_size=4,
                )
            ),
        )
    return job


@FUZZ
@given(jobs())
def test_random_jobs_load_as_a_job_or_a_config_error(tmp_path_factory, job):
    folder = tmp_path_factory.mktemp("job")
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x"], "caption": ["c"]}), folder / "in.parquet")
    try:
        loaded = load_job(job, base_dir=folder)
    except ConfigError:
        return
    assert isinstance(loaded, JobConfig)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.builds(yaml.safe_dump, jobs())))
def test_random_job_files_load_as_a_job_or_a_config_error(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("jobfile")
    (folder / "job.yaml").write_text(text, errors="surrogatepass")
    try:
        assert isinstance(load_job(folder / "job.yaml"), JobConfig)
    except ConfigError:
        pass
