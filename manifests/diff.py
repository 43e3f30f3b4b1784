"""What changed between two runs, from their manifests (``pairforge manifest diff OLD NEW``).

Compared: the row counts, rows in and out of every stage and the drops by
reason, the declared schema, the job's settings, the side tables, every
shard's files by checksum (shards added, removed, changed), and the purges
(``pairforge purge``) only the new run records. Not compared:
what differs between any two runs (timings, the Ray cluster, the output
folder, each shard's ``_stats.json``, which holds times); package versions
are listed but do not count as a change. Nothing but the two manifests is
read: run ``pairforge manifest verify`` first to know the files match them.

Stages are paired by name, never by position: a stage inserted into a job
is one line (``job stages.dedup_phash: absent -> stages[2]``), not a
changed setting for every stage after it.
"""

from __future__ import annotations

from pairforge.manifests.manifest import read_manifest

#: job settings that differ between any two runs of one job
JOB_NOISE = ("output.dir",)


def diff_runs(old_dir, new_dir) -> dict:
    return diff_manifests(read_manifest(old_dir), read_manifest(new_dir))


def diff_manifests(old: dict, new: dict) -> dict:
    """The differences as data; ``changed`` says whether there are any
    (versions aside)."""
    out = {
        "counts": _changed_values(old.get("counts", {}), new.get("counts", {})),
        "stages": _stage_diff(old.get("stages", []), new.get("stages", [])),
        "schema": _schema_diff(old.get("schema", []), new.get("schema", [])),
        "job": _job_diff(old.get("job", {}), new.get("job", {})),
        "side_tables": _side_table_diff(old.get("side_tables", {}), new.get("side_tables", {})),
        "shards": _shard_diff(old.get("shards", []), new.get("shards", [])),
        "versions": _changed_values(old.get("versions", {}), new.get("versions", {})),
        "purges": _purge_diff(old.get("purges", []), new.get("purges", [])),
    }
    sh = out["shards"]
    out["changed"] = bool(
        out["counts"]
        or out["stages"]
        or any(out["schema"].values())
        or out["job"]
        or out["side_tables"]
        or sh["added"]
        or sh["removed"]
        or sh["changed"]
        or out["purges"]
    )
    return out


def _purge_diff(old: list[dict], new: list[dict]) -> list[dict]:
    """Purges (``pairforge purge``) the new run records and the old one does not."""
    seen = {p.get("id") for p in old}
    return [
        {k: p.get(k) for k in ("id", "finished", "samples", "rejects", "by_list", "by_kind", "side_tables")}
        | {"lists": [{"name": x.get("name"), "sha256": x.get("sha256")} for x in p.get("lists", [])]}
        for p in new
        if p.get("id") not in seen
    ]


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested settings as dotted keys (``stages.2.threshold``)."""
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _job_diff(old: dict, new: dict) -> dict:
    """The job's settings that differ, its stages paired by name: a stage
    in one run only is one entry (``stages.NAME``: where it is, or
    ``absent``), a stage in both has an entry per changed option
    (``stages.NAME.OPTION``), and ``stages.order`` when the stages both
    runs have run in another order."""
    a, b = dict(old), dict(new)
    sa, sb = _named_stages(a.pop("stages", [])), _named_stages(b.pop("stages", []))
    out = _changed_values(_flat(a), _flat(b), skip=JOB_NOISE)
    for name in [*sb, *(n for n in sa if n not in sb)]:
        if name not in sa or name not in sb:
            out[f"stages.{name}"] = {
                "old": f"stages[{list(sa).index(name)}]" if name in sa else "absent",
                "new": f"stages[{list(sb).index(name)}]" if name in sb else "absent",
            }
            continue
        opts_a = {k: v for k, v in sa[name].items() if k != "name"}
        opts_b = {k: v for k, v in sb[name].items() if k != "name"}
        out.update(_changed_values(_flat(opts_a, f"stages.{name}."), _flat(opts_b, f"stages.{name}.")))
    order_a, order_b = [n for n in sa if n in sb], [n for n in sb if n in sa]
    if order_a != order_b:
        out["stages.order"] = {"old": order_a, "new": order_b}
    return out


def _named_stages(stages: list) -> dict[str, dict]:
    """A job's stages by name, in order (a name met again, possible in runs
    made before a stage could appear once only, gets ``#2``, ``#3``...)."""
    out: dict[str, dict] = {}
    for st in stages:
        name = str(st.get("name")) if isinstance(st, dict) else str(st)
        key, i = name, 1
        while key in out:
            i += 1
            key = f"{name}#{i}"
        out[key] = st if isinstance(st, dict) else {"name": name}
    return out


def _changed_values(old: dict, new: dict, skip=()) -> dict:
    return {
        k: {"old": old.get(k), "new": new.get(k)}
        for k in sorted(set(old) | set(new), key=str)
        if k not in skip and old.get(k) != new.get(k)
    }


def _stage_diff(old: list[dict], new: list[dict]) -> list[dict]:
    """Per stage (in the new run's order, then stages only the old run had):
    rows in, out and dropped by reason where they differ."""
    a = {s["name"]: s for s in old}
    b = {s["name"]: s for s in new}
    names = [s["name"] for s in new] + [s["name"] for s in old if s["name"] not in b]
    out = []
    for name in names:
        sa, sb = a.get(name), b.get(name)
        entry: dict = {"name": name}
        if sa is None or sb is None:
            entry["only_in"] = "new" if sa is None else "old"
        for k in ("in", "out"):
            va, vb = (sa or {}).get(k), (sb or {}).get(k)
            if va != vb:
                entry[k] = {"old": va, "new": vb}
        da, db = (sa or {}).get("dropped", {}), (sb or {}).get("dropped", {})
        dropped = {r: {"old": da.get(r, 0), "new": db.get(r, 0)} for r in sorted(set(da) | set(db))}
        dropped = {r: v for r, v in dropped.items() if v["old"] != v["new"]}
        if dropped:
            entry["dropped"] = dropped
        if len(entry) > 1:
            out.append(entry)
    return out


def _schema_diff(old: list[dict], new: list[dict]) -> dict:
    a = {c["name"]: c for c in old}
    b = {c["name"]: c for c in new}
    return {
        "added": [b[n] for n in b if n not in a],
        "removed": [a[n] for n in a if n not in b],
        "changed": [{"name": n, "old": a[n], "new": b[n]} for n in b if n in a and a[n] != b[n]],
    }


def _side_table_diff(old: dict, new: dict) -> dict:
    out = {}
    for name in sorted(set(old) | set(new)):
        ra, rb = (old.get(name) or {}).get("rows"), (new.get(name) or {}).get("rows")
        fa = {f: e.get("sha256") for f, e in (old.get(name) or {}).get("files", {}).items()}
        fb = {f: e.get("sha256") for f, e in (new.get(name) or {}).get("files", {}).items()}
        if ra != rb or fa != fb:
            out[name] = {
                "rows": {"old": ra, "new": rb},
                "files_changed": sorted(f for f in set(fa) | set(fb) if fa.get(f) != fb.get(f)),
            }
    return out


def _shard_files(shard: dict) -> dict[str, str]:
    """File -> sha256 of one shard, without its stats file (it holds times)."""
    return {f: e["sha256"] for f, e in shard.get("files", {}).items() if not f.endswith("_stats.json")}


def _shard_diff(old: list[dict], new: list[dict]) -> dict:
    a = {s["name"]: s for s in old}
    b = {s["name"]: s for s in new}
    changed = []
    same = 0
    for name in sorted(set(a) & set(b)):
        fa, fb = _shard_files(a[name]), _shard_files(b[name])
        if fa == fb:
            same += 1
            continue
        entry = {"name": name, "files": sorted(f for f in set(fa) | set(fb) if fa.get(f) != fb.get(f))}
        for k in ("samples", "rejects"):
            if a[name].get(k) != b[name].get(k):
                entry[k] = {"old": a[name].get(k), "new": b[name].get(k)}
        changed.append(entry)
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": changed,
        "unchanged": same,
    }


def format_diff(d: dict) -> str:
    """The differences for a terminal, one line per change."""
    if not d["changed"]:
        lines = ["no differences (rows, stages, schema, job, side tables, shard checksums)"]
    else:
        lines = []
        for k, v in d["counts"].items():
            lines.append(f"rows {k}: {v['old']} -> {v['new']}")
        for st in d["stages"]:
            where = f" (only in the {st['only_in']} run)" if "only_in" in st else ""
            parts = [f"{k} {st[k]['old']} -> {st[k]['new']}" for k in ("in", "out") if k in st]
            parts += [f"{r} {v['old']} -> {v['new']}" for r, v in st.get("dropped", {}).items()]
            lines.append(f"stage {st['name']}{where}: " + ", ".join(parts))
        for kind in ("added", "removed"):
            for c in d["schema"][kind]:
                lines.append(f"schema {kind}: {c['name']} ({c.get('kind')}, from {c.get('stage')})")
        for c in d["schema"]["changed"]:
            lines.append(f"schema changed: {c['name']}: {c['old']} -> {c['new']}")
        for k, v in d["job"].items():
            lines.append(f"job {k}: {v['old']!r} -> {v['new']!r}")
        for name, v in d["side_tables"].items():
            lines.append(
                f"side table {name}: rows {v['rows']['old']} -> {v['rows']['new']}, {len(v['files_changed'])} file(s) changed"
            )
        for p in d.get("purges", []):
            names = ", ".join(f"{x['name']} (sha256 {str(x['sha256'])[:12]}…)" for x in p["lists"])
            kinds = ", ".join(f"{k} {sum(c.values())}" for k, c in (p.get("by_kind") or {}).items())
            tables = "".join(f", {t} {n} side-table rows" for t, n in (p.get("side_tables") or {}).items())
            lines.append(
                f"purge {p['id']}: {p['samples']} samples and {p['rejects']} reject rows removed ({kinds}){tables}; "
                f"lists: {names}"
            )
        sh = d["shards"]
        if sh["added"]:
            lines.append(f"shards added: {', '.join(sh['added'])}")
        if sh["removed"]:
            lines.append(f"shards removed: {', '.join(sh['removed'])}")
        for c in sh["changed"]:
            extra = "".join(f", {k} {c[k]['old']} -> {c[k]['new']}" for k in ("samples", "rejects") if k in c)
            lines.append(f"shard {c['name']} changed: {', '.join(c['files'])}{extra}")
        lines.append(
            f"shards: {len(sh['added'])} added, {len(sh['removed'])} removed, {len(sh['changed'])} changed, "
            f"{sh['unchanged']} unchanged"
        )
    for k, v in d["versions"].items():
        lines.append(f"version {k}: {v['old']} -> {v['new']}")
    return "\n".join(lines)
