"""Read URL lists and cut them into input shards with stable keys.

Like img2dataset's reader, the driver streams the URL lists once and writes
``OUT/_work/input/SSSSS.parquet`` files of ``samples_per_shard`` rows. Row
``i`` of shard ``S`` gets the key ``{S:05d}{i:0Wd}`` (W digits for the shard
size), which it keeps to its output shard or its reject row.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from manifests import layout
from pipeline.config import ConfigError, InputConfig
from stages.base import IDENTITY_COLUMNS, STATUS_OK

FORMATS = ("parquet", "csv", "tsv", "jsonl")
RESERVED = set(IDENTITY_COLUMNS) | {"url", "caption", "source"}
READ_ROWS = 65536


@dataclass(frozen=True)
class InputIndex:
    total_rows: int
    samples_per_shard: int
    shard_rows: dict[int, int]
    files: tuple[dict, ...]

    def to_json(self) -> dict:
        return {
            "total_rows": self.total_rows,
            "samples_per_shard": self.samples_per_shard,
            "shard_rows": {str(k): v for k, v in sorted(self.shard_rows.items())},
            "files": list(self.files),
        }

    @classmethod
    def from_json(cls, d: dict) -> "InputIndex":
        return cls(
            total_rows=d["total_rows"],
            samples_per_shard=d["samples_per_shard"],
            shard_rows={int(k): v for k, v in d["shard_rows"].items()},
            files=tuple(d["files"]),
        )


def expand_paths(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        hits = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        if not hits:
            raise ConfigError(f"input.paths: no file matches {p!r}")
        for h in hits:
            if not Path(h).is_file():
                raise ConfigError(f"input.paths: not a file: {h}")
            out.append(Path(h))
    return out


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError(f"input.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    by_suffix = {"parquet": "parquet", "pq": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"}
    if suffix not in by_suffix:
        raise ConfigError(f"{path}: cannot tell the format from the extension; set input.format")
    return by_suffix[suffix]


def iter_batches(path: Path, fmt: str) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS)
    elif fmt in ("csv", "tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
        conv = pacsv.ConvertOptions(strings_can_be_null=True)
        yield from pacsv.open_csv(path, parse_options=opts, convert_options=conv)
    else:
        yield from pajson.read_json(path).to_batches(READ_ROWS)


def _normalise(batch: pa.RecordBatch, cfg: InputConfig, path: Path, source: str) -> pa.Table:
    names = batch.schema.names
    for role, col in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col)):
        if col not in names:
            raise ConfigError(f"{path}: no column {col!r} (input.{role}); columns are: {', '.join(names)}")
    url = pc.cast(batch.column(cfg.url_col), pa.string())
    cap = pc.cast(batch.column(cfg.caption_col), pa.string())
    cols = {
        "url": pc.fill_null(url, ""),
        "caption": pc.fill_null(cap, ""),
        "source": pa.array([source] * batch.num_rows, pa.string()),
    }
    for name in names:
        if name in (cfg.url_col, cfg.caption_col):
            continue
        out_name = f"input_{name}" if name in RESERVED else name
        cols[out_name] = batch.column(name)
    return pa.table(cols)


def split_input(cfg: InputConfig, out_dir: str | Path, samples_per_shard: int, progress=None) -> InputIndex:
    """Stream every input file once, write the input shards, return the index."""
    out = Path(out_dir)
    layout.input_dir(out).mkdir(parents=True, exist_ok=True)
    width = len(str(samples_per_shard - 1))
    pending: list[pa.Table] = []
    pending_rows = 0
    shard_rows: dict[int, int] = {}
    files = []
    total = 0

    def flush(final: bool) -> None:
        nonlocal pending, pending_rows
        while pending_rows >= samples_per_shard or (final and pending_rows):
            table = pa.concat_tables(pending, promote_options="permissive").combine_chunks()
            take_n = min(samples_per_shard, table.num_rows)
            head, rest = table.slice(0, take_n), table.slice(take_n)
            sid = len(shard_rows)
            _write_input_shard(out, sid, head, width)
            shard_rows[sid] = take_n
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            if progress:
                progress(sid, take_n)

    for path in expand_paths(cfg.paths):
        fmt = detect_format(path, cfg.format)
        source = cfg.source or path.stem
        rows = 0
        for batch in iter_batches(path, fmt):
            table = _normalise(batch, cfg, path, source)
            pending.append(table)
            pending_rows += table.num_rows
            rows += table.num_rows
            flush(final=False)
        files.append({"path": str(path), "format": fmt, "rows": rows})
        total += rows
    flush(final=True)
    index = InputIndex(total, samples_per_shard, shard_rows, tuple(files))
    layout.atomic_write_bytes(layout.input_index(out), json.dumps(index.to_json(), indent=1).encode())
    return index


def _write_input_shard(out: Path, sid: int, table: pa.Table, width: int) -> None:
    n = table.num_rows
    ident = {
        "key": pa.array([f"{layout.shard_name(sid)}{i:0{width}d}" for i in range(n)], pa.string()),
        "shard_id": pa.array([sid] * n, pa.int64()),
        "status": pa.array([STATUS_OK] * n, pa.string()),
        "stage": pa.array([""] * n, pa.string()),
        "reason": pa.array([""] * n, pa.string()),
        "detail": pa.array([""] * n, pa.string()),
    }
    for name in table.column_names:
        ident[name] = table.column(name)
    path = layout.input_shard(out, sid)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(ident), tmp)
    tmp.replace(path)


def read_index(out_dir: str | Path) -> InputIndex | None:
    try:
        return InputIndex.from_json(json.loads(layout.input_index(out_dir).read_text()))
    except FileNotFoundError:
        return None
