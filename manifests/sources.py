"""Rows per source: the manifest's ``sources`` entry.

A PMD-style job reads several sources (COCO, CC3M, RedCaps...) into one
dataset; what each one brought and what became of it is the first question
about such a build. Every row carries its ``source`` column from the reader
to its shard or reject row, so the counts are read from the files, not kept
alongside them: ``input`` from the reader's input shards
(``_work/input/S.parquet``), ``ok`` from ``shards/S.parquet`` and the rejects
by stage and reason from ``rejects/S.parquet``. A resumed run's counts are
therefore right whichever run wrote a shard, and ``verify`` recounts them
from the shards and rejects alone (``_work`` is not part of the dataset).
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from pairforge.manifests import layout, storage


def _by_source(path, columns: tuple[str, ...] = ()) -> Counter:
    """Rows of a parquet file per ``(source, *columns)`` value, in the order
    they first appear (a file without a ``source`` column counts as ``""``)."""
    names = set(storage.read_schema(path).names)
    table = storage.read_parquet(path, columns=[c for c in ("source", *columns) if c in names])
    if not table.num_rows:
        return Counter()
    if not columns:
        if "source" not in names:
            return Counter({"": table.num_rows})
        vc = pc.value_counts(table.column("source")).to_pylist()
        return Counter({("" if d["values"] is None else d["values"]): d["counts"] for d in vc})
    cols = [table.column(c).to_pylist() if c in names else [""] * table.num_rows for c in ("source", *columns)]
    return Counter(zip(*cols))


def count_sources(out_dir, shard_ids: list[int], with_input: bool = True) -> dict[str, dict]:
    """Per source, in input order: ``input`` (rows the reader gave it),
    ``ok``, ``rejected`` and ``rejects_by_stage`` (stage -> reason -> rows).
    Without ``with_input`` (or when an input shard is gone), ``input`` is
    ``ok + rejected``."""
    out = storage.path(out_dir)
    seen: dict[str, dict] = {}

    def entry(name) -> dict:
        return seen.setdefault(str(name), {"input": 0, "ok": 0, "rejected": 0, "rejects_by_stage": {}})

    read_input = False
    for sid in sorted(shard_ids):
        inp = layout.input_shard(out, sid)
        if with_input and inp.exists():
            read_input = True
            for name, n in _by_source(inp).items():
                entry(name)["input"] += n
        par, rej = layout.shard_parquet(out, sid), layout.rejects_parquet(out, sid)
        for name, n in (_by_source(par) if par.exists() else {}).items():
            entry(name)["ok"] += n
        for (name, stage, reason), n in (_by_source(rej, ("stage", "reason")) if rej.exists() else {}).items():
            e = entry(name)
            e["rejected"] += n
            by = e["rejects_by_stage"].setdefault(str(stage), {})
            by[str(reason)] = by.get(str(reason), 0) + n
    for e in seen.values():
        if not read_input:
            e["input"] = e["ok"] + e["rejected"]
        e["rejects_by_stage"] = {s: dict(sorted(r.items())) for s, r in sorted(e["rejects_by_stage"].items())}
    return seen


def verify_sources(out_dir, manifest: dict) -> list[str]:
    """The manifest's ``sources`` against the shards and rejects: each
    source's ``input`` is its ``ok + rejected``, they add up to the input's
    rows, and the files hold what it says. A manifest without the entry
    (written before it existed) has nothing to check."""
    listed = manifest.get("sources")
    if listed is None:
        return []
    problems = []
    for name, e in listed.items():
        if e["input"] != e["ok"] + e["rejected"]:
            problems.append(f"sources.{name}: input {e['input']} != ok {e['ok']} + rejected {e['rejected']}")
    total = sum(e["input"] for e in listed.values())
    if total != manifest["input"]["total_rows"]:
        problems.append(f"sources: inputs add up to {total}, the input had {manifest['input']['total_rows']} rows")
    try:
        found = count_sources(out_dir, [sh["shard_id"] for sh in manifest["shards"]], with_input=False)
    except (OSError, pa.ArrowException) as e:  # a damaged file: its checksum line says which
        return [*problems, f"sources: cannot recount the shards and rejects: {type(e).__name__}: {e}"]
    for name in sorted(set(listed) | set(found)):
        want, have = listed.get(name), found.get(name)
        if want is None or have is None:
            problems.append(f"sources.{name}: {'not in the manifest' if want is None else 'no row in the files'}")
            continue
        for k in ("ok", "rejected", "rejects_by_stage"):
            if want[k] != have[k]:
                problems.append(f"sources.{name}.{k}: manifest says {want[k]}, the shards and rejects hold {have[k]}")
    return problems
