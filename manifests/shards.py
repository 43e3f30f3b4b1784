"""Write one shard of a run in the LAION / img2dataset layout, atomically and
deterministically: the same rows give the same bytes whatever order they
arrived in, so a resumed run equals an uninterrupted one.

For shard ``S`` of output ``OUT`` (see :mod:`manifests.layout`):

* ``shards/S.tar``: per ok row ``{key}.{ext}``, ``{key}.txt``, ``{key}.json``
* ``shards/S.parquet``: the same rows and metadata, in key order
* ``embeddings/<col>/<col>_S.npy``: every vector column declared with
  ``store="embeddings"``, float16; ``embeddings/metadata/metadata_S.parquet``
  the same rows' metadata in the same order (clip-retrieval's layout: its
  ``index`` builds on ``img_emb``/``text_emb`` and copies ``metadata``)
* ragged columns (``Column(kind="ragged")``): a parquet list column, or
  with ``store="arrays"`` ``arrays/<col>/<col>_S.npy`` (the rows' arrays
  concatenated in parquet order) and ``<col>_S.offsets.npy``; and, in the
  tar, ``{key}.{col}.npy`` per sample
* ``rejects/S.parquet``: every other row, with ``stage``, ``reason``, ``detail``
  and img2dataset's ``error_message`` (the reason and the error or values behind it)
* ``rejects/S_<col>.npy``: the embeddings of those rows (a resumed run fits
  semantic dedup on them as an uninterrupted run did)
* ``shards/S_stats.json``: counters and checksums, written last: its presence
  (with the files it lists) marks the shard finished

img2dataset's conventions where the meanings match. The ``status`` column is
written in its vocabulary: ``success`` for a sample; a row the download stage
failed is ``failed_to_download`` or, for decoding and size checks,
``failed_to_resize``; other rows keep pairforge's ``failed`` or ``dropped``
(img2dataset drops nothing). The stats file has img2dataset's keys
(``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``,
``duration``, ``start_time``, ``end_time``, ``status_dict``) besides ours.
Times are only in the stats file, never in the parquet or the tar, so the
data files stay byte-identical between runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pairforge.manifests import layout, storage
from pairforge.manifests.members import MEMBER_COLUMN, unsafe_names_rejected
from pairforge.stages.base import (
    IMAGE_COLUMN,
    STATUS_FAILED,
    STATUS_OK,
    TIMING_PREFIX,
    Batch,
    Column,
    batch_len,
    object_array,
    take,
)

#: Columns that only make sense on rejected rows.
REJECT_ONLY = ("stage", "reason", "detail")
#: Columns never written as metadata (bytes, bookkeeping).
NOT_METADATA = (IMAGE_COLUMN,)
STATS_VERSION = 3
#: the download stage's reasons that img2dataset counts as ``failed_to_resize``
#: (decoding and size checks, ``stages/download.py``); its other failures are
#: ``failed_to_download``
RESIZE_REASONS = frozenset(
    {"decode_error", "too_many_pixels", "image_too_small", "image_area_too_large", "aspect_ratio_too_large"}
)
#: detail fields left out of ``error_message`` (long, and in ``detail``)
_MESSAGE_SKIP = ("url", "model")

Schema = dict[str, Column]


def _declared(schema: Schema | None, name: str) -> Column | None:
    return (schema or {}).get(name)


def metadata_columns(rows: Batch, schema: Schema | None = None) -> list[str]:
    """Columns of the parquet files: every declared column but bytes and
    embedding-store vectors, and undeclared 1-D columns (the URL list's own)."""
    out = []
    for c, v in rows.items():
        if c in NOT_METADATA or c.startswith(TIMING_PREFIX) or c.startswith("_"):
            continue
        col = _declared(schema, c)
        if col is None:
            if v.ndim == 1:
                out.append(c)
        elif col.kind != "bytes" and not (col.kind in ("vector", "ragged") and col.store != "parquet"):
            out.append(c)
    return out


def array_columns(rows: Batch, schema: Schema | None = None) -> list[str]:
    """Ragged columns stored in ``OUT/arrays`` (see ``stages.base.RAGGED_STORES``)."""
    return [
        c for c in rows if (col := _declared(schema, c)) is not None and col.kind == "ragged" and col.store == "arrays"
    ]


def concat_ragged(values, col: Column) -> tuple[np.ndarray, np.ndarray]:
    """A ragged column as one ``(sum K, *shape)`` array and ``n + 1`` int64
    offsets: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""
    parts = [np.asarray(x, dtype=col.dtype).reshape(-1, *col.shape) for x in values]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in parts])
    flat = np.concatenate(parts) if parts else np.zeros((0, *col.shape), dtype=col.dtype)
    return np.ascontiguousarray(flat, dtype=col.dtype), offsets


def embedding_columns(rows: Batch, schema: Schema | None = None) -> list[str]:
    """Vector columns stored in ``OUT/embeddings`` (clip-retrieval layout)."""
    return [
        c
        for c in rows
        if (col := _declared(schema, c)) is not None and col.kind == "vector" and col.store == "embeddings"
    ]


def tar_array_columns(schema: Schema | None) -> list[str]:
    return sorted(c.name for c in (schema or {}).values() if c.kind == "ragged" and c.in_tar)


def arrow_column(v: np.ndarray, col: Column | None) -> pa.Array:
    """One batch column as Arrow, by its declared kind (undeclared: inferred)."""
    if col is None and v.ndim == 2 and v.dtype != object:  # an undeclared matrix: fixed-size rows
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).reshape(-1)), v.shape[1])
    if col is not None and col.kind == "string" and col.nullable:  # "" is "no value": null
        return pa.array([x if isinstance(x, str) and x else None for x in v.tolist()], pa.string())
    if col is None or col.kind in ("string", "bytes"):
        return pa.array(v.tolist() if v.dtype == object else v)
    if col.kind == "scalar":
        return pa.array(np.asarray(v, dtype=col.dtype))
    if col.kind == "vector":
        flat = np.ascontiguousarray(np.asarray(v, dtype=col.dtype).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), col.shape[0])
    # ragged: list<fixed_size_list<dtype, d>> for K x d elements, list<dtype> for K scalars
    parts = [np.asarray(x, dtype=col.dtype).reshape(-1, *col.shape) for x in v]
    lengths = np.array([len(x) for x in parts], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    width = int(np.prod(col.shape)) if col.shape else 1
    flat = np.concatenate([x.reshape(-1) for x in parts]) if parts else np.zeros(0, dtype=col.dtype)
    values = pa.array(flat.astype(col.dtype, copy=False))
    if col.shape:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(offsets, values)


def written_status(status: str, stage: str, reason: str) -> str:
    """A row's status as written, in img2dataset's words where they apply
    (see the module doc); in memory the stages use ok/failed/dropped."""
    if status == STATUS_OK:
        return "success"
    if status == STATUS_FAILED and stage == "download":
        return "failed_to_resize" if reason in RESIZE_REASONS else "failed_to_download"
    return str(status)


def error_message(reason: str, detail: str) -> str:
    """img2dataset's ``error_message`` of a rejected row: its reason, then
    the error behind it or the values of its detail (``http_404
    (http_status=404)``)."""
    try:
        d = json.loads(detail) if detail else {}
    except ValueError:
        d = {}
    if not isinstance(d, dict):
        return str(reason)
    if d.get("error"):
        return f"{reason}: {d['error']}"
    facts = [f"{k}={v}" for k, v in sorted(d.items()) if k not in _MESSAGE_SKIP and not isinstance(v, (dict, list))]
    return f"{reason} ({', '.join(facts)})" if facts else str(reason)


def _as_written(rows: Batch) -> Batch:
    """The rows with ``status`` in the written vocabulary and, on rejected
    rows, ``error_message`` ("" on samples, which are written without it)."""
    out = dict(rows)
    trip = list(zip(rows["status"], rows["stage"], rows["reason"]))
    out["status"] = object_array([written_status(st, sg, r) for st, sg, r in trip])
    out["error_message"] = object_array(
        ["" if st == STATUS_OK else error_message(str(r), str(d)) for (st, _, r), d in zip(trip, rows["detail"])]
    )
    return out


def to_arrow(rows: Batch, columns: list[str], schema: Schema | None = None) -> pa.Table:
    return pa.table({c: arrow_column(rows[c], _declared(schema, c)) for c in columns})


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _tar_bytes(rows: Batch, meta: pa.Table, arrays: list[str] = ()) -> bytes:
    """A tar with fixed member metadata (mtime 0, root owner) so its bytes
    depend only on the rows. ``arrays``: ragged columns written as
    ``{key}.{column}.npy`` members (and left out of ``{key}.json``)."""
    buf = io.BytesIO()
    for c in arrays:  # declared by a stage: a name that is not a member name is that stage's bug
        if not MEMBER_COLUMN.fullmatch(c):
            raise ValueError(f"column {c!r}: a tar member name needs {MEMBER_COLUMN.pattern}")
    if arrays:
        meta = meta.drop_columns([c for c in arrays if c in meta.column_names])
    records = meta.to_pylist()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, rec in enumerate(records):
            key = rec["key"]
            ext = rows["image_ext"][i] if "image_ext" in rows else "jpg"
            image = rows[IMAGE_COLUMN][i] if IMAGE_COLUMN in rows else None
            members = (
                *(((f"{key}.{ext}", image),) if image is not None else ()),
                (f"{key}.txt", str(rec.get("caption") or "").encode("utf-8")),
                (f"{key}.json", json.dumps(rec, sort_keys=True, default=str).encode("utf-8")),
                *((f"{key}.{c}.npy", _npy_bytes(rows[c][i])) for c in arrays),
            )
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _file_entry(out: Path, path: Path, data: bytes) -> tuple[str, dict]:
    layout.atomic_write_bytes(path, data)
    return str(path.relative_to(out)), {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_shard(
    rows: Batch,
    out_dir: str | Path,
    shard_id: int,
    write_embeddings: bool = True,
    schema: Schema | None = None,
    counters: dict | None = None,
) -> dict:
    """Write all files of shard ``shard_id`` from ``rows`` (every row of that
    shard, ok or not) and return its stats (also written as ``S_stats.json``).
    ``schema``: the stages' declared columns (see ``stages.base.Column``);
    ``counters``: extra per-shard counters the runner adds to the stats."""
    out = storage.path(out_dir)
    t_start = time.time()
    n = batch_len(rows)
    if n:
        rows = unsafe_names_rejected(take(rows, np.argsort(rows["key"].astype(str), kind="stable")))
        ok = rows["status"] == STATUS_OK
    else:
        ok = np.zeros(0, dtype=bool)
    ok_rows = take(rows, np.flatnonzero(ok)) if n else {}
    cols = metadata_columns(rows, schema) if n else ["key"]
    table = (
        to_arrow(_as_written(rows), [*cols, "error_message"], schema)
        if n
        else pa.table({"key": pa.array([], pa.string())})
    )
    ok_arr = pa.array(ok)
    not_in_shard = [c for c in (*REJECT_ONLY, "error_message") if c in table.column_names]
    shard_table = table.filter(ok_arr).drop_columns(not_in_shard)
    reject_table = table.filter(pc.invert(ok_arr))

    files: dict[str, dict] = {}
    for path, data in (
        (
            layout.shard_tar(out, shard_id),
            _tar_bytes(ok_rows, shard_table, tar_array_columns(schema)) if n else _tar_bytes({}, shard_table),
        ),
        (layout.shard_parquet(out, shard_id), _parquet_bytes(shard_table)),
        (layout.rejects_parquet(out, shard_id), _parquet_bytes(reject_table)),
    ):
        name, entry = _file_entry(out, path, data)
        files[name] = entry
    emb_cols = embedding_columns(rows, schema) if write_embeddings and n else []
    for col in emb_cols:
        targets = [(layout.embedding_npy(out, col, shard_id), ok)]
        if not ok.all():
            targets.append((layout.rejects_embedding_npy(out, col, shard_id), ~ok))
        for path, mask in targets:
            buf = io.BytesIO()
            np.save(buf, np.asarray(rows[col][mask], dtype=np.float16))
            name, entry = _file_entry(out, path, buf.getvalue())
            files[name] = entry
    for col in array_columns(rows, schema) if n else []:
        flat, offsets = concat_ragged(ok_rows[col] if ok.any() else [], schema[col])
        for path, arr in (
            (layout.array_npy(out, col, shard_id), flat),
            (layout.array_offsets(out, col, shard_id), offsets),
        ):
            name, entry = _file_entry(out, path, _npy_bytes(arr))
            files[name] = entry
    if emb_cols:  # clip-retrieval reads the rows of embeddings/*/*_S.npy from here, by position
        name, entry = _file_entry(out, layout.embedding_metadata(out, shard_id), _parquet_bytes(shard_table))
        files[name] = entry

    rejected = Counter(zip(rows["stage"][~ok], rows["reason"][~ok])) if n else Counter()
    written = Counter(reject_table.column("status").to_pylist()) if n else Counter()
    from_download = {r: c for (s, r), c in rejected.items() if s == "download"}
    stage_seconds = {
        c[len(TIMING_PREFIX) :]: float(np.sum(rows[c])) for c in (rows if n else {}) if c.startswith(TIMING_PREFIX)
    }
    end = time.time()
    # img2dataset's duration is a shard's work; here that work is spread over the run's
    # phases, so it is the stages' seconds on these rows plus this write, ending now
    work = sum(stage_seconds.values()) + (end - t_start)
    reasons: Counter = Counter()
    for (_, reason), c in rejected.items():
        reasons[str(reason)] += c
    stats = {
        "version": STATS_VERSION,
        "shard": layout.shard_name(shard_id),
        "shard_id": int(shard_id),
        "count": int(n),
        "successes": int(ok.sum()),
        "failed_to_download": sum(c for r, c in from_download.items() if r not in RESIZE_REASONS),
        "failed_to_resize": sum(c for r, c in from_download.items() if r in RESIZE_REASONS),
        "duration": round(work, 6),
        "start_time": end - work,
        "end_time": end,
        "status_dict": dict(sorted({"success": int(ok.sum()), **reasons}.items())) if n else {},
        "rejected": int(n - ok.sum()),
        "status": dict(sorted({**({"success": int(ok.sum())} if ok.any() else {}), **written}.items())),
        "rejects_by_stage": _nested(rejected),
        "stage_seconds": stage_seconds,
        "columns": column_summaries(rows, schema) if n else {},
        "files": files,
        **(counters or {}),
    }
    layout.atomic_write_bytes(
        layout.shard_stats(out, shard_id), json.dumps(stats, indent=1, sort_keys=True).encode("utf-8")
    )
    return stats


def column_summaries(rows: Batch, schema: Schema | None) -> dict[str, dict]:
    """Per declared scalar column with ``summary``: over the shard's rows that
    have a value (not NaN, not the column's default), how many, their sum,
    min and max, and how many are above 0 (``manifest.sum_columns`` adds
    the shards up)."""
    out = {}
    for name, col in sorted((schema or {}).items()):
        if not col.summary or name not in rows:
            continue
        v = np.asarray(rows[name], dtype=np.float64)
        have = np.isfinite(v)
        if col.default is not None and np.isfinite(float(col.default)):
            have &= v != float(col.default)
        v = v[have]
        out[name] = {"rows": int(len(v)), "sum": float(v.sum()), "positive": int((v > 0).sum()),
                     **({"min": float(v.min()), "max": float(v.max())} if len(v) else {})}  # fmt: skip
    return out


def _nested(counter: Counter) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (stage, reason), count in sorted(counter.items()):
        out.setdefault(str(stage), {})[str(reason)] = int(count)
    return out


def read_stats(out_dir: str | Path, shard_id: int) -> dict | None:
    """The stats of a finished shard, or ``None`` when the shard is not
    finished (no stats file, or a file it lists is missing)."""
    out = storage.path(out_dir)
    path = layout.shard_stats(out, shard_id)
    try:
        stats = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not all((out / name).exists() for name in stats.get("files", {})):
        return None
    return stats
