"""Job configuration: YAML in, frozen typed dataclasses out.

Why every problem at once: a user fixing a job one error per run spends a
run per typo. :func:`load_job` goes over the whole file and reports every
wrong key in one :class:`ConfigError`, a line each, in one style: the key's
path (``input.paths``, ``output.samples_per_shard``,
``stages[1](clip_score).threshold``), what was expected and the value given.
An unknown key is an error that names the closest known one, so a typo
never silently falls back to a default. How a mapping becomes a typed
config is :mod:`stages.options` (its names are importable from here); the
same builder checks a config made in Python, so ``pairforge.Job`` built from
stage objects is refused in the same words. The ``stages`` list has rules of
its own (:mod:`pipeline.stagelist`, its names importable from here).

``input`` is one URL list source or a list of them (PMD-style jobs: COCO,
CC3M, RedCaps... each with its own format and column names, into one schema);
errors name ``input[i].<key>`` in the list form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from pairforge.manifests import storage
from pairforge.manifests.storage import StorageConfig
from pairforge.pipeline.inputlimits import InputLimits
from pairforge.pipeline.stagelist import CustomOptions, StageSpec, share_decodes, stage_specs

# the builder's names are re-exported: stages' tests and pipeline.checks import them from here
from pairforge.stages.options import (  # noqa: F401
    ConfigError,
    build,
    coerce,
    did_you_mean,
    field_error,
    key_path,
    options,
    short,
)

#: formats of a URL list; ``coco`` (COCO captions JSON) is never picked by ``auto``
FORMATS = ("parquet", "csv", "tsv", "jsonl", "coco")


@options
class InputConfig:
    #: URL list files (parquet, csv, tsv, jsonl, coco); globs are expanded
    paths: tuple[str, ...]
    #: one of :data:`FORMATS`; ``auto`` picks by file extension
    format: str = "auto"
    #: the column holding the image URL
    url_col: str = "url"
    #: the column holding the caption
    caption_col: str = "caption"
    #: value of the ``source`` column; default: the input file's stem
    source: str | None = None
    #: source column -> pairforge column, renamed before anything else reads
    #: the file (``{URL: url, TEXT: caption}`` for LAION parquet)
    columns: dict[str, str] = field(default_factory=dict)
    #: bounds on what the files may hold (``pipeline.inputlimits``: caption and
    #: URL length, columns, JSON line length and depth, file sizes)
    limits: InputLimits = field(default_factory=InputLimits)

    def __post_init__(self):
        if not self.paths:
            raise ValueError("paths: expected at least one file or glob, got []")
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"format: expected one of auto, {', '.join(FORMATS)}, got {self.format!r}")
        for old, new in self.columns.items():
            if not (isinstance(old, str) and isinstance(new, str)) or not new:
                raise ValueError(f"columns: expected column name: column name, got {old!r}: {new!r}")


def input_entries(inp: InputConfig | tuple[InputConfig, ...]) -> list[tuple[str, InputConfig]]:
    """Each source of a job's ``input`` with the key path its errors name:
    ``input`` for the single form, ``input[i]`` for a list."""
    if isinstance(inp, InputConfig):
        return [("input", inp)]
    return [(f"input[{i}]", c) for i, c in enumerate(inp)]


@options
class OutputConfig:
    #: the output folder (or ``s3://`` / ``gs://`` prefix); relative to the job file's folder
    dir: str
    #: rows of the URL list per shard (img2dataset's number_sample_per_shard)
    samples_per_shard: int = 10000
    #: within an input shard, rows are saved (and safe from a kill) in chunks of at most this many
    #: rows: a resume fetches again only the rows of chunks that were not saved
    checkpoint_rows: int = 5000
    #: ... or of the rows done in this many seconds, whichever comes first
    checkpoint_seconds: float = 60.0


@options
class RayConfig:
    #: ``None`` starts a local Ray; ``auto`` or ``host:port`` joins a cluster
    address: str | None = None
    #: CPUs for a local Ray (``None``: all of this machine's)
    num_cpus: int | None = None


@dataclass(frozen=True)
class JobConfig:
    """A job: the URL lists, the output folder and the stages, with where
    and how to run them. ``pairforge.Job`` in the Python API.

    ``load_job`` builds one from a YAML file; in Python the fields take
    plain values too: ``input`` a path (or glob, or a list of them), an
    ``InputConfig`` or a mapping (or a list of sources); ``output`` a
    folder or an ``OutputConfig``; ``stages`` stage objects
    (``pairforge.stages.Download(...)``), names or ``{name: ..., <options>}``
    mappings, the last one ``shard``. Relative paths are made absolute
    against the current folder, as a job file's are against its folder.
    Every problem is raised together, as :func:`load_job` raises them.
    """

    #: one source, or several read one after another (``input[0]`` first)
    input: InputConfig | tuple[InputConfig, ...]
    output: OutputConfig
    stages: tuple[StageSpec, ...]
    ray: RayConfig = field(default_factory=RayConfig)
    #: ``ray`` (default) or ``local`` (in-process, for tests and debugging)
    runner: str = "ray"
    #: how to reach ``s3://`` / ``gs://`` input and output (``manifests.storage``)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        base, problems = Path.cwd(), []
        fixed = {
            "input": _inputs(self.input, base, problems),
            "output": _output(self.output, base, problems),
            "stages": stage_specs(self.stages, problems),
            "ray": RayConfig() if self.ray is None else coerce(RayConfig, self.ray, "ray", problems),
            "storage": StorageConfig()
            if self.storage is None
            else coerce(StorageConfig, self.storage, "storage", problems),
        }
        if not isinstance(self.runner, str) or self.runner not in ("ray", "local"):
            problems.append(
                f"runner: expected 'ray' or 'local', got {self.runner!r}{did_you_mean(self.runner, ('ray', 'local'))}"
            )
        if problems:
            raise ConfigError("\n".join(dict.fromkeys(problems)))
        for name, value in fixed.items():
            object.__setattr__(self, name, value)


def load_job(source: str | Path | dict, base_dir: Path | None = None) -> JobConfig:
    """Read a job from a YAML file (or a dict). Relative input and output paths
    are taken relative to the YAML file's folder. Every problem found is
    raised together, a line each, as one :class:`ConfigError`."""
    if isinstance(source, dict):
        data = dict(source)
        base = base_dir or Path.cwd()
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"job file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        base = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError(f"job: expected a mapping at the top level, got {short(data)}")
    problems: list[str] = []
    raw_stages = data.pop("stages", None)
    job = build(_JobNoStages, data, "", problems)
    inp = out = None
    if "input" in data:
        inp = _inputs(data["input"], base, problems)
    if job is not None:
        out = _output(job.output, base, problems)
    runner = data.get("runner", "ray")
    if isinstance(runner, str) and runner not in ("ray", "local"):  # another type: build said so
        problems.append(f"runner: expected 'ray' or 'local', got {runner!r}{did_you_mean(runner, ('ray', 'local'))}")
    stages = stage_specs(raw_stages, problems)
    if problems:
        raise ConfigError("\n".join(problems))
    return JobConfig(input=inp, output=out, stages=stages, ray=job.ray, runner=job.runner, storage=job.storage)


def _inputs(raw: Any, base: Path, problems: list[str]) -> InputConfig | tuple[InputConfig, ...] | None:
    """One source (a mapping, an :class:`InputConfig`, a path or glob, a list
    of paths) as ``input``; a list of sources builds each as ``input[i]``."""

    def resolved(cfg: InputConfig | None, where: str) -> InputConfig | None:
        if cfg is None:
            return None
        try:
            return dataclasses.replace(cfg, paths=tuple(str(_abs(base, p, f"{where}.paths")) for p in cfg.paths))
        except ConfigError as e:
            problems.append(str(e))
            return None

    def one(item: Any, where: str) -> InputConfig | None:
        if isinstance(item, (str, PathLike)):
            item = {"paths": [item]}
        try:
            return resolved(coerce(InputConfig, item, where, problems), where)
        except ConfigError as e:
            problems.append(str(e))
            return None

    if isinstance(raw, (list, tuple)) and raw and all(isinstance(p, (str, PathLike)) for p in raw):
        return one({"paths": list(raw)}, "input")  # several files of one source
    if not isinstance(raw, (list, tuple)):
        return one(raw, "input")
    if not raw:
        problems.append("input: expected a mapping or a non-empty list of sources, got []")
        return None
    items = [one(item, f"input[{i}]") for i, item in enumerate(raw)]
    named: dict[str, int] = {}
    for i, cfg in enumerate(items):
        if cfg is not None and cfg.source is not None and named.setdefault(cfg.source, i) != i:
            problems.append(
                f"input[{i}].source: {cfg.source!r} is input[{named[cfg.source]}]'s too; give each source its own name"
            )
    return None if any(c is None for c in items) else tuple(items)


def _output(raw: Any, base: Path, problems: list[str]) -> OutputConfig | None:
    """The output folder (a path, a mapping or an :class:`OutputConfig`), made absolute."""
    try:
        out = coerce(OutputConfig, {"dir": raw} if isinstance(raw, (str, PathLike)) else raw, "output", problems)
        if out is None:
            return None
        if out.samples_per_shard < 1:
            problems.append(f"output.samples_per_shard: expected >= 1, got {out.samples_per_shard!r}")
        if out.checkpoint_rows < 1:
            problems.append(f"output.checkpoint_rows: expected >= 1, got {out.checkpoint_rows!r}")
        if not out.checkpoint_seconds > 0:
            problems.append(f"output.checkpoint_seconds: expected > 0, got {out.checkpoint_seconds!r}")
        return dataclasses.replace(out, dir=str(_abs(base, out.dir, "output.dir")))
    except ConfigError as e:
        problems.append(str(e))
        return None


@dataclass(frozen=True)
class _JobNoStages:
    input: Any  # a mapping or a list of them: see _inputs
    output: OutputConfig
    ray: RayConfig = field(default_factory=RayConfig)
    runner: str = "ray"
    storage: StorageConfig = field(default_factory=StorageConfig)


def _abs(base: Path, p: str, where: str) -> Path | str:
    """A local path relative to the job file's folder; an object-storage URI
    as it is (``file://`` is a local path)."""
    if storage.is_uri(p):
        try:
            loc = storage.path(p)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if storage.is_object(loc):
            return p
        p = str(loc)
    try:
        q = Path(p).expanduser()
    except RuntimeError:  # "~name" of no user on this machine
        raise ConfigError(f"{where}: {p!r}: no home folder for {p.split('/', 1)[0]!r} on this machine") from None
    return q if q.is_absolute() else (base / q)


def to_dict(job: JobConfig) -> dict:
    """The job as plain data (for the manifest)."""
    d = dataclasses.asdict(job)
    for entry in [d["input"]] if isinstance(d["input"], dict) else d["input"]:
        if not entry["columns"]:  # recorded as before there was one (a resume compares the records)
            del entry["columns"]
        if entry["limits"] == dataclasses.asdict(InputLimits()):  # the same: the defaults are left out
            del entry["limits"]
    d["stages"] = [
        {"name": s.name, **(s.config.options if isinstance(s.config, CustomOptions) else dataclasses.asdict(s.config))}
        for s in job.stages
    ]
    if job.storage == StorageConfig():  # a job without the section is recorded as before it existed
        del d["storage"]
    return d


def resolve_stages(job: JobConfig) -> JobConfig:
    """``job`` with each custom stage's module imported and its options built
    into its ``Config`` (:class:`CustomOptions` until then); a
    ``ConfigError`` naming ``stages[i]`` when one cannot be. Built-in stages
    are as they were. A job that names such a stage is code, to be trusted as
    such (docs/security.md): this runs only once the rest of the job has
    passed the whole-job check (``pipeline.checks``)."""
    from pairforge.stages import stage_class

    specs = list(job.stages)
    for i, spec in enumerate(specs):
        if not isinstance(spec.config, CustomOptions):
            continue
        try:
            cls = stage_class(spec.name)
        except ValueError as e:
            raise ConfigError(f"stages[{i}]: {e}") from None
        specs[i] = StageSpec(spec.name, build(cls.Config, dict(spec.config.options), f"stages[{i}]({spec.name})"))
    if specs == list(job.stages):
        return job
    return dataclasses.replace(job, stages=share_decodes(tuple(specs)))  # now the custom stages take part
