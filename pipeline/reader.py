"""Read URL lists and cut them into input shards with stable keys.

Like img2dataset's reader, the driver streams the URL lists once and writes
``OUT/_work/input/SSSSS.parquet`` files of ``samples_per_shard`` rows. Row
``i`` of shard ``S`` gets the key ``{S:05d}{i:0Wd}`` (W digits for the shard
size), which it keeps to its output shard or its reject row.

A job of several sources (``input`` as a list, PMD-style) is read source
after source into one shard numbering; each source starts a shard of its
own, so a shard holds one source and adding a source at the end leaves the
keys of the others as they were. Each source's ``columns`` map renames its
columns first; a COCO captions JSON is read as one row per caption.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pairforge.manifests import layout, storage
from pairforge.manifests.storage import ObjectPath, StorageConfig
from pairforge.pipeline.config import FORMATS, ConfigError, InputConfig, input_entries
from pairforge.pipeline.inputlimits import InputError, InputLimits, bound_rows, check_column_count, is_reserved_name
from pairforge.pipeline.reader_json import COCO_COLUMNS, COCO_URL_FIELDS, coco_batches, jsonl_batches  # noqa: F401
from pairforge.stages.base import IDENTITY_COLUMNS, STATUS_OK

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


def expand_paths(
    paths: tuple[str, ...], where: str = "input", config: StorageConfig | None = None
) -> list[Path | ObjectPath]:
    """The files ``paths`` name, globs expanded: local paths, or objects
    (``s3://``, ``gs://``) reached with the job's ``storage`` options."""
    out: list[Path | ObjectPath] = []
    for p in paths:
        try:
            hits = storage.expand(p, config)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{where}.paths: {e}") from None
        if not hits:
            raise ConfigError(f"{where}.paths: no file matches {p!r}")
        for h in hits:
            if not h.is_file():
                raise ConfigError(f"{where}.paths: not a file: {h}")
            out.append(h)
    return out


def detect_format(path: Path | ObjectPath, fmt: str, where: str = "input") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError(f"{where}.format: expected one of auto, {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    by_suffix = {"parquet": "parquet", "pq": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"}
    if suffix not in by_suffix:
        raise ConfigError(f"{path}: cannot tell the format from the extension; set {where}.format")
    return by_suffix[suffix]


def renamed_names(names: list[str], cfg: InputConfig, path, where: str = "input") -> list[str]:
    """A file's column names after ``cfg.columns``; a mapped column the file
    lacks, a target that is pairforge's own or that two columns would get is
    an error naming the key."""
    for old, new in cfg.columns.items():
        if old not in names:
            raise ConfigError(
                f"{where}.columns: {old!r} is not a column of {str(path)!r} (columns: {', '.join(names)})"
            )
        if new in IDENTITY_COLUMNS or new == "source" or is_reserved_name(new):
            raise ConfigError(f"{where}.columns: {old!r} -> {new!r}: {new!r} is a column pairforge sets itself")
    same = sorted({n for n in names if names.count(n) > 1})
    if same:  # a CSV header may repeat a name
        raise ConfigError(f"{path}: two columns are named {same[0]!r}")
    out = [cfg.columns.get(n, n) for n in names]
    twice = sorted({n for n in out if out.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}.columns: {str(path)!r} would have two columns {twice[0]!r} after renaming")
    return out


def carried_names(names: list[str], cfg: InputConfig, path=None) -> dict[str, str]:
    """The (renamed) columns carried to every row besides the URL and the
    caption, and the name each gets there: one that collides with a column
    of ours, or starts with ``_`` (pairforge's: ``pipeline.inputlimits``),
    gets an ``input_`` prefix."""
    out = {
        n: f"input_{n}" if n in RESERVED or is_reserved_name(n) else n
        for n in names
        if n not in (cfg.url_col, cfg.caption_col)
    }
    targets = list(out.values())
    twice = sorted({n for n in targets if targets.count(n) > 1})
    if twice:
        where = f" of {str(path)!r}" if path is not None else ""
        raise ConfigError(f"columns{where}: two columns would be carried as {twice[0]!r} (a name of ours gets input_)")
    return out


def _size(path: Path | ObjectPath) -> int:
    return path.fs.get_file_info(path.key).size if isinstance(path, ObjectPath) else path.stat().st_size


def iter_batches(path: Path | ObjectPath, fmt: str, limits: InputLimits | None = None) -> Iterator[pa.RecordBatch]:
    """The file's rows in record batches, within ``limits``: a file that
    breaks one, or that its format's reader cannot read, is a
    ``ConfigError`` naming it (and the line, for JSONL)."""
    limits = limits or InputLimits()
    try:
        yield from _batches(path, fmt, limits)
    except InputError as e:
        raise ConfigError(str(e)) from None
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ConfigError(f"{path}: cannot read it as {fmt}: {type(e).__name__}: {e}") from None


def _batches(path: Path | ObjectPath, fmt: str, limits: InputLimits) -> Iterator[pa.RecordBatch]:
    if fmt == "coco":
        yield from coco_batches(path, limits, READ_ROWS)
        return
    if fmt == "jsonl":
        yield from jsonl_batches(path, limits, READ_ROWS)
        return
    with storage.arrow_input(path) as src:  # a local path as it is; an object opened for reading
        if fmt == "parquet":
            # pre_buffer reads ahead the column chunks of every row group asked for: for
            # iter_batches that is the whole file, held until the last batch (7.6 MB of a 1M-row
            # URL list, 23 MB at 3M, gigabytes at a billion): off, memory is one row group
            pf = pq.ParquetFile(src, pre_buffer=False)
            check_column_count(pf.schema_arrow.names, limits, path)
            yield from pf.iter_batches(batch_size=READ_ROWS)
        else:
            if _size(path) > limits.max_file_bytes:
                raise InputError(f"{path}: larger than input.limits.max_file_bytes ({limits.max_file_bytes})")
            opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
            conv = pacsv.ConvertOptions(strings_can_be_null=True)
            with pacsv.open_csv(src, parse_options=opts, convert_options=conv) as reader:
                check_column_count(reader.schema.names, limits, path)
                yield from reader


def _text(column, path, key: str, name: str):
    """A URL or caption column as text; one that is not (a list, a struct)
    is an error naming the file, the column and its type."""
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        raise ConfigError(f"{path}: column {name!r} ({key}) holds {column.type}, not text") from None


def _normalise(
    batch: pa.RecordBatch, cfg: InputConfig, path, source: str, where: str = "input"
) -> tuple[pa.Table, int]:
    """The batch in pairforge's columns, and how many of its captions were
    null (they become ``""``: counted in the index, see ``docs/troubleshooting.md``)."""
    names = renamed_names(batch.schema.names, cfg, path, where)
    if cfg.columns:
        batch = batch.rename_columns(names)
    for role, col in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col)):
        if col not in names:
            raise ConfigError(f"{path}: no column {col!r} ({where}.{role}); columns are: {', '.join(names)}")
    url = _text(batch.column(cfg.url_col), path, f"{where}.url_col", cfg.url_col)
    cap = _text(batch.column(cfg.caption_col), path, f"{where}.caption_col", cfg.caption_col)
    cols = {
        "url": pc.fill_null(url, ""),
        "caption": pc.fill_null(cap, ""),
        "source": pa.array([source] * batch.num_rows, pa.string()),
    }
    for name, out_name in carried_names(names, cfg, path).items():
        cols[out_name] = batch.column(name)
    return bound_rows(pa.table(cols), cfg.limits), cap.null_count


def split_input(
    cfg: InputConfig | tuple[InputConfig, ...],
    out_dir: str | Path | ObjectPath,
    samples_per_shard: int,
    progress=None,
    config: StorageConfig | None = None,
) -> InputIndex:
    """Stream every input file once, source after source, write the input
    shards, return the index. ``config``: how to reach input files on
    object storage (the job's ``storage``)."""
    out = storage.path(out_dir)
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

    for where, src in input_entries(cfg):
        for path in expand_paths(src.paths, where, config):
            fmt = detect_format(path, src.format, where)
            source = src.source or path.stem
            rows = nulls = 0
            for batch in iter_batches(path, fmt, src.limits):
                table, null_captions = _normalise(batch, src, path, source, where)
                pending.append(table)
                pending_rows += table.num_rows
                rows += table.num_rows
                nulls += null_captions
                flush(final=False)
            files.append({"path": str(path), "format": fmt, "rows": rows, "null_captions": nulls})
            total += rows
        flush(final=True)  # the next source starts a shard of its own
    index = InputIndex(total, samples_per_shard, shard_rows, tuple(files))
    layout.atomic_write_bytes(layout.input_index(out), json.dumps(index.to_json(), indent=1).encode())
    return index


def input_files(cfg: InputConfig | tuple[InputConfig, ...], config: StorageConfig | None = None) -> list[dict]:
    """Every input file with its format and rows, as the index lists them,
    read without writing anything: a resume compares them with the index
    before it touches the run (a parquet file's rows come from its footer)."""
    files = []
    for where, src in input_entries(cfg):
        for path in expand_paths(src.paths, where, config):
            fmt = detect_format(path, src.format, where)
            if fmt == "parquet":
                with storage.arrow_input(path) as f:
                    rows = pq.ParquetFile(f).metadata.num_rows
            else:
                rows = sum(b.num_rows for b in iter_batches(path, fmt, src.limits))
            files.append({"path": str(path), "format": fmt, "rows": rows})
    return files


def _write_input_shard(out, sid: int, table: pa.Table, width: int) -> None:
    n = table.num_rows
    ident = {
        "key": pa.array([f"{layout.shard_name(sid)}{i:0{width}d}" for i in range(n)], pa.string()),
        "shard_id": pa.array([sid] * n, pa.int64()),
        "status": pa.array([STATUS_OK] * n, pa.string()),
        "stage": pa.array([""] * n, pa.string()),
        "reason": pa.array([""] * n, pa.string()),
        "detail": pa.array([""] * n, pa.string()),
    }
    for name in table.column_names:  # the fate of a row the reader rejected replaces the four above, in place
        ident[name] = table.column(name)
    storage.write_parquet(layout.input_shard(out, sid), pa.table(ident))


def read_index(out_dir) -> InputIndex | None:
    try:
        return InputIndex.from_json(json.loads(layout.input_index(out_dir).read_text()))
    except FileNotFoundError:
        return None
