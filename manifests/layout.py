"""Where everything of one run lives under its output folder ``OUT``.

This is the on-disk contract (LAION / img2dataset layout) that trainers and
``pairforge manifest`` read:

    OUT/manifest.json                      the run manifest
    OUT/shards/00000.tar                   {key}.{jpg|png|webp} {key}.txt {key}.json
    OUT/shards/00000.parquet               one row per sample of that tar
    OUT/shards/00000_stats.json            that shard's counters; written last
    OUT/shards/sizes.json                  shard file name -> samples (open_clip)
    OUT/rejects/00000.parquet              every row of shard 0 that did not make it
    OUT/embeddings/<col>/<col>_00000.npy   2-D ``*_emb`` columns, float16, parquet row order
    OUT/embeddings/metadata/metadata_00000.parquet  the same rows' metadata (clip-retrieval's layout)
    OUT/arrays/<col>/<col>_00000.npy       ragged ``store="arrays"`` columns, concatenated, parquet row order
    OUT/arrays/<col>/<col>_00000.offsets.npy  n + 1 offsets into it
    OUT/<table>/00000.parquet              side tables of global stages (confounders), by shard
    OUT/_work/input/00000.parquet          the URL list cut into shards, keys assigned
    OUT/_work/rows/00000/*.rows.arrow      rows of input shard 0 after every per-row stage (Arrow IPC)
    OUT/_work/rows/00000/*.fit.parquet     their fit columns (key, status, hashes, embeddings)
    OUT/_work/rows/00000/_done.json        input shard 0 finished its per-row pass (lists the parts)
    OUT/_work/fit/<stage>/decisions/00000.parquet  a global stage's decisions for shard 0
    OUT/_work/fit/<stage>/_done.json       that stage's fit finished
    OUT/_work/job.json                     what the per-row pass and fits were run with

Image-bearing ``rows`` parts are removed once their shard is written; fit
files and decisions stay (tens of bytes a row, plus embeddings where a fit
reads them), so a resumed run refits without downloading finished shards.

``OUT`` is a local folder or a prefix on object storage (``s3://bucket/run``,
``gs://...``; ``manifests.storage``): every path here is a ``Path`` or an
``ObjectPath`` accordingly, with the same names under it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pairforge.manifests import storage
from pairforge.manifests.storage import ObjectPath

SHARD_DIGITS = 5
#: a stage, column or side-table name where it becomes part of a path (these
#: come from the stages' declarations; a custom stage's are checked too)
PATH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _named(kind: str, name: str) -> str:
    if not isinstance(name, str) or not PATH_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{kind} {name!r}: a name that becomes part of a path must be {PATH_NAME.pattern}")
    return name


def _root(out) -> Path | ObjectPath:
    """``OUT`` as a local path or an object-storage prefix (``manifests.storage``)."""
    return storage.path(out)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def shards_dir(out: str | Path) -> Path:
    return _root(out) / "shards"


def shard_tar(out, shard_id: int) -> Path:
    return shards_dir(out) / f"{shard_name(shard_id)}.tar"


def shard_parquet(out, shard_id: int) -> Path:
    return shards_dir(out) / f"{shard_name(shard_id)}.parquet"


def shard_stats(out, shard_id: int) -> Path:
    return shards_dir(out) / f"{shard_name(shard_id)}_stats.json"


def sizes_json(out) -> Path:
    return shards_dir(out) / "sizes.json"


def rejects_parquet(out, shard_id: int) -> Path:
    return _root(out) / "rejects" / f"{shard_name(shard_id)}.parquet"


def embedding_npy(out, column: str, shard_id: int) -> Path:
    column = _named("column", column)
    return _root(out) / "embeddings" / column / f"{column}_{shard_name(shard_id)}.npy"


def array_npy(out, column: str, shard_id: int) -> Path:
    """A ``store="arrays"`` ragged column of a shard's samples, concatenated."""
    column = _named("column", column)
    return _root(out) / "arrays" / column / f"{column}_{shard_name(shard_id)}.npy"


def array_offsets(out, column: str, shard_id: int) -> Path:
    """Where each sample's rows start in :func:`array_npy` (n + 1 int64)."""
    column = _named("column", column)
    return _root(out) / "arrays" / column / f"{column}_{shard_name(shard_id)}.offsets.npy"


def embedding_metadata(out, shard_id: int) -> Path:
    """The metadata of the rows of ``embedding_npy(out, *, shard_id)``, in their
    order: clip-retrieval's ``index`` copies ``embeddings/metadata`` beside the
    index and ``back`` serves its rows by their position in the embeddings."""
    return _root(out) / "embeddings" / "metadata" / f"metadata_{shard_name(shard_id)}.parquet"


def rejects_embedding_npy(out, column: str, shard_id: int) -> Path:
    """Embeddings of the rejected rows, in the order of ``rejects/S.parquet``
    (zeros where a row was rejected before it had one)."""
    return _root(out) / "rejects" / f"{shard_name(shard_id)}_{_named('column', column)}.npy"


def manifest_json(out) -> Path:
    return _root(out) / "manifest.json"


def work_dir(out) -> Path:
    return _root(out) / "_work"


def rows_dir(out, shard_id: int) -> Path:
    """Rows of one input shard after the per-row pass: each final task
    leaves its rows here, one file per (task, shard)."""
    return work_dir(out) / "rows" / shard_name(shard_id)


def rows_done(out, shard_id: int) -> Path:
    return rows_dir(out, shard_id) / "_done.json"


def fit_dir(out, stage: str) -> Path:
    return work_dir(out) / "fit" / _named("stage", stage)


def fit_done(out, stage: str) -> Path:
    return fit_dir(out, stage) / "_done.json"


def decisions_parquet(out, stage: str, shard_id: int) -> Path:
    return fit_dir(out, stage) / "decisions" / f"{shard_name(shard_id)}.parquet"


def reduced_dir(out, stage: str) -> Path:
    return fit_dir(out, stage) / "reduced"


def side_table_dir(out, table: str) -> Path:
    return _root(out) / _named("side table", table)


def eval_dir(out) -> Path:
    """``OUT/eval``: ``pairforge eval --run OUT`` files its figures here, one JSON a set."""
    return _root(out) / "eval"


def side_table_parquet(out, table: str, shard_id: int) -> Path:
    return side_table_dir(out, table) / f"{shard_name(shard_id)}.parquet"


def job_record(out) -> Path:
    return work_dir(out) / "job.json"


def input_dir(out) -> Path:
    return _root(out) / "_work" / "input"


def input_shard(out, shard_id: int) -> Path:
    return input_dir(out) / f"{shard_name(shard_id)}.parquet"


def input_index(out) -> Path:
    return input_dir(out) / "index.json"


#: names of files being written (``.NAME.tmp`` or ``.NAME.tmp-PID``); one left
#: behind is an interrupted write, never a result
TEMP_NAME = re.compile(r"^\..+\.tmp(-\d+)?$")


def temp_files(out) -> list[Path | ObjectPath]:
    """Temporary files an interrupted run left anywhere under ``OUT`` (none
    on object storage, where an object is uploaded whole to its own key)."""
    return sorted(f for f in storage.walk_files(_root(out)) if TEMP_NAME.match(f.name))


def atomic_write_bytes(path: Path | ObjectPath, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename over
    ``path``; on object storage, one upload of the whole object."""
    storage.write_atomic(path, data)
