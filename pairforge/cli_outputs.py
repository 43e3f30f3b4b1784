"""The commands of ``pairforge`` that read (or, for ``purge``, rewrite) a
finished build: ``manifest show/verify/diff``, ``purge``, ``export coco``
and ``report``. They sit beside :mod:`pairforge.cli`, which wires them
into its parser, because each is a thin layer over ``manifests/``: the
command line that runs jobs and the one that inspects their outputs change
for different reasons."""

from __future__ import annotations

import json
import os
import sys


def run_location(args, location: str):
    """A run folder or object-storage URI (``s3://bucket/run``), with the
    storage options given on the command line (``--endpoint-url``, ``--region``)."""
    from pairforge.manifests import storage
    from pairforge.pipeline.config import ConfigError

    try:
        cfg = storage.StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
        return storage.path(location, cfg)
    except ValueError as e:
        raise ConfigError(f"{location}: {e}") from None


def cmd_show(args) -> int:
    from pairforge.manifests import storage
    from pairforge.manifests.manifest import read_manifest
    from pairforge.manifests.summary import summary_lines

    where = run_location(args, args.dir)
    man = read_manifest(where)
    if args.json:
        print(json.dumps(man, indent=1))
        return 0
    location = str(where) if storage.is_object(where) else os.path.abspath(args.dir)
    print("\n".join(summary_lines(man, location)))
    return 0


def cmd_verify(args) -> int:
    from pairforge.manifests.manifest import verify

    problems = verify(run_location(args, args.dir))
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        for p in problems[:50]:
            print(f"  - {p}", file=sys.stderr)
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more", file=sys.stderr)
        return 1
    print(f"OK: {args.dir} is whole (every file's checksum matches; every input row is in a shard or a reject)")
    return 0


def cmd_diff(args) -> int:
    from pairforge.manifests.diff import diff_runs, format_diff

    d = diff_runs(run_location(args, args.old), run_location(args, args.new))
    print(json.dumps(d, indent=1) if args.json else format_diff(d))
    return 1 if d["changed"] else 0


def cmd_purge(args) -> int:
    import tempfile

    from pairforge.manifests import storage
    from pairforge.manifests.purge import PurgeError, pending_plan, purge
    from pairforge.pipeline.config import ConfigError
    from pairforge.stages.common.blocklist import Blocklists, ListConfig, ListError

    where = run_location(args, args.dir)
    if not args.lists and pending_plan(where) is None:
        raise ConfigError("purge: --list: expected at least one list file")
    with tempfile.TemporaryDirectory(prefix="pairforge-purge-") as tmp:
        configs, origins = [], {}
        for i, loc in enumerate(args.lists):
            src = run_location(args, loc)
            local = str(src)
            if storage.is_object(src):  # a list on object storage is read once, here
                local = os.path.join(tmp, f"{i}-{src.name}")
                with open(local, "wb") as f:
                    f.write(src.read_bytes())
                origins[local] = loc
            try:
                name = ListConfig(path=src.name).list_name if local != str(src) else ""
                opts = {"kind": args.kind, "column": args.column, "reason": args.reason}
                configs.append(ListConfig(path=local, name=name, max_distance=args.max_distance, **opts))
            except ValueError as e:
                raise ConfigError(f"purge: {e}") from None
        try:
            result = purge(where, Blocklists(configs), dry_run=args.dry_run, workers=args.workers, origins=origins)
        except (ListError, PurgeError, ValueError) as e:
            for line in str(e).splitlines():
                print(f"pairforge: error: {line}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    for line in purge_lines(args.dir, result, args.dry_run):
        print(line)
    return 0


def purge_lines(where: str, result: dict, dry_run: bool) -> list[str]:
    def counts(e: dict) -> str:
        kinds = ", ".join(f"{k} {c.get('samples', 0)}+{c.get('rejects', 0)}" for k, c in e["by_kind"].items())
        tables = ", ".join(f"{t} {n}" for t, n in e["side_tables"].items()) or "none"
        return f"{e['samples']} samples and {e['rejects']} reject rows (by kind, samples+rejects: {kinds}); side-table rows: {tables}"

    lines = []
    if result.get("pending"):
        lines.append(
            f"an interrupted purge ({result['pending']}) is pending: a purge without --dry-run finishes it first"
        )
    if result["resumed"]:
        lines.append(f"finished the interrupted purge {result['resumed']['id']}: {counts(result['resumed'])}")
    plan = result["plan"]
    if plan is not None:
        for note in plan.get("notes", []):
            lines.append(f"note: {note}")
        if not plan["shards"]:
            lines.append(f"nothing to purge: no row of {where} matches the lists")
        elif dry_run:
            e = plan["summary"]
            lines.append(f"dry run: would remove {counts(e)} from {len(plan['shards'])} shard(s); nothing changed")
        else:
            e = result["purge"]
            lines.append(f"purged {counts(e)} in {len(e['shards'])} shard(s); the manifest records purge {e['id']}")
            if e["removed_files"]:
                lines.append(
                    f"removed views that quoted purged rows (regenerate them): {', '.join(e['removed_files'])}"
                )
    return lines


def cmd_export_coco(args) -> int:
    from pairforge.manifests.coco import export_coco
    from pairforge.manifests.regions import RegionsError

    try:
        done = export_coco(args.dir, args.out, args.captions)
    except RegionsError as e:
        print(f"pairforge: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {done['path']}: {done['images']} images, {done['annotations']} boxes in "
        f"{done['categories']} categories; {done['captions_path']}: {done['captions']} captions"
    )
    return 0


def cmd_report(args) -> int:
    from pairforge.manifests.report import ReportError, write_report

    try:
        done = write_report(args.dir, args.out, args.pairs)
    except ReportError as e:
        print(f"pairforge: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {done['path']}: {done['pairs']} pairs, {done['plots']} histograms, {done['reject_reasons']} reject "
        f"reasons, {done['regions']} images with regions, {done['confounders']} confounders"
    )
    return 0
