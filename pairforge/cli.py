"""The ``pairforge`` command line: the application layer over every folder
(``pipeline`` runs jobs, ``manifests`` reads runs, ``trainer`` trains), so
it lives here, above them, and none of them imports it.

pairforge run JOB.yaml [--address ADDR] [--resume | --clean-work] [--verbose] [--progress-every S]
pairforge demo [--out DIR] [--runner ray|local] [--verbose]
pairforge manifest show DIR [--endpoint-url URL] [--region R]
pairforge manifest verify DIR [--endpoint-url URL] [--region R]
pairforge manifest diff OLD NEW [--json] [--endpoint-url URL] [--region R]
pairforge purge DIR --list FILE [--list FILE ...] [--reason R] [--kind K] [--column C] [--max-distance N] [--dry-run]
pairforge export coco DIR [--out FILE] [--captions FILE]
pairforge report DIR [--out DIR] [--pairs N]
pairforge stages [NAME]
pairforge train OUT_DIR_OR_SHARDS --out DIR [...]
pairforge eval SET [--pretrained CKPT] [...]
pairforge eval-index SET --out DIR [--clip-pretrained W]
"""

from __future__ import annotations

import argparse
import os
import sys

from pairforge import cli_outputs as outputs

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home on import


class Interrupted(Exception):
    """A run stopped by Ctrl-C (SIGINT): its message says what is on disk
    and how to go on; the exit status is 130."""


def _leave_interrupted(message: str) -> None:
    """Say why, leave Ray, and end the process with 130 at once, without
    the interpreter's teardown.

    Why not return: an interrupt can land anywhere in Ray Data's driver
    code, and what it leaves half-made is torn down at interpreter exit,
    after Ray is shut down. Then the streaming executor's ``__del__`` prints
    tracebacks (a ``WaitBlockPrefetcher`` interrupted before it had its
    ``_condition``), a stats call starts a new local Ray, and finalisation
    beside Ray's native threads has ended in SIGSEGV or SIGINT instead of
    130 (``tests/pipeline/test_resume.py`` interrupts the command at several
    moments). Every file of a run is written under a temporary name and
    renamed, so nothing of the run's needs that teardown."""
    from pairforge.pipeline.outcome import EXIT_INTERRUPTED
    from pairforge.pipeline.raystart import shutdown

    try:
        print(message, file=sys.stderr)
        shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C while leaving: leave all the same
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed pipe: nothing more to say
                pass
        os._exit(EXIT_INTERRUPTED)


def _cmd_run(args) -> int:
    from pairforge.pipeline import outcome
    from pairforge.pipeline.config import load_job
    from pairforge.pipeline.job import run_job

    job = load_job(args.job)
    try:
        manifest = run_job(
            job,
            address=args.address,
            resume=args.resume,
            clean_work=args.clean_work,
            verbose=args.verbose,
            progress_every=args.progress_every,
        )
    except KeyboardInterrupt:
        from pairforge import cli_signals

        cli_signals.leaving()  # the interrupt is in hand: not delivered again
        from pairforge.pipeline.job import run_state

        # every file is written under a temporary name and renamed, so what is there is whole
        raise Interrupted(
            f"pairforge: interrupted; {run_state(job.output.dir, job.storage)}. Nothing is half-written; "
            f"finish with: pairforge run {args.job} --resume"
        ) from None
    return outcome.exit_code(manifest)  # non-zero when no row reached a shard


def _cmd_demo(args) -> int:
    from pairforge.demo import run_demo
    from pairforge.pipeline import outcome

    try:
        manifest = run_demo(
            out_dir=args.out,
            runner=args.runner,
            resume=args.resume,
            verbose=args.verbose,
            progress_every=args.progress_every,
        )
    except KeyboardInterrupt:
        from pairforge import cli_signals

        cli_signals.leaving()  # the interrupt is in hand: not delivered again
        # no --resume advice: the demo serves its corpus on a new port each time, which a resumed run's URLs miss
        raise Interrupted("pairforge: interrupted; start again with: pairforge demo --out NEW_DIR") from None
    return outcome.exit_code(manifest)  # as `pairforge run`: non-zero when no row reached a shard


def _cmd_stages(args) -> int:
    from pairforge.pipeline import reference
    from pairforge.stages import STAGES
    from pairforge.stages.options import ConfigError

    if args.name is None:
        print(reference.stages_text())
        return 0
    if args.name not in STAGES:
        raise ConfigError(f"unknown stage {args.name!r}; known stages: {', '.join(STAGES)}")
    print(reference.stage_text(args.name))
    return 0


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="an S3-compatible server for s3:// runs (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    p.add_argument("--region", help="the S3 region (default: $AWS_REGION, else us-east-1)")


def _progress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="also Ray Data's own progress bars and INFO logs")
    p.add_argument(
        "--progress-every",
        type=float,
        metavar="S",
        help="seconds between progress lines when stderr is not a terminal (default 30)",
    )


#: an example or two per command, shown at the end of its --help (``pairforge`` alone: the first steps)
EXAMPLES = {
    "pairforge": (
        "pairforge demo --runner local                 # a small dataset from local data, no cluster\n"
        "pairforge run job.yaml                        # a job file (see pipeline/example_job.yaml)\n"
        "pairforge manifest show out/                  # what a run did\n"
        "pairforge train out/ --out train/             # does the data teach image-text alignment?\n"
        "pairforge eval test/ --pretrained train/checkpoint.pt   # zero-shot accuracy on a labelled set\n"
        "exit codes: 0 done, 1 unexpected error, 2 bad job or flag, 3 no row reached a shard,\n"
        "4 empty input, 5 Ray cluster unreachable, 130 interrupted (docs/troubleshooting.md)"
    ),
    "run": (
        "pairforge run job.yaml\n"
        "pairforge run job.yaml --resume               # finish an interrupted run\n"
        "pairforge run job.yaml --address ray://head:10001"
    ),
    "demo": "pairforge demo --out demo_out --runner local\npairforge report demo_out",
    "manifest": "pairforge manifest show out/\npairforge manifest verify out/\npairforge manifest diff old/ new/",
    "show": "pairforge manifest show out/\npairforge manifest show s3://bucket/run --endpoint-url http://127.0.0.1:9000",
    "verify": "pairforge manifest verify out/",
    "diff": "pairforge manifest diff old/ new/\npairforge manifest diff old/ new/ --json > diff.json",
    "export": "pairforge export coco out/",
    "coco": "pairforge export coco out/ --out out/coco.json --captions out/coco_captions.json",
    "report": "pairforge report out/\npairforge report out/ --out site/ --pairs 96",
    "purge": "pairforge purge out/ --list takedown.txt --dry-run   # what would go\n"
    "pairforge purge out/ --list takedown.txt --reason takedown",
    "eval": "pairforge eval test/ --pretrained train/checkpoint.pt           # zero-shot top-1/top-5, per class\n"
    "pairforge eval test/ --pretrained train/checkpoint.pt --run out/  # filed for pairforge report out/",
    "eval-index": "pairforge eval-index test/ --out idx/test   # then dedup_exact/dedup_phash: {eval_sets: [idx/test]}",
    "stages": "pairforge stages                              # every stage, one line each\n"
    "pairforge stages clip_score                   # its options: type, default, doc",
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping for prose, lines as written for the indented
    example lines of an epilog."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            indent + line if line.startswith(" ") else super(_HelpFormatter, self)._fill_text(line, width, indent)
            for line in text.splitlines()
        )


def _with_examples(parser: argparse.ArgumentParser, name: str = "pairforge") -> None:
    """Put :data:`EXAMPLES` at the end of each command's help (nested commands included)."""
    if name in EXAMPLES:
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name].splitlines())
        parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                _with_examples(sub, sub_name)


def _version() -> str:
    from importlib import metadata

    from pairforge import __version__

    try:
        ray = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray = "not installed"
    return f"pairforge {__version__} (python {sys.version.split()[0]}, ray {ray})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pairforge", description="Build image-text datasets on Ray.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a job file")
    r.add_argument("job", help="job YAML file")
    r.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    r.add_argument("--resume", action="store_true", help="finish an interrupted run, skipping finished shards")
    r.add_argument(
        "--clean-work",
        action="store_true",
        help="delete OUT/_work (another job's, or an interrupted run's) and start over (docs/security.md)",
    )
    _progress_flags(r)
    r.set_defaults(fn=_cmd_run)

    d = sub.add_parser("demo", help="build a small dataset from local data, served over local HTTP")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--runner", choices=("ray", "local"), default="ray")
    d.add_argument("--resume", action="store_true")
    _progress_flags(d)
    d.set_defaults(fn=_cmd_demo)

    m = sub.add_parser("manifest", help="inspect a run's manifest")
    msub = m.add_subparsers(dest="mcmd", required=True)
    s = msub.add_parser("show", help="summarise a run")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="print the whole manifest")
    _storage_flags(s)
    s.set_defaults(fn=outputs.cmd_show)
    v = msub.add_parser("verify", help="recompute checksums and check the row accounting")
    v.add_argument("dir", help="the run's folder, or its s3:// / gs:// prefix")
    _storage_flags(v)
    v.set_defaults(fn=outputs.cmd_verify)
    df = msub.add_parser("diff", help="what changed between two runs (exit 1 if anything did)", description=_diff_doc())
    df.add_argument("old")
    df.add_argument("new")
    df.add_argument("--json", action="store_true", help="the differences as JSON")
    _storage_flags(df)
    df.set_defaults(fn=outputs.cmd_diff)

    pg = sub.add_parser(
        "purge",
        help="remove the rows opt-out and takedown lists name from a finished run",
        description="Remove every row whose URL, sha256 or pHash a list names: from the tars, parquet, embeddings, "
        "arrays and side tables of the affected shards (the rows stay counted as rejects with stage 'purge'); "
        "record the purge in the manifest. Every other file stays as it was. See docs/takedown.md.",
    )
    pg.add_argument("dir", help="the run's folder, or its s3:// / gs:// prefix")
    pg.add_argument(
        "--list",
        dest="lists",
        action="append",
        default=[],
        metavar="FILE",
        help="a list: text (one entry a line), .parquet or .csv; a path or s3:// / gs:// URI; repeat for more",
    )
    pg.add_argument(
        "--reason",
        choices=("opted_out", "blocklisted"),
        default="blocklisted",
        help="the reject reason of the rows the lists match (default blocklisted)",
    )
    pg.add_argument(
        "--kind",
        default="auto",
        help="how unprefixed entries are read: auto (default), url, prefix, domain, sha256, phash",
    )
    pg.add_argument("--column", help="the column of a parquet or CSV list (default: its only column)")
    pg.add_argument(
        "--max-distance", type=int, default=0, metavar="N", help="pHash entries match within N bits (0-16, default 0)"
    )
    pg.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    pg.add_argument("--workers", type=int, default=8, help="shards read and written at once (default 8)")
    pg.add_argument("--json", action="store_true", help="the purge record (or the dry run's counts) as JSON")
    _storage_flags(pg)
    pg.set_defaults(fn=outputs.cmd_purge)

    e = sub.add_parser("export", help="write a run's shards in another tool's format")
    esub = e.add_subparsers(dest="ecmd", required=True)
    c = esub.add_parser("coco", help="regions and captions as COCO JSON (pycocotools)")
    c.add_argument("dir")
    c.add_argument("--out", metavar="FILE", help="the detection file (default: DIR/coco.json)")
    c.add_argument("--captions", metavar="FILE", help="the captions file (default: DIR/coco_captions.json)")
    c.set_defaults(fn=outputs.cmd_export_coco)

    rp = sub.add_parser("report", help="an HTML page of a run: funnel, pairs, histograms, rejects, regions")
    rp.add_argument("dir")
    rp.add_argument("--out", metavar="DIR", help="the report's folder (default: DIR/report)")
    rp.add_argument("--pairs", type=int, default=48, metavar="N", help="kept pairs in the grid (default 48)")
    rp.set_defaults(fn=outputs.cmd_report)

    st = sub.add_parser("stages", help="the stages, and every option of one (type, default, doc)")
    st.add_argument("name", nargs="?", help="a stage's name (download, clip_score, ...)")
    st.set_defaults(fn=_cmd_stages)

    t = sub.add_parser("train", help="train a small CLIP on a run's shards", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=lambda a: __import__("pairforge.trainer.cli", fromlist=["main"]).main(a.rest))
    ev = sub.add_parser("eval", help="zero-shot accuracy of a model on a labelled image set", add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(fn=lambda a: __import__("pairforge.trainer.eval_cli", fromlist=["main"]).main(a.rest))
    ei = sub.add_parser("eval-index", help="an evaluation set as a build the dedup stages decontaminate against",
                        add_help=False)  # fmt: skip
    ei.add_argument("rest", nargs=argparse.REMAINDER)
    ei.set_defaults(fn=lambda a: __import__("pairforge.evalindex", fromlist=["main"]).main(a.rest))
    _with_examples(p)
    return p


def _diff_doc() -> str:
    return (
        "Compare the manifests of two runs: rows per stage and reason, the declared schema, "
        "the job's settings and the shards (added, removed, changed by checksum). "
        "Exit 0 when they hold the same, 1 when anything differs."
    )


def main(argv: list[str] | None = None) -> int:
    """The command line. ``argv`` ``None``: the process's own (the console
    script, ``python -m pairforge.cli``), and an interrupted run ends the
    process at once (:func:`_leave_interrupted`); with a list (a test, a
    caller of one's own), an interrupted run returns 130."""
    command = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if command:
        from pairforge import cli_signals

        cli_signals.install(interrupts=argv[:1] in (["run"], ["demo"]))
    if argv[:1] == ["train"]:  # the trainer owns its flags (--help included)
        from pairforge.trainer.cli import main as train_main

        return int(train_main(argv[1:]) or 0)
    if argv[:1] == ["eval"]:  # as train: the evaluation owns its flags
        from pairforge.trainer.eval_cli import main as eval_main

        return int(eval_main(argv[1:]) or 0)
    if argv[:1] == ["eval-index"]:
        from pairforge.evalindex import main as index_main

        return int(index_main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    from pairforge.pipeline.config import ConfigError
    from pairforge.pipeline.job import JobError

    try:
        return int(args.fn(args) or 0)
    except Interrupted as e:
        if command:
            _leave_interrupted(str(e))
        from pairforge.pipeline.outcome import EXIT_INTERRUPTED

        print(e, file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, JobError, FileNotFoundError) as e:
        from pairforge.manifests.redact import redact_text

        for line in str(e).splitlines() or [type(e).__name__]:  # a whole-job check reports a line per problem
            print(f"pairforge: error: {redact_text(line)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # pipeline.outcome: 2, or 4 (empty input), 5 (no cluster)


if __name__ == "__main__":
    sys.exit(main())
