"""Rewriting one finished shard without some of its rows (``pairforge purge``).

Every file of the shard that holds a row per sample loses the purged
samples in step (the tar's members, the parquet, the clip-retrieval
metadata, the embeddings, the ragged arrays and their offsets), so that
position ``i`` still means one sample in all of them. A purged row is not
dropped from the accounting: it becomes a *tombstone* in
``rejects/S.parquet``. A purged sample's tombstone has its key and source,
``status`` ``dropped``, ``stage`` ``purge``, the list's reason, and a
detail naming the list and line but not the entry (which may be the URL
itself); a purged reject row keeps its key, source, status, stage and
reason, and its detail becomes ``{"purged": {list, line, kind, reason}}``.
Every other value is null, and the row's vectors in
``rejects/S_<col>.npy`` are zeros. So ``manifest verify`` still finds every
input row in exactly one shard or reject file, and nothing of the row but
its key and fate is left to say what it was.

Files are rewritten whole from bytes complete in memory (``storage.write_atomic``:
a temporary name and a rename, or one upload), and ``S_stats.json`` last,
carrying the purge's id: a shard whose stats name the purge is finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.manifests import layout
from pairforge.manifests.manifest import PURGE_STAGE
from pairforge.manifests.shards import RESIZE_REASONS, error_message

TOMBSTONE_STATUS = "dropped"
#: the values a purged row keeps (with status, stage, reason, detail and error_message)
KEPT = ("key", "shard_id", "source")
_EMB = re.compile(r"^embeddings/(?P<col>[^/]+)/(?P=col)_(?P<s>\d+)\.npy$")
_META = re.compile(r"^embeddings/metadata/metadata_(?P<s>\d+)\.parquet$")
_ARR = re.compile(r"^arrays/(?P<col>[^/]+)/(?P=col)_(?P<s>\d+)(?P<off>\.offsets)?\.npy$")
_REJ_EMB = re.compile(r"^rejects/(?P<s>\d+)_(?P<col>.+)\.npy$")


class PurgeError(RuntimeError):
    """A build the purge cannot rewrite safely (a file it does not know, a
    file that does not match the manifest)."""


def classify_files(files: list[str], name: str) -> dict:
    """The shard's files by role; an unknown one is an error (the purge would
    leave its rows behind)."""
    roles: dict = {"embeddings": {}, "metadata": None, "arrays": {}, "rejects_emb": {}}
    fixed = {
        f"shards/{name}.tar": "tar", f"shards/{name}.parquet": "parquet",
        f"shards/{name}_stats.json": "stats", f"rejects/{name}.parquet": "rejects",
    }  # fmt: skip
    for f in files:
        if f in fixed:
            roles[fixed[f]] = f
        elif m := _META.match(f):
            roles["metadata"] = f
        elif (m := _EMB.match(f)) and m["s"] == name:
            roles["embeddings"][m["col"]] = f
        elif (m := _ARR.match(f)) and m["s"] == name:
            roles["arrays"].setdefault(m["col"], {})["offsets" if m["off"] else "flat"] = f
        elif (m := _REJ_EMB.match(f)) and m["s"] == name:
            roles["rejects_emb"][m["col"]] = f
        else:
            raise PurgeError(f"shard {name}: {f} is no file the purge knows how to rewrite; nothing was changed")
    return roles


def parquet_bytes(table: pa.Table) -> bytes:
    """As ``manifests.shards`` writes its parquet files (zstd)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)  # nothing read from OUT runs as code
    except ValueError as e:
        raise PurgeError(f"{what}: not a plain .npy array ({e})") from None


def filter_tar(data: bytes, remove: set[str], keys: set[str], what: str) -> bytes:
    """The tar without the members of ``remove`` (``{key}.{ext}``), every
    other member's header and bytes as they were."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst,
    ):
        for m in src.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in keys:
                raise PurgeError(f"{what}: member {m.name!r} belongs to no sample of the shard's parquet")
            if key in remove:
                continue
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    return out.getvalue()


def tombstones(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    """Reject rows for purged rows: ``rows`` give key, shard_id, source,
    status, stage, reason and detail (a dict); every other column is null."""
    detail = [json.dumps(r["detail"], sort_keys=True) for r in rows]
    values = {c: [r.get(c) for r in rows] for c in (*KEPT, "status", "stage", "reason")}
    values["detail"] = detail
    values["error_message"] = [error_message(r["reason"], d) for r, d in zip(rows, detail)]
    cols = [pa.array(values[f.name], f.type) if f.name in values else pa.nulls(len(rows), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _tombstone_rows(rej: pa.Table, marked: dict, gone: dict, shard_id: int) -> list[dict]:
    """A purged sample becomes a reject of the ``purge`` stage; a purged
    reject keeps its status, stage and reason (its counters stay true) and
    names the purge in its detail, which replaces the old one (a download's
    detail holds the URL)."""
    rows = [
        {"key": k, "shard_id": shard_id, "source": e.get("source"), "status": TOMBSTONE_STATUS,
         "stage": PURGE_STAGE, "reason": e["reason"], "detail": e["detail"]}
        for k, e in gone.items()
    ]  # fmt: skip
    if marked:
        cols = [c for c in ("key", "status", "stage", "reason") if c in rej.column_names]
        for r in rej.select(cols).to_pylist():
            e = marked.get(r["key"])
            if e is not None:
                purged = {**e["detail"], "reason": e["reason"]}
                rows.append({**r, "shard_id": shard_id, "source": e.get("source"), "detail": {"purged": purged}})
    return rows


def _rows_of_files(out, shard) -> dict[str, bytes]:
    """Every file of the shard, checked against the manifest before it is rewritten."""
    data = {}
    for f, want in shard["files"].items():
        b = (out / f).read_bytes()
        if (len(b), hashlib.sha256(b).hexdigest()) != (want["bytes"], want["sha256"]):
            raise PurgeError(
                f"{f} does not match the manifest (run pairforge manifest verify); the purge rewrites only whole, "
                "verified shards"
            )
        data[f] = b
    return data


def rewrite_shard(out, shard: dict, plan: dict, purge: dict, defaults: dict | None = None) -> tuple[dict, dict]:
    """Rewrite shard ``shard`` (its manifest entry) as ``plan`` says
    (``samples`` and ``rejects``: key -> {source, reason, detail}); returns
    its new stats and its files' new entries (the stats file's included).
    ``defaults``: the declared columns' defaults (a value that counts as none
    in the column summaries)."""
    name, sid = shard["name"], shard["shard_id"]
    roles = classify_files(list(shard["files"]), name)
    data = _rows_of_files(out, shard)
    stats = json.loads(data[roles["stats"]])
    table = pq.read_table(io.BytesIO(data[roles["parquet"]]))
    keys = table.column("key").to_pylist()
    gone = set(plan["samples"]) & set(keys)
    keep = np.array([k not in gone for k in keys], dtype=bool)
    new: dict[str, bytes] = {}
    new[roles["tar"]] = filter_tar(data[roles["tar"]], gone, set(keys), roles["tar"])
    new[roles["parquet"]] = parquet_bytes(table.filter(pa.array(keep)))
    if roles["metadata"]:
        meta = pq.read_table(io.BytesIO(data[roles["metadata"]]))
        mkeep = pa.array([k not in gone for k in meta.column("key").to_pylist()], pa.bool_())
        new[roles["metadata"]] = parquet_bytes(meta.filter(mkeep))
    for f in roles["embeddings"].values():
        arr = load_npy(data[f], f)
        if len(arr) != len(keys):
            raise PurgeError(f"{f}: {len(arr)} rows, the shard's parquet has {len(keys)}")
        new[f] = npy_bytes(arr[keep])
    for pair in roles["arrays"].values():
        flat, offsets = load_npy(data[pair["flat"]], pair["flat"]), load_npy(data[pair["offsets"]], pair["offsets"])
        if len(offsets) != len(keys) + 1 or offsets[-1] != len(flat):
            raise PurgeError(f"{pair['offsets']}: does not index {pair['flat']} for {len(keys)} samples")
        lengths = np.diff(offsets)
        new[pair["flat"]] = npy_bytes(flat[np.repeat(keep, lengths)])
        new[pair["offsets"]] = npy_bytes(np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64))

    rej = pq.read_table(io.BytesIO(data[roles["rejects"]]))
    rkeys = rej.column("key").to_pylist()
    marked = {k: e for k, e in plan["rejects"].items() if k in set(rkeys)}
    rows = _tombstone_rows(rej, marked, {k: plan["samples"][k] for k in gone}, sid)
    kept = rej.filter(pa.array([k not in marked for k in rkeys], pa.bool_()))
    merged = pa.concat_tables([kept, tombstones(rej.schema, rows)])
    order = np.argsort(np.array(merged.column("key").to_pylist(), dtype=str), kind="stable")
    merged = merged.take(pa.array(order))
    new[roles["rejects"]] = parquet_bytes(merged)
    new.update(_reject_embeddings(roles, data, name, rkeys, marked, merged, new))
    files = dict(stats["files"])
    for f, b in new.items():
        layout.atomic_write_bytes(out / f, b)
        files[f] = {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
    stats = _new_stats(stats, merged, int(keep.sum()), files, purge, len(gone), len(marked))
    if stats.get("columns"):  # the signal summaries count rows that have a value: tombstones have none
        kept_rows = table.filter(pa.array(keep))
        stats["columns"] = column_summaries(stats["columns"], [kept_rows, merged], defaults or {})
    stats_bytes = json.dumps(stats, indent=1, sort_keys=True).encode("utf-8")
    layout.atomic_write_bytes(out / roles["stats"], stats_bytes)  # last: the shard is finished
    entries = {**files, roles["stats"]: {"bytes": len(stats_bytes), "sha256": hashlib.sha256(stats_bytes).hexdigest()}}
    return stats, entries


def _reject_embeddings(roles, data, name, rkeys, marked, merged, new) -> dict[str, bytes]:
    """``rejects/S_<col>.npy`` in the new rejects' order: the old rows, zeros
    for tombstones (a shard without rejects before gets the file now, as
    ``write_shard`` writes it wherever rejects and embeddings exist)."""
    out = {}
    pos = {k: i for i, k in enumerate(rkeys)}
    where = np.array([-1 if k in marked else pos.get(k, -1) for k in merged.column("key").to_pylist()], dtype=np.int64)
    for col in sorted(set(roles["embeddings"]) | set(roles["rejects_emb"])):
        rf = roles["rejects_emb"].get(col, f"rejects/{name}_{col}.npy")
        if rf in data:
            old = load_npy(data[rf], rf)
        else:
            f = roles["embeddings"][col]
            old = np.zeros((0, *load_npy(new[f], f).shape[1:]), dtype=np.float16)
        if len(old) != len(rkeys):
            raise PurgeError(f"{rf}: {len(old)} rows, the shard's rejects have {len(rkeys)}")
        arr = np.zeros((len(where), *old.shape[1:]), dtype=old.dtype)
        arr[where >= 0] = old[where[where >= 0]]
        out[rf] = npy_bytes(arr)
    return out


def _new_stats(stats: dict, rejects: pa.Table, ok: int, files: dict, purge: dict, samples: int, marked: int) -> dict:
    """The shard's counters recounted from its new rejects (as ``write_shard`` counts them)."""
    stage, reason = rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist()
    pairs = Counter(zip(stage, reason))
    from_download = {r: c for (s, r), c in pairs.items() if s == "download"}
    nested: dict[str, dict[str, int]] = {}
    for (s, r), c in sorted(pairs.items()):
        nested.setdefault(str(s), {})[str(r)] = int(c)
    by_reason = Counter()
    for (_, r), c in pairs.items():
        by_reason[str(r)] += c
    written = Counter(rejects.column("status").to_pylist())
    out = dict(stats)
    out.update(
        successes=ok,
        rejected=rejects.num_rows,
        failed_to_download=sum(c for r, c in from_download.items() if r not in RESIZE_REASONS),
        failed_to_resize=sum(c for r, c in from_download.items() if r in RESIZE_REASONS),
        status=dict(sorted({**({"success": ok} if ok else {}), **written}.items())),
        status_dict=dict(sorted({"success": ok, **by_reason}.items())),
        rejects_by_stage=nested,
        files=files,
        purges=[*stats.get("purges", []), {**purge, "samples": samples, "rejects": marked}],
    )
    return out


def column_summaries(old: dict, tables: list[pa.Table], defaults: dict) -> dict:
    """The shard's summaries of ``old``'s columns recounted over the rows of
    ``tables`` that have a value (as ``manifests.shards.column_summaries``
    counts them: not null, not NaN, not the column's default)."""
    import pyarrow.compute as pc

    out = {}
    for name in sorted(old):
        parts = [
            pc.fill_null(t.column(name).cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
            for t in tables
            if name in t.column_names
        ]
        v = np.concatenate(parts) if parts else np.zeros(0)
        have = np.isfinite(v)
        d = defaults.get(name)
        if d is not None and np.isfinite(float(d)):
            have &= v != float(d)
        v = v[have]
        out[name] = {"rows": int(len(v)), "sum": float(v.sum()), "positive": int((v > 0).sum()),
                     **({"min": float(v.min()), "max": float(v.max())} if len(v) else {})}  # fmt: skip
    return out
