"""Job configuration: YAML in, frozen typed dataclasses out.

Why every problem at once: a user fixing a job one error per run spends a
run per typo. :func:`load_job` goes over the whole file and reports every
wrong key in one :class:`ConfigError`, a line each, in one style: the key's
path (``input.paths``, ``output.samples_per_shard``,
``stages[1](clip_score).threshold``), what was expected and the value given.
An unknown key is an error that names the closest known one, so a typo
never silently falls back to a default. How a mapping becomes a typed
config is :mod:`pipeline.config_build` (its names are importable from here).

``input`` is one URL list source or a list of them (PMD-style jobs: COCO,
CC3M, RedCaps... each with its own format and column names, into one schema);
errors name ``input[i].<key>`` in the list form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pairforge.manifests import storage
from pairforge.manifests.storage import StorageConfig

# the builder's names are re-exported: stages' tests and pipeline.checks import them from here
from pairforge.pipeline.config_build import (  # noqa: F401
    ConfigError,
    build,
    did_you_mean,
    field_error,
    key_path,
    short,
)
from pairforge.pipeline.inputlimits import InputLimits

#: formats of a URL list; ``coco`` (COCO captions JSON) is never picked by ``auto``
FORMATS = ("parquet", "csv", "tsv", "jsonl", "coco")


@dataclass(frozen=True)
class InputConfig:
    #: URL list files (parquet, csv, tsv, jsonl, coco); globs are expanded
    paths: tuple[str, ...]
    #: one of :data:`FORMATS`; ``auto`` picks by file extension
    format: str = "auto"
    url_col: str = "url"
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


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    #: rows of the URL list per shard (img2dataset's number_sample_per_shard)
    samples_per_shard: int = 10000


@dataclass(frozen=True)
class RayConfig:
    #: ``None`` starts a local Ray; ``auto`` or ``host:port`` joins a cluster
    address: str | None = None
    #: CPUs for a local Ray (``None``: all of this machine's)
    num_cpus: int | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: Any


@dataclass(frozen=True)
class CustomOptions:
    """The options of a stage of one's own (``package.module:Class``) as the
    job file wrote them: its module is code, imported only once the rest of
    the job has passed its checks (``pipeline.registry.resolve_stages``)."""

    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobConfig:
    #: one source, or several read one after another (``input[0]`` first)
    input: InputConfig | tuple[InputConfig, ...]
    output: OutputConfig
    stages: tuple[StageSpec, ...]
    ray: RayConfig = field(default_factory=RayConfig)
    #: ``ray`` (default) or ``local`` (in-process, for tests and debugging)
    runner: str = "ray"
    #: how to reach ``s3://`` / ``gs://`` input and output (``manifests.storage``)
    storage: StorageConfig = field(default_factory=StorageConfig)


def stage_specs(raw: Any, problems: list[str] | None = None) -> tuple[StageSpec, ...]:
    """The job's ``stages``, each config built (``problems``: as :func:`build`).
    A stage may appear once: its name keys its columns' owner, its
    ``__t_<name>`` timing column, its reject reasons (``stage``), its fit's
    folder (``_work/fit/<name>``) and its counts in the manifest, which two
    of one name would mix up."""
    from pairforge.pipeline.registry import STAGES, check_custom_name, is_custom, stage_class

    own = problems is None
    problems = [] if own else problems
    before = len(problems)
    specs: list[StageSpec | None] = []
    if not isinstance(raw, list) or not raw:
        problems.append(f"stages: expected a non-empty list of {{name: ..., <options>}}, got {short(raw)}")
        raw = []
    first: dict[str, int] = {}
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"stages[{i}]: each stage needs a 'name', got {short(item)}")
            specs.append(None)
            continue
        name = item["name"]
        where = f"stages[{i}]({name})"
        if name in first:
            problems.append(
                f"{where}: {name!r} is already stages[{first[name]}]; a stage may appear once (its columns, "
                "reject reasons, fit folder and manifest counts are keyed by its name, so two would collide); "
                "merge their options into one"
            )
        first.setdefault(name, i)
        if is_custom(name):  # not imported here: see CustomOptions
            try:
                check_custom_name(name)
            except ValueError as e:
                problems.append(f"stages[{i}]: {e}")
                specs.append(None)
                continue
            specs.append(StageSpec(name, CustomOptions({k: v for k, v in item.items() if k != "name"})))
            continue
        try:
            if name not in STAGES and ":" not in name:
                raise ValueError(
                    f"unknown stage {name!r}{did_you_mean(name, STAGES)}; known stages: "
                    f"{', '.join(sorted(STAGES))} (or package.module:Class)"
                )
            cls = stage_class(name)
        except ValueError as e:
            problems.append(f"stages[{i}]: {e}")
            specs.append(None)
            continue
        opts = {k: v for k, v in item.items() if k != "name"}
        cfg = build(cls.Config, opts, where, problems)
        specs.append(None if cfg is None else StageSpec(name, cfg))
    names = [item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None for item in raw]
    if raw and (names[-1] != "shard" or names.count("shard") != 1):
        problems.append(f"stages: the last stage must be 'shard', and only the last; got {names}")
    if own and len(problems) > before:
        raise ConfigError("\n".join(problems))
    if len(problems) > before or any(s is None for s in specs):
        return ()
    return decode_once(tuple(specs))


def decode_once(specs: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
    """A ``dedup_phash`` after ``download`` reads the hash that download's
    threads took of each stored image right after encoding it, instead of
    going over every stored image again in a pass of its own; it is the
    hash ``dedup_phash`` computes (``stages.common.phash``), so the
    decisions are the same (``tests/test_resize.py``). Download writes it
    into ``dedup_phash``'s own column (``phash``), which ``dedup_phash``
    then checks and keeps: the shards hold the hash once.
    Explicit settings win: a ``hash_column`` or a ``perceptual_hash`` the
    job gives is left as it is."""
    names = [s.name for s in specs]
    if "download" not in names:
        return specs
    first = names.index("download")
    down = specs[first].config
    out = list(specs)
    for i, spec in enumerate(specs[first + 1 :], first + 1):
        cfg = spec.config
        if spec.name != "dedup_phash" or cfg.hash_column is not None:
            continue
        if down.perceptual_hash not in (None, cfg.algorithm):
            continue
        down = dataclasses.replace(down, perceptual_hash=cfg.algorithm)
        out[i] = StageSpec(spec.name, dataclasses.replace(cfg, hash_column=cfg.algorithm))
    out[first] = StageSpec("download", down)
    return tuple(out)


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
        try:
            out = dataclasses.replace(job.output, dir=str(_abs(base, job.output.dir, "output.dir")))
        except ConfigError as e:
            problems.append(str(e))
        if job.output.samples_per_shard < 1:
            problems.append(f"output.samples_per_shard: expected >= 1, got {job.output.samples_per_shard!r}")
    runner = data.get("runner", "ray")
    if isinstance(runner, str) and runner not in ("ray", "local"):  # another type: build said so
        problems.append(f"runner: expected 'ray' or 'local', got {runner!r}{did_you_mean(runner, ('ray', 'local'))}")
    stages = stage_specs(raw_stages, problems)
    if problems:
        raise ConfigError("\n".join(problems))
    return JobConfig(input=inp, output=out, stages=stages, ray=job.ray, runner=job.runner, storage=job.storage)


def _inputs(raw: Any, base: Path, problems: list[str]) -> InputConfig | tuple[InputConfig, ...] | None:
    """The single form as before; a list builds each source as ``input[i]``."""

    def resolved(cfg: InputConfig | None, where: str) -> InputConfig | None:
        if cfg is None:
            return None
        try:
            return dataclasses.replace(cfg, paths=tuple(str(_abs(base, p, f"{where}.paths")) for p in cfg.paths))
        except ConfigError as e:
            problems.append(str(e))
            return None

    if not isinstance(raw, list):
        return resolved(build(InputConfig, raw, "input", problems), "input")
    if not raw:
        problems.append("input: expected a mapping or a non-empty list of sources, got []")
        return None
    items = [resolved(build(InputConfig, item, f"input[{i}]", problems), f"input[{i}]") for i, item in enumerate(raw)]
    named: dict[str, int] = {}
    for i, cfg in enumerate(items):
        if cfg is not None and cfg.source is not None and named.setdefault(cfg.source, i) != i:
            problems.append(
                f"input[{i}].source: {cfg.source!r} is input[{named[cfg.source]}]'s too; give each source its own name"
            )
    return None if any(c is None for c in items) else tuple(items)


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
    q = Path(p).expanduser()
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
