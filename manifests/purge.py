"""``pairforge purge OUT --list FILE ...``: remove what opt-out and takedown
lists name from a finished build.

A published dataset must be able to drop rows after the fact: LAION-5B was
withdrawn in 2023 and came back as Re-LAION-5B once the rows matching hash
lists from child-safety organisations were removed, and creators' opt-outs
arrive after a crawl. The lists are ``stages.common.blocklist``'s (URL,
prefix, domain, sha256 of the downloaded bytes, pHash); a row goes when its
``url``, ``sha256`` or pHash (``image_phash``, else ``phash``) matches.

It runs in two steps, so that an interruption never leaves a build that
``manifest verify`` cannot account for:

1. *plan* (reads only): every shard's samples and rejects are matched, and
   the side-table rows that link a purged sample (any of the table's link
   columns) are counted. The plan (keys, list names and lines: never the
   matched URLs) goes to ``OUT/_work/purge/plan.json``.
2. *apply*: each affected shard is rewritten (``manifests.purge_shard``:
   the purged samples leave the tar, the parquet, the embeddings and the
   arrays in step and become tombstones in the rejects; stats last), then
   the affected side-table files, the run's own copies of the rows under
   ``_work`` (the URL list's rows keep only their key and source; the fit
   files lose them), ``sizes.json``, and last the manifest, which records
   the purge under ``purges`` (lists with their sha256, counts per shard
   and kind, time). A later ``pairforge purge OUT`` finishes an interrupted
   plan before anything else (a shard whose stats name the purge is done).

Every file of an unaffected shard stays byte for byte as it was. Derived
views that quote captions or show images (``report/``, ``coco.json``,
``coco_captions.json``) are removed when present: regenerate them. What the
purge cannot undo: a duplicate cluster whose survivor is purged keeps its
duplicates among the rejects (their images were never stored); list their
sha256 or pHash to tombstone them too.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pairforge.manifests import layout, storage
from pairforge.manifests.manifest import PURGE_STAGE, _sha256_file, read_manifest, sum_columns, write_manifest
from pairforge.manifests.purge_record import DERIVED, record_purge, summarize
from pairforge.manifests.purge_shard import PurgeError, parquet_bytes, rewrite_shard
from pairforge.stages.common.blocklist import Blocklists

PHASH_COLUMNS = ("image_phash", "phash")
PLAN_FORMAT = "pairforge-purge-plan/1"
#: what a purged row keeps in ``_work/input`` (the reader's identity columns and its source)
INPUT_KEPT = ("key", "shard_id", "status", "stage", "reason", "detail", "source")

__all__ = ["PurgeError", "plan_purge", "apply_plan", "purge", "plan_path"]


def plan_path(out):
    return layout.work_dir(out) / "purge" / "plan.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _column(table: pa.Table, name: str):
    return table.column(name).combine_chunks() if name in table.column_names else None


def _scan(path, lists: Blocklists, part: str) -> dict:
    """key -> {source, reason, detail} of the rows of one parquet file that a
    list matches (the entry itself left out: it may be the URL)."""
    names = storage.read_schema(path).names
    ph = next((c for c in PHASH_COLUMNS if c in names), None)
    want = ["key", "url", "sha256", ph, "source", "stage"]
    t = storage.read_parquet(path, columns=[c for c in want if c in names and c])
    if part == "rejects" and "stage" in t.column_names:  # tombstones of an earlier purge hold nothing to match
        t = t.filter(pc.fill_null(pc.not_equal(t.column("stage"), PURGE_STAGE), True))
    if not t.num_rows:
        return {}
    sha, phash = _column(t, "sha256"), _column(t, ph) if ph else None
    matches = lists.match_rows(
        urls=_column(t, "url"),
        sha256s=sha.to_pylist() if sha is not None else None,
        phashes=phash.to_pylist() if phash is not None else None,
    )
    keys = t.column("key").to_pylist()
    src = t.column("source").to_pylist() if "source" in t.column_names else [None] * t.num_rows
    found = {}
    for i, m in enumerate(matches):
        if m is None:
            continue
        detail = {k: v for k, v in m.detail.items() if k != "entry"}
        found[keys[i]] = {"source": src[i], "reason": m.reason, "detail": detail}
    return found


def _scan_shard(out, shard: dict, lists: Blocklists) -> dict:
    sid = shard["shard_id"]
    return {
        "samples": _scan(layout.shard_parquet(out, sid), lists, "samples"),
        "rejects": _scan(layout.rejects_parquet(out, sid), lists, "rejects"),
    }


def _linked(table: pa.Table, links: list[str], gone: set[str]):
    """Per row: does any link column name a key in ``gone``."""
    hit = None
    for c in links:
        if c in table.column_names:
            h = pc.fill_null(pc.is_in(table.column(c), value_set=pa.array(sorted(gone), pa.string())), False)
            hit = h if hit is None else pc.or_(hit, h)
    return hit if hit is not None else pa.array([False] * table.num_rows, pa.bool_())


def _scan_side_tables(out, man: dict, gone: set[str], pool) -> dict:
    """table -> file -> rows that link a purged sample."""
    jobs = [(t, e["links"], f) for t, e in man.get("side_tables", {}).items() for f in e["files"]]
    if not gone or not jobs:
        return {}

    def one(job):
        t, links, f = job
        table = storage.read_parquet(out / f, columns=[c for c in links if c in storage.read_schema(out / f).names])
        return t, f, int(pc.sum(_linked(table, links, gone)).as_py() or 0)

    found: dict = {}
    for t, f, n in pool.map(one, jobs):
        if n:
            found.setdefault(t, {})[f] = n
    return found


def _notes(out, man: dict, lists: Blocklists) -> list[str]:
    """Entries no row can match because the build lacks their column."""
    if not man["shards"]:
        return []
    names = set(storage.read_schema(layout.shard_parquet(out, man["shards"][0]["shard_id"])).names)
    have = {"sha256": "sha256" in names, "phash": any(c in names for c in PHASH_COLUMNS)}
    notes = []
    for info in lists.lists:
        for kind, ok in have.items():
            if info["entries"].get(kind) and not ok:
                notes.append(f"list {info['name']}: {info['entries'][kind]} {kind} entries, but the build has no "
                             f"{kind if kind == 'sha256' else ' or '.join(PHASH_COLUMNS)} column to match them against")  # fmt: skip
    return notes


def plan_purge(out_dir, lists: Blocklists, workers: int = 8, origins: dict | None = None) -> dict:
    """What a purge with ``lists`` would remove from the build at ``out_dir``
    (reads only). ``origins``: local copy -> where a list came from (its record's path)."""
    out = storage.path(out_dir)
    man = read_manifest(out)
    lists.load()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        scanned = list(pool.map(lambda sh: _scan_shard(out, sh, lists), man["shards"]))
        shards = {sh["name"]: s for sh, s in zip(man["shards"], scanned) if s["samples"] or s["rejects"]}
        gone = {k for s in shards.values() for k in s["samples"]}
        side = _scan_side_tables(out, man, gone, pool)
    infos = [{**i, "path": (origins or {}).get(i["path"], i["path"])} for i in lists.lists]
    plan = {
        "format": PLAN_FORMAT,
        "id": f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        "created": _now(),
        "lists": infos,
        "notes": _notes(out, man, lists),
        "schema": [{"name": c["name"], "default": c.get("default")} for c in man.get("schema", [])],
        "shards": shards,
        "side_tables": side,
    }
    plan["summary"] = summarize(plan)
    return plan


def _apply_shard(out, shard: dict, plan: dict) -> tuple[dict, dict]:
    """Rewrite one shard, unless an interrupted run of this plan did (its stats name the purge)."""
    stats_path = layout.shard_stats(out, shard["shard_id"])
    stats = json.loads(stats_path.read_text())
    if any(p.get("id") == plan["id"] for p in stats.get("purges", [])):
        size, digest = _sha256_file(stats_path)
        return stats, {**stats["files"], str(stats_path.relative_to(out)): {"bytes": size, "sha256": digest}}
    defaults = {c["name"]: c.get("default") for c in plan.get("schema", [])}
    return rewrite_shard(
        out, shard, plan["shards"][shard["name"]], {"id": plan["id"], "time": plan["created"]}, defaults
    )


def _stats(out, shard: dict) -> dict:
    return json.loads(layout.shard_stats(out, shard["shard_id"]).read_text())


def _apply_side_table(out, man: dict, table: str, f: str, gone: set[str]) -> None:
    path = out / f
    t = storage.read_parquet(path)
    hit = _linked(t, man["side_tables"][table]["links"], gone)
    if pc.any(hit).as_py():  # nothing left to remove where an interrupted run already did
        layout.atomic_write_bytes(path, parquet_bytes(t.filter(pc.invert(hit))))


def _scrub_work(out, shard_id: int, keys: set[str]) -> None:
    """The run's own copies of purged rows: the URL list's row keeps its key
    and source (``_work/input`` still counts every input row), the fit files
    lose the row (they hold captions, hashes and embeddings)."""
    inp = layout.input_shard(out, shard_id)
    if inp.exists():
        t = storage.read_parquet(inp)
        hit = pc.is_in(t.column("key"), value_set=pa.array(sorted(keys), pa.string()))
        if pc.any(hit).as_py():
            cols = [
                c if f.name in INPUT_KEPT else pc.if_else(hit, pa.scalar(None, f.type), c)
                for f, c in zip(t.schema, t.columns)
            ]
            layout.atomic_write_bytes(inp, parquet_bytes(pa.Table.from_arrays(cols, schema=t.schema)))
    rows = layout.rows_dir(out, shard_id)
    for part in sorted(rows.glob("*.fit.parquet")) if rows.exists() else []:
        t = storage.read_parquet(part)
        hit = pc.is_in(t.column("key"), value_set=pa.array(sorted(keys), pa.string()))
        if pc.any(hit).as_py():
            storage.write_parquet(part, t.filter(pc.invert(hit)), compression="zstd")


def apply_plan(out_dir, plan: dict, workers: int = 8) -> dict:
    """Carry out ``plan`` (see the module doc); returns the manifest's new
    ``purges`` entry."""
    out = storage.path(out_dir)
    if plan.get("format") != PLAN_FORMAT:
        raise PurgeError(f"{plan_path(out)}: format {plan.get('format')!r} is not {PLAN_FORMAT!r}")
    man = read_manifest(out)
    recorded = [p for p in man.get("purges", []) if p.get("id") == plan["id"]]
    if recorded:  # interrupted after the manifest was written: only the plan is left to remove
        plan_path(out).unlink(missing_ok=True)
        return recorded[0]
    layout.atomic_write_bytes(plan_path(out), json.dumps(plan, indent=1).encode())
    by_name = {sh["name"]: sh for sh in man["shards"]}
    missing = sorted(set(plan["shards"]) - set(by_name))
    if missing:
        raise PurgeError(f"the purge plan names shards the manifest does not list: {missing[:5]}")
    gone = {k for s in plan["shards"].values() for k in s["samples"]}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        names = sorted(plan["shards"])
        done = dict(zip(names, pool.map(lambda n: _apply_shard(out, by_name[n], plan), names)))
        jobs = [(t, f) for t, files in plan["side_tables"].items() for f in files]
        list(pool.map(lambda j: _apply_side_table(out, man, j[0], j[1], gone), jobs))
        purged = {n: set(plan["shards"][n]["samples"]) | set(plan["shards"][n]["rejects"]) for n in names}
        list(pool.map(lambda n: _scrub_work(out, by_name[n]["shard_id"], purged[n]), names))
    sizes_path = layout.sizes_json(out)
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    for n, (stats, _) in done.items():
        sizes[f"{n}.tar"] = stats["successes"]
    layout.atomic_write_bytes(sizes_path, json.dumps(dict(sorted(sizes.items())), indent=1).encode())
    removed = _remove_derived(out)
    entry = record_purge(man, plan, done, removed, _now())
    if man.get("columns"):  # min and max do not subtract: the shards' summaries are added up again
        with ThreadPoolExecutor(max(1, workers)) as pool:
            every = list(
                pool.map(lambda sh: done[sh["name"]][0] if sh["name"] in done else _stats(out, sh), man["shards"])
            )
        man["columns"] = sum_columns(every)
    for t, files in plan["side_tables"].items():
        e = man["side_tables"][t]
        for f in files:
            size, digest = _sha256_file(out / f)
            e["files"][f] = {"bytes": size, "sha256": digest, "rows": storage.read_metadata(out / f).num_rows}
        e["rows"] = sum(x["rows"] for x in e["files"].values())
    write_manifest(out, man)
    plan_path(out).unlink(missing_ok=True)
    return entry


def _remove_derived(out) -> list[str]:
    """Views made from the shards that quote captions or show images."""
    removed = []
    for name in DERIVED:
        p = out / name
        if p.exists():
            if p.is_dir():
                storage.rmtree(p)
            else:
                p.unlink()
            removed.append(name)
    return removed


def pending_plan(out_dir) -> dict | None:
    """The plan of an interrupted purge, if one is waiting."""
    try:
        return json.loads(plan_path(storage.path(out_dir)).read_text())
    except FileNotFoundError:
        return None


def purge(
    out_dir, lists: Blocklists | None, dry_run: bool = False, workers: int = 8, origins: dict | None = None
) -> dict:
    """Finish an interrupted purge, then purge ``lists``. Returns
    ``{"resumed": entry | None, "pending": id | None (a dry run's), "plan": plan | None,
    "purge": entry | None}``. One purge at a time per build: nothing locks ``OUT``."""
    out = storage.path(out_dir)
    result: dict = {"resumed": None, "pending": None, "plan": None, "purge": None}
    pending = pending_plan(out)
    if pending is not None and dry_run:
        result["pending"] = pending["id"]  # a dry run changes nothing: it only says so
    elif pending is not None:
        result["resumed"] = apply_plan(out, pending, workers)
    if lists is None or not lists.configs:
        return result
    plan = plan_purge(out, lists, workers, origins)
    result["plan"] = plan
    if not dry_run and plan["shards"]:
        result["purge"] = apply_plan(out, plan, workers)
    return result
