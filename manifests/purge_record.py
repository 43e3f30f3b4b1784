"""What a purge changes in ``manifest.json`` (``manifests.purge``).

The manifest is updated, not rebuilt: rebuilding would read every shard's
stats and every reject file of a build whose shards are, but for a few,
untouched. The counts follow from the purge's plan: a purged sample leaves
``ok`` for ``rejected`` (the ``purge`` stage's drops); a purged reject row
keeps its stage and reason, so no counter moves; ``manifest verify``
recounts all of it from the files afterwards. The purge itself is recorded under ``purges``:
the lists (name, sha256 of the file, entries per kind, reason), what was
removed per list, per kind and per shard, the side-table rows, the derived
files removed, and when.
"""

from __future__ import annotations

from collections import Counter

from pairforge.manifests.manifest import PURGE_STAGE

#: views made from the shards that quote captions or show images, removed by a purge
DERIVED = ("report", "coco.json", "coco_captions.json")


def _source(e: dict) -> str:
    return "" if e.get("source") is None else str(e["source"])


def _bump(d: dict, key: str, n: int) -> None:
    d[key] = d.get(key, 0) + n
    if d[key] == 0:
        del d[key]


def _rechain(stages: list[dict], total: int) -> None:
    """Rows in and out of each stage from the drops (a row dropped by a stage
    is counted there and by no later one)."""
    alive = total
    for st in stages:
        st["in"] = alive
        alive -= sum(st.get("dropped", {}).values())
        st["out"] = alive


def _moves(plan: dict):
    """(shard, part, key, entry) of every purged row."""
    for name, s in sorted(plan["shards"].items()):
        for part in ("samples", "rejects"):
            for key, e in sorted(s[part].items()):
                yield name, part, key, e


def _update_counts(man: dict, plan: dict) -> None:
    stages = man.setdefault("stages", [])
    by_name = {st["name"]: st for st in stages}
    if PURGE_STAGE not in by_name:
        by_name[PURGE_STAGE] = {"name": PURGE_STAGE, "in": 0, "out": 0, "dropped": {}, "seconds": 0.0}
        stages.append(by_name[PURGE_STAGE])
    purge_stage = by_name[PURGE_STAGE]
    sources = man.get("sources")
    for _, part, _, e in _moves(plan):
        if part != "samples":  # a purged reject row keeps its stage and reason: nothing moves
            continue
        _bump(purge_stage["dropped"], e["reason"], 1)
        if sources is not None:
            src = sources.setdefault(_source(e), {"input": 0, "ok": 0, "rejected": 0, "rejects_by_stage": {}})
            src["ok"] -= 1
            src["rejected"] += 1
            _bump(src["rejects_by_stage"].setdefault(PURGE_STAGE, {}), e["reason"], 1)
    purge_stage["dropped"] = dict(sorted(purge_stage["dropped"].items()))
    _rechain(stages, man["input"]["total_rows"])
    if sources is not None:
        for s in sources.values():
            s["rejects_by_stage"] = {k: dict(sorted(v.items())) for k, v in sorted(s["rejects_by_stage"].items())}


def record_purge(
    man: dict, plan: dict, shards: dict[str, tuple[dict, dict]], removed: list[str], finished: str
) -> dict:
    """Update ``man`` in place for the applied ``plan``: ``shards`` maps each
    rewritten shard to its new stats and file entries. Returns the
    ``purges`` entry it appended."""
    for sh in man["shards"]:
        if sh["name"] in shards:
            stats, files = shards[sh["name"]]
            sh["samples"], sh["rejects"] = stats["successes"], stats["rejected"]
            sh["files"] = dict(sorted(files.items()))
    man["counts"]["ok"] = sum(sh["samples"] for sh in man["shards"])
    man["counts"]["rejected"] = sum(sh["rejects"] for sh in man["shards"])
    _update_counts(man, plan)
    entry = {
        "id": plan["id"],
        "started": plan["created"],
        "finished": finished,
        "lists": [
            {
                k: info.get(k)
                for k in ("name", "path", "sha256", "bytes", "kind", "column", "reason", "max_distance", "entries")
            }
            for info in plan["lists"]
        ],
        **summarize(plan),
        "removed_files": removed,
    }
    man.setdefault("purges", []).append(entry)
    return entry


def summarize(plan: dict) -> dict:
    """What ``plan`` removes: rows per list, per kind and per shard (samples
    and reject rows), and side-table rows per table."""
    by_list: dict = {}
    by_kind: dict = {}
    per_shard: dict = {}
    for name, part, _, e in _moves(plan):
        d = e["detail"]
        for tally in (by_list.setdefault(d["list"], Counter()), by_kind.setdefault(d["kind"], Counter())):
            tally[part] += 1
        per_shard.setdefault(name, {"samples": Counter(), "rejects": Counter()})[part][d["kind"]] += 1
    return {
        "samples": sum(len(s["samples"]) for s in plan["shards"].values()),
        "rejects": sum(len(s["rejects"]) for s in plan["shards"].values()),
        "by_list": {n: dict(c) for n, c in sorted(by_list.items())},
        "by_kind": {n: dict(c) for n, c in sorted(by_kind.items())},
        "shards": {n: {p: dict(sorted(c.items())) for p, c in v.items()} for n, v in sorted(per_shard.items())},
        "side_tables": {t: sum(files.values()) for t, files in sorted(plan["side_tables"].items())},
    }
