"""The run manifest: what a run was asked to do, with what, and what it wrote.

``build_manifest`` assembles it from the shards' stats files; ``verify``
re-reads every file it lists and checks the accounting: every input row is in
exactly one shard or one reject file, and every key a side table links to
is a sample in the shards. ``schema`` lists each stage's declared columns
(kind, dtype, shape; see ``stages.base.Column``) so a reader knows what a
parquet column holds without guessing from its name. ``sources`` counts the
rows of each source (``manifests.sources``).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from importlib import metadata
from pathlib import Path, PurePosixPath

import pyarrow as pa

from pairforge.manifests import layout, storage
from pairforge.manifests.redact import redact
from pairforge.manifests.sources import count_sources, verify_sources
from pairforge.stages.base import READ_STAGE

FORMAT = "pairforge-manifest/2"
#: the stage ``pairforge purge`` (``manifests.purge``) names on the rows it removes after a run
PURGE_STAGE = "purge"
KEY_PACKAGES = (
    "pairforge", "ray", "torch", "torchvision", "open_clip_torch", "img2dataset",
    "webdataset", "pyarrow", "numpy", "pillow", "imagehash",
)  # fmt: skip


def versions() -> dict[str, str | None]:
    import platform

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def stage_counters(stage_names: list[str], total: int, shard_stats: list[dict]) -> list[dict]:
    """Per stage: rows in, rows out, rows dropped by reason, seconds of work.
    A row rejected by a stage is counted there and by no later stage."""
    dropped: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for st in shard_stats:
        for stage, reasons in st["rejects_by_stage"].items():
            for reason, n in reasons.items():
                dropped.setdefault(stage, {}).setdefault(reason, 0)
                dropped[stage][reason] += n
        for stage, s in st.get("stage_seconds", {}).items():
            seconds[stage] = seconds.get(stage, 0.0) + s
    out, alive = [], total
    purged = [PURGE_STAGE] if PURGE_STAGE in dropped and PURGE_STAGE not in stage_names else []
    first = [READ_STAGE] if READ_STAGE in dropped and READ_STAGE not in stage_names else []  # rows the reader rejected
    for name in [*first, *stage_names, *purged]:  # a purged build resumed: the purge comes after every stage
        d = dict(sorted(dropped.pop(name, {}).items()))
        n_drop = sum(d.values())
        out.append(
            {
                "name": name,
                "in": alive,
                "out": alive - n_drop,
                "dropped": d,
                "seconds": round(seconds.get(name, 0.0), 3),
            }
        )
        alive -= n_drop
    if dropped:  # a reject from a stage not in the list would break the accounting
        out.append(
            {
                "name": "unknown",
                "in": alive,
                "out": alive - sum(sum(d.values()) for d in dropped.values()),
                "dropped": dropped,
            }
        )
    return out


def _sha256_file(path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def side_table_entries(out_dir, side_tables: dict[str, tuple[str, ...]]) -> dict:
    """Per side table: its link columns, rows and files with checksums."""
    out = storage.path(out_dir)
    entries = {}
    for name, links in sorted(side_tables.items()):
        files, rows = {}, 0
        for path in sorted(layout.side_table_dir(out, name).glob("*.parquet")):
            size, digest = _sha256_file(path)
            n = storage.read_metadata(path).num_rows
            files[str(path.relative_to(out))] = {"bytes": size, "sha256": digest, "rows": n}
            rows += n
        entries[name] = {"links": list(links), "rows": rows, "files": files}
    return entries


def _survivors_lost(shard_stats: list[dict]) -> dict:
    """Per dedup stage and later stage: survivors that the later stage
    dropped, and the duplicates that named them (gone with them)."""
    lost: dict[str, dict[str, dict[str, int]]] = {}
    for st in shard_stats:
        for g, by in st.get("survivors_dropped_later", {}).items():
            for later, c in by.items():
                tot = lost.setdefault(g, {}).setdefault(later, {"survivors": 0, "duplicates": 0})
                tot["survivors"] += c["survivors"]
                tot["duplicates"] += c["duplicates"]
    return lost


def sum_columns(shard_stats: list[dict]) -> dict[str, dict]:
    """The shards' column summaries (``manifests.shards.column_summaries``)
    as one per column, with the mean of the rows that have a value."""
    out: dict[str, dict] = {}
    for st in shard_stats:
        for name, s in (st.get("columns") or {}).items():
            tot = out.setdefault(name, {"rows": 0, "sum": 0.0, "positive": 0})
            tot["rows"] += s["rows"]
            tot["sum"] += s["sum"]
            tot["positive"] += s["positive"]
            for k, pick in (("min", min), ("max", max)):
                if k in s:
                    tot[k] = pick(tot[k], s[k]) if k in tot else s[k]
    for tot in out.values():
        tot["mean"] = tot["sum"] / tot["rows"] if tot["rows"] else None
    return dict(sorted(out.items()))


def build_manifest(
    out_dir,
    job: dict,
    index: dict,
    stage_names: list[str],
    shard_stats: list[dict],
    ray_info: dict,
    timing: dict,
    schema: list[dict] | None = None,
    fits: list[dict] | None = None,
    side_tables: dict | None = None,
) -> dict:
    out = storage.path(out_dir)
    shard_stats = sorted(shard_stats, key=lambda s: s["shard_id"])
    shards = []
    for st in shard_stats:
        files = dict(st["files"])
        stats_path = layout.shard_stats(out, st["shard_id"])
        size, digest = _sha256_file(stats_path)
        files[str(stats_path.relative_to(out))] = {"bytes": size, "sha256": digest}
        shards.append(
            {
                "name": st["shard"],
                "shard_id": st["shard_id"],
                "samples": st["successes"],
                "rejects": st["rejected"],
                "files": files,
            }
        )
    ok = sum(s["successes"] for s in shard_stats)
    stages = stage_counters(stage_names, index["total_rows"], shard_stats)
    lost = _survivors_lost(shard_stats)
    for st in stages:
        if st["name"] in lost:  # duplicates whose survivor a later stage dropped
            st["survivors_dropped_later"] = lost[st["name"]]
    purges = _recorded_purges(out)
    return {
        "format": FORMAT,
        "job": redact(job),  # a URL's credentials never reach the manifest (manifests.redact)
        "versions": versions(),
        "ray": ray_info,
        "input": redact(index),
        "counts": {"input": index["total_rows"], "ok": ok, "rejected": sum(s["rejected"] for s in shard_stats)},
        "stages": stages,
        "columns": sum_columns(shard_stats),
        "sources": count_sources(out, [s["shard_id"] for s in shard_stats]),
        "schema": schema or [],
        "fits": fits or [],
        "side_tables": side_table_entries(out, side_tables or {}),
        "shards": shards,
        "timing": timing,
        **({"purges": purges} if purges else {}),
    }


def _recorded_purges(out) -> list[dict]:
    """The purges an earlier manifest of this folder records (a purged build
    resumed keeps them: its shards are the purged ones)."""
    try:
        return json.loads(layout.manifest_json(out).read_text()).get("purges", [])
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def write_sizes(out_dir, shard_stats: list[dict]) -> dict:
    sizes = {f"{s['shard']}.tar": s["successes"] for s in sorted(shard_stats, key=lambda s: s["shard_id"])}
    layout.atomic_write_bytes(layout.sizes_json(out_dir), json.dumps(sizes, indent=1).encode())
    return sizes


def write_manifest(out_dir, manifest: dict) -> Path:
    path = layout.manifest_json(out_dir)
    layout.atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=False, default=str).encode())
    return path


def read_manifest(out_dir) -> dict:
    path = layout.manifest_json(out_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest at {path}: is {out_dir} the output folder of a finished run?") from None


#: a shard tar is read front to back in pieces of this size: on object storage
#: every read is a request, and a seek from one member's header to the next
#: made a request of each member (2,000 for the demo's 4 tars: 16 s against
#: a local S3 server; a shard of 10,000 samples would take tens of thousands)
TAR_READ = 8 << 20


def _tar_keys(path) -> list[str]:
    """The sample keys of a shard tar: its ``.json`` members' names."""
    keys = []
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r|*", bufsize=TAR_READ) as tar:
        for m in tar:
            if m.name.endswith(".json"):
                keys.append(m.name[: -len(".json")])
    return keys


def verify(out_dir) -> list[str]:
    """Every problem found, as a sentence; an empty list means the run is whole."""
    out = storage.path(out_dir)
    try:
        man = read_manifest(out)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        return [str(e)]
    problems: list[str] = []
    try:
        sizes = json.loads(layout.sizes_json(out).read_text())
    except FileNotFoundError:
        sizes, _ = {}, problems.append("shards/sizes.json is missing")
    seen: set[str] = set()
    shard_keys: list[str] = []
    total = 0
    for sh in man["shards"]:
        for name, want in sh["files"].items():
            if not _inside(name):
                problems.append(f"{name!r}: not a path inside the run (a manifest names files under OUT only)")
                continue
            path = out / name
            if not path.exists():
                problems.append(f"{name}: missing")
                continue
            size, digest = _sha256_file(path)
            if (size, digest) != (want["bytes"], want["sha256"]):
                problems.append(
                    f"{name}: checksum mismatch (manifest {want['sha256'][:12]}…, {want['bytes']} B; file {digest[:12]}…, {size} B)"
                )
        sid = sh["shard_id"]
        tar, par, rej = layout.shard_tar(out, sid), layout.shard_parquet(out, sid), layout.rejects_parquet(out, sid)
        if not (tar.exists() and par.exists() and rej.exists()):
            continue
        try:  # a cut or garbage file is a problem to report, not a reason to stop looking
            tar_keys = _tar_keys(tar)
            par_keys = storage.read_parquet(par, columns=["key"]).column("key").to_pylist()
            rej_keys = storage.read_parquet(rej, columns=["key"]).column("key").to_pylist()
        except (tarfile.TarError, pa.ArrowException, OSError, KeyError) as e:
            problems.append(f"shard {sh['name']}: its files cannot be read ({type(e).__name__}: {e})")
            continue
        if sorted(tar_keys) != sorted(par_keys):
            problems.append(
                f"shard {sh['name']}: tar and parquet hold different keys ({len(tar_keys)} vs {len(par_keys)})"
            )
        if len(par_keys) != sh["samples"] or sizes.get(f"{sh['name']}.tar") != sh["samples"]:
            problems.append(
                f"shard {sh['name']}: {len(par_keys)} parquet rows, manifest says {sh['samples']}, sizes.json says {sizes.get(sh['name'] + '.tar')}"
            )
        if len(rej_keys) != sh["rejects"]:
            problems.append(f"shard {sh['name']}: {len(rej_keys)} reject rows, manifest says {sh['rejects']}")
        shard_keys.extend(par_keys)
        for k in par_keys + rej_keys:
            if k in seen:
                problems.append(f"key {k} appears more than once")
            seen.add(k)
        total += len(par_keys) + len(rej_keys)
    want_rows = man["input"]["total_rows"]
    if total != want_rows:
        problems.append(f"input had {want_rows} rows but shards + rejects hold {total}")
    problems += _verify_side_tables(out, man.get("side_tables", {}), set(shard_keys))
    problems += verify_sources(out, man)
    for tmp in layout.temp_files(out):
        problems.append(f"{tmp.relative_to(out)}: a temporary file left by an interrupted write")
    return problems


def _inside(name) -> bool:
    """A file name a manifest may list: relative, under ``OUT``, no ``..``
    (``verify`` reads what a manifest names; a manifest is data)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and ":" not in parts[0]


def _verify_side_tables(out, tables: dict, shard_keys: set[str]) -> list[str]:
    """Checksums of every side-table file, and every key they link to is a
    sample in the shards (not a reject, not missing)."""
    problems = []
    for name, entry in tables.items():
        try:
            folder = layout.side_table_dir(out, name)
        except ValueError as e:
            problems.append(f"side_tables: {e}")
            continue
        listed = set(entry["files"])
        on_disk = {str(p.relative_to(out)) for p in folder.glob("*.parquet")}
        for extra in sorted(on_disk - listed):
            problems.append(f"{extra}: side-table file not in the manifest")
        for fname, want in sorted(entry["files"].items()):
            if not _inside(fname):
                problems.append(f"{fname!r}: not a path inside the run (a manifest names files under OUT only)")
                continue
            path = out / fname
            if not path.exists():
                problems.append(f"{fname}: missing")
                continue
            size, digest = _sha256_file(path)
            if (size, digest) != (want["bytes"], want["sha256"]):
                problems.append(f"{fname}: checksum mismatch")
                continue
            table = storage.read_parquet(path, columns=entry["links"])
            for col in entry["links"]:
                bad = [k for k in table.column(col).to_pylist() if k is not None and k not in shard_keys]
                if bad:
                    problems.append(
                        f"{fname}: {len(bad)} {col} value(s) not among the shard samples (first: {bad[0]!r})"
                    )
    return problems
