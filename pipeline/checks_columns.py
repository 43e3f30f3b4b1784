"""The columns of a job's rows, for the whole-job check (:mod:`pipeline.checks`).

Why on its own: a stage that reads a column nobody makes used to fail deep
in Ray (``dedup_semantic`` without ``clip_score`` ended as
``KeyError: 'img_emb'``). Here the columns every row has after the reader
are read from the URL lists' schemas (a footer or a first block, never the
rows), and each stage's ``inputs()`` are held against those columns and the
``outputs()`` of the stages before it, so the error names the stage, the
column and the stage that would make it.
"""

from __future__ import annotations

import functools

from pairforge.manifests import storage
from pairforge.pipeline.config import ConfigError, JobConfig, input_entries
from pairforge.pipeline.inputlimits import InputError, InputLimits, check_column_count
from pairforge.stages.base import IDENTITY_COLUMNS, Stage

#: input files whose columns are read here; the reader checks the others as it streams them
MAX_SCHEMA_FILES = 200


def input_columns(job: JobConfig, problems: list[str]) -> set[str] | None:
    """The columns every row has after the reader (``url``, ``caption``,
    ``source``, the identity columns and the URL lists' own, renamed as the
    reader renames them), from the files' schemas, common to every source;
    ``None`` when the input itself is wrong (then that is the problem reported)."""
    from pairforge.pipeline.reader import carried_names, detect_format, expand_paths, renamed_names

    common: set[str] | None = None
    for where, cfg in input_entries(job.input):
        try:
            paths = expand_paths(cfg.paths, where, job.storage)
        except ConfigError as e:
            problems.append(str(e))
            return None
        for path in paths[:MAX_SCHEMA_FILES]:
            try:
                fmt = detect_format(path, cfg.format, where)
                names = renamed_names(_schema_names(path, fmt, cfg.limits), cfg, path, where)
                carried = carried_names(names, cfg, path)
            except (ConfigError, InputError) as e:
                problems.append(str(e))
                return None
            except Exception as e:  # noqa: BLE001 - an unreadable file is a job error
                problems.append(f"{where}.paths: cannot read {str(path)!r} as {cfg.format}: {type(e).__name__}: {e}")
                return None
            for role, col in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col)):
                if col not in names:
                    problems.append(
                        f"{where}.{role}: {col!r} is not a column of {str(path)!r} (columns: {', '.join(names)})"
                    )
            cols = {"url", "caption", "source", *IDENTITY_COLUMNS, *carried.values()}
            common = cols if common is None else common & cols
    return common


def _schema_names(path, fmt: str, limits: InputLimits) -> list[str]:
    """Column names from a file's footer or first block, not its rows,
    within the source's ``limits`` (a JSON line is checked before pyarrow
    parses it: ``pipeline.reader_json``)."""
    import pyarrow.csv as pacsv

    from pairforge.pipeline.reader_json import jsonl_head_names

    if fmt == "parquet":
        names = storage.read_schema(path).names
        check_column_count(names, limits, path)
        return names
    if fmt == "coco":  # one JSON object: its rows' columns are the reader's; the reader checks the rest
        from pairforge.pipeline.reader import COCO_COLUMNS

        with path.open("rb") as f:
            if f.read(4096).lstrip()[:1] != b"{":
                raise ValueError("not COCO captions JSON (an object with 'images' and 'annotations')")
        return list(COCO_COLUMNS)
    if fmt in ("csv", "tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
        with storage.arrow_input(path) as src, pacsv.open_csv(src, parse_options=opts) as reader:
            names = reader.schema.names
        check_column_count(names, limits, path)
        return names
    return jsonl_head_names(path, limits)


def check_columns(stages: list[tuple[str, Stage | None]], available: set[str]) -> list[str]:
    """Every column a stage reads must be in the URL list or declared by an
    earlier stage (the stages' ``inputs()`` against their ``outputs()``).
    ``None`` for a stage that could not be built: what it would declare is
    unknown, so the stages after it are not judged."""
    have = set(available)
    problems = []
    declared, reads = [], {}
    for where, st in stages:
        if st is None:
            break
        try:  # a stage of one's own may fail here; say which
            declared.append((where, st, {c.name for c in st.outputs()}))
            reads[where] = tuple(dict.fromkeys(st.inputs()))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{where}: its declared columns cannot be read: {type(e).__name__}: {e}")
            break
    for i, (where, st, own) in enumerate(declared):
        if where not in reads:
            break
        for col in reads[where]:
            if col in have or col in own:
                continue
            later = [st2.name for _, st2, cols in declared[i + 1 :] if col in cols]
            if later:
                hint = f"{later[0]} declares it but runs after {st.name}: put {st.name} after {later[0]}"
            else:
                maker = producers().get(col)
                hint = f"add a {maker!r} stage before it" if maker else "no stage declares it; add it to the URL list"
            problems.append(
                f"{where}: reads column {col!r}, which neither the URL list nor an earlier stage provides ({hint})"
            )
        have |= own
    return problems


@functools.lru_cache(maxsize=1)
def producers() -> dict[str, str]:
    """Column -> the built-in stage that declares it (each stage's
    :meth:`~stages.base.Stage.column_names`; the first in ``STAGES`` order
    where two do)."""
    from pairforge.stages import STAGES, stage_class

    out: dict[str, str] = {}
    for name in STAGES:
        for col in stage_class(name).column_names():
            out.setdefault(col, name)
    return out
