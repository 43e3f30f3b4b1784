"""Job configuration: YAML in, frozen typed dataclasses out.

Unknown keys are an error that names the key and where it was found, so a
typo never silently falls back to a default.

``input`` is one URL list source or a list of them (PMD-style jobs: COCO,
CC3M, RedCaps... each with its own format and column names, into one schema);
errors name ``input[i].<key>`` in the list form.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pairforge.manifests import storage
from pairforge.manifests.storage import StorageConfig


class ConfigError(ValueError):
    pass


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

    def __post_init__(self):
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


def build(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in names.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a config's own checks (__post_init__)
        raise field_error(where, e, names) from None


def field_error(where: str, error: Exception, fields) -> ConfigError:
    """A config's own check as a :class:`ConfigError` naming the key path:
    ``retries: expected >= 0, got -3`` (or ``download.retries: ...``) raised
    by ``stages[0](download)`` becomes ``stages[0](download).retries: ...``."""
    msg = str(error)
    head, sep, rest = msg.partition(":")
    field = head.strip().rsplit(".", 1)[-1]
    if sep and field in fields:
        return ConfigError(f"{where}.{field}:{rest}")
    return ConfigError(f"{where}: {msg}")


def _coerce(tp, value, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:  # a YAML int is a float; a quoted number ("0.3") is a string, not a float
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r} ({_kind(value)})")
    if tp in (int, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({_kind(value)})")
    return value


def _kind(value) -> str:
    """What YAML made of a value, in words a job author knows."""
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a mapping",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def stage_specs(raw: Any) -> tuple[StageSpec, ...]:
    from pairforge.pipeline.registry import stage_class

    if not isinstance(raw, list) or not raw:
        raise ConfigError("stages: expected a non-empty list of {name: ..., <options>}")
    specs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"stages[{i}]: each stage needs a 'name'")
        opts = {k: v for k, v in item.items() if k != "name"}
        try:
            cls = stage_class(item["name"])
        except ValueError as e:
            raise ConfigError(f"stages[{i}]: {e}") from None
        specs.append(StageSpec(item["name"], build(cls.Config, opts, f"stages[{i}]({item['name']})")))
    names = [s.name for s in specs]
    if names[-1] != "shard" or names.count("shard") != 1:
        raise ConfigError("stages: the last stage must be 'shard', and only the last")
    return decode_once(tuple(specs))


def decode_once(specs: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
    """A ``dedup_phash`` after ``download`` reads the hash that download's
    threads took of each stored image right after encoding it, instead of
    going over every stored image again in a pass of its own; it is the
    hash ``dedup_phash`` computes (``stages.common.phash``), so the
    decisions are the same (``tests/test_resize.py``).
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
        out[i] = StageSpec(spec.name, dataclasses.replace(cfg, hash_column=f"image_{cfg.algorithm}"))
    out[first] = StageSpec("download", down)
    return tuple(out)


def load_job(source: str | Path | dict, base_dir: Path | None = None) -> JobConfig:
    """Read a job from a YAML file (or a dict). Relative input and output paths
    are taken relative to the YAML file's folder."""
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
        raise ConfigError("job: expected a mapping at the top level")
    raw_stages = data.pop("stages", None)
    job = build(_JobNoStages, data, "job")
    inp = _inputs(job.input, base)
    out = dataclasses.replace(job.output, dir=str(_abs(base, job.output.dir, "job.output.dir")))
    if job.runner not in ("ray", "local"):
        raise ConfigError(f"job.runner: expected 'ray' or 'local', got {job.runner!r}")
    if out.samples_per_shard < 1:
        raise ConfigError("job.output.samples_per_shard: must be >= 1")
    return JobConfig(
        input=inp, output=out, stages=stage_specs(raw_stages), ray=job.ray, runner=job.runner, storage=job.storage
    )


def _inputs(raw: Any, base: Path) -> InputConfig | tuple[InputConfig, ...]:
    """The single form as before; a list builds each source as ``input[i]``."""

    def resolved(cfg: InputConfig, where: str) -> InputConfig:
        return dataclasses.replace(cfg, paths=tuple(str(_abs(base, p, f"{where}.paths")) for p in cfg.paths))

    if not isinstance(raw, list):
        return resolved(build(InputConfig, raw, "job.input"), "job.input")
    if not raw:
        raise ConfigError("input: expected a mapping or a non-empty list of sources, got []")
    items = tuple(resolved(build(InputConfig, item, f"input[{i}]"), f"input[{i}]") for i, item in enumerate(raw))
    named: dict[str, int] = {}
    for i, cfg in enumerate(items):
        if cfg.source is not None and named.setdefault(cfg.source, i) != i:
            raise ConfigError(
                f"input[{i}].source: {cfg.source!r} is input[{named[cfg.source]}]'s too; give each source its own name"
            )
    return items


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
    d["stages"] = [{"name": s.name, **dataclasses.asdict(s.config)} for s in job.stages]
    if job.storage == StorageConfig():  # a job without the section is recorded as before it existed
        del d["storage"]
    return d
