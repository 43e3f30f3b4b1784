"""Read a run's regions back: per sample the boxes in pixels, labels and
scores from ``shards/S.parquet``, and the per-shard arrays of ragged
``store="arrays"`` columns (``arrays/<col>/<col>_S.npy`` + offsets).

Why a reader here: the regions stage stores boxes normalised to the stored
image (so they fit it at any size) and wide features outside the parquet,
aligned with its rows by position; a trainer, ``pairforge export coco`` and
the tests should undo both the same way, with one check that the arrays and
the parquet still agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.manifests import layout

#: the regions stage's parquet columns this reader needs
REGION_COLUMNS = ("region_boxes", "region_labels", "region_scores")


class RegionsError(ValueError):
    """A run's files do not hold what a regions reader needs (names the file)."""


def shard_ids(out) -> list[int]:
    """Ids of the shards with a parquet file under ``OUT/shards``; raises
    ``FileNotFoundError`` naming the folder when there is none."""
    folder = layout.shards_dir(out)
    ids = sorted(int(p.stem) for p in folder.glob("*.parquet") if p.stem.isdigit())
    if not ids:
        raise FileNotFoundError(f"no shards/*.parquet under {folder}: is {out} the output folder of a run?")
    return ids


def ragged_rows(column, dtype=None) -> list[np.ndarray]:
    """A parquet ``list<T>`` or ``list<fixed_size_list<T, d>>`` column as one
    array per row (``(K,)`` or ``(K, d)``; strings as ``str`` arrays)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    child = arr.values
    if pa.types.is_fixed_size_list(child.type):
        d = child.type.list_size
        flat = child.values.to_numpy(zero_copy_only=False)[child.offset * d : (child.offset + len(child)) * d]
        flat = flat.reshape(-1, d)
    else:
        flat = child.to_numpy(zero_copy_only=False)
        if pa.types.is_string(child.type) or pa.types.is_large_string(child.type):
            flat = flat.astype(str) if len(flat) else np.zeros(0, dtype=str)
    if dtype is not None:
        flat = flat.astype(dtype, copy=False)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def regions_of(table: pa.Table, source) -> tuple[list, list, list]:
    """Per row of a shard's parquet table: boxes (``(K, 4)`` float64, xyxy in
    pixels of the stored image), labels and scores. ``source`` names the
    file in errors."""
    missing = [c for c in (*REGION_COLUMNS, "width", "height") if c not in table.column_names]
    if missing:
        raise RegionsError(f"{source} has no {', '.join(missing)} column(s): did the run have a regions stage?")
    boxes = ragged_rows(table.column("region_boxes"), np.float64)
    labels = ragged_rows(table.column("region_labels"))
    scores = ragged_rows(table.column("region_scores"), np.float32)
    w = table.column("width").to_numpy().astype(np.float64)
    h = table.column("height").to_numpy().astype(np.float64)
    pixels = [b * np.array([wi, hi, wi, hi]) for b, wi, hi in zip(boxes, w, h)]
    return pixels, labels, scores


def read_regions(out, shard_id: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Key -> (boxes ``(K, 4)`` xyxy in pixels, labels ``(K,)``, scores
    ``(K,)``) for every sample of shard ``shard_id``, in parquet order."""
    path = layout.shard_parquet(out, shard_id)
    if not path.exists():
        raise FileNotFoundError(f"no shard parquet at {path}")
    table = pq.read_table(path)
    boxes, labels, scores = regions_of(table, path)
    keys = table.column("key").to_pylist()
    return {k: (b, lab, s) for k, b, lab, s in zip(keys, boxes, labels, scores)}


def read_arrays(out, column: str, shard_id: int, mmap: bool = True) -> list[np.ndarray]:
    """The per-row arrays of ragged ``store="arrays"`` column ``column`` of
    shard ``shard_id``, in the order of ``shards/S.parquet`` (views into one
    memory-mapped file unless ``mmap`` is false). Raises :class:`RegionsError`
    when the offsets do not match the parquet's rows."""
    npy, offs = layout.array_npy(out, column, shard_id), layout.array_offsets(out, column, shard_id)
    for p in (npy, offs):
        if not p.exists():
            raise FileNotFoundError(f"no {column} array at {p}")
    flat = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    offsets = np.load(offs, allow_pickle=False)
    parquet = layout.shard_parquet(out, shard_id)
    rows = pq.read_metadata(parquet).num_rows if Path(parquet).exists() else len(offsets) - 1
    if len(offsets) != rows + 1 or offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
        raise RegionsError(
            f"{offs}: {len(offsets)} offsets ending at {offsets[-1] if len(offsets) else None} do not fit "
            f"{rows} rows of {parquet} and {len(flat)} array rows of {npy}"
        )
    return [flat[offsets[i] : offsets[i + 1]] for i in range(rows)]
