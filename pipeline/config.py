"""Job configuration: YAML in, frozen typed dataclasses out.

Why every problem at once: a user fixing a job one error per run spends a
run per typo. :func:`load_job` goes over the whole file and reports every
wrong key in one :class:`ConfigError`, a line each, in one style: the key's
path (``input.paths``, ``output.samples_per_shard``,
``stages[1](clip_score).threshold``), what was expected and the value given.
An unknown key is an error that names the closest known one, so a typo
never silently falls back to a default.

``input`` is one URL list source or a list of them (PMD-style jobs: COCO,
CC3M, RedCaps... each with its own format and column names, into one schema);
errors name ``input[i].<key>`` in the list form.
"""

from __future__ import annotations

import dataclasses
import difflib
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


def build(cls, data: Any, where: str, problems: list[str] | None = None):
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown
    keys. With ``problems``, every problem found is appended to it (a line
    each) and ``None`` is returned when ``cls`` cannot be built; without, the
    problems are raised together as one :class:`ConfigError`."""
    own = problems is None
    found: list[str] = [] if own else problems
    before = len(found)
    out = _build(cls, data, where, found)
    if own and len(found) > before:
        raise ConfigError("\n".join(found))
    return out


def key_path(where: str, key) -> str:
    """``where.key`` (``key`` alone at the top of the job)."""
    return f"{where}.{key}" if where else str(key)


def did_you_mean(value: str, names) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``names``, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(n) for n in names], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def short(value, limit: int = 60) -> str:
    """A value as a message shows it: its repr, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build(cls, data: Any, where: str, problems: list[str]):
    shorthand = getattr(cls, "SHORTHAND", None)
    if isinstance(data, str) and shorthand:  # ``mtcnn`` for ``{model: mtcnn}``
        data = {shorthand: data}
    if not isinstance(data, dict):
        problems.append(f"{where or 'job'}: expected a mapping, got {short(data)} ({_kind(data)})")
        return None
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - set(names), key=str):
        hint = did_you_mean(key, names) or f" (known: {', '.join(sorted(names))})"
        problems.append(f"{key_path(where, key)}: unknown key, given {short(data[key])}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    failed = False
    for name, f in names.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in data:
            if required:
                problems.append(f"{key_path(where, name)}: missing (required)")
                failed = True
            continue
        before = len(problems)
        try:
            value = _coerce(hints[name], data[name], key_path(where, name), problems)
        except ConfigError as e:
            problems.append(str(e))
        if len(problems) > before:
            failed = failed or required
            continue
        kwargs[name] = value
    if failed:
        return None
    try:  # the config's own checks (__post_init__) on the keys that were right
        built = cls(**kwargs)
    except (ValueError, TypeError) as e:
        problems.extend(_each_check(cls, kwargs, where, e, names))
        return None
    wrong = set(data) - set(kwargs)  # unknown keys and wrong values: their own lines say so
    return None if wrong else built


def _each_check(cls, kwargs: dict, where: str, error: Exception, fields) -> list[str]:
    """Every key a config's own checks refuse, not only the first: each
    given key is tried alone (with the required ones), and the checks that
    need several keys together show as the error of the whole."""
    required = {
        n: kwargs[n]
        for n, f in fields.items()
        if n in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    lines: list[str] = []
    for name in kwargs:
        try:
            cls(**{**required, name: kwargs[name]})
        except (ValueError, TypeError) as e:
            line = str(field_error(where, e, fields))
            if line not in lines:
                lines.append(line)
    whole = str(field_error(where, error, fields))
    return lines if whole in lines else [*lines, whole]


def field_error(where: str, error: Exception, fields) -> ConfigError:
    """A config's own check as a :class:`ConfigError` naming the key path:
    ``retries: expected >= 0, got -3`` (or ``download.retries: ...``) raised
    by ``stages[0](download)`` becomes ``stages[0](download).retries: ...``."""
    msg = str(error)
    head, sep, rest = msg.partition(":")
    field = head.strip().rsplit(".", 1)[-1]
    if sep and field in fields:
        return ConfigError(f"{key_path(where, field)}:{rest}")
    return ConfigError(f"{where or 'job'}: {msg}")


def _coerce(tp, value, where, problems: list[str] | None = None):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, problems)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, problems)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value)))
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


def stage_specs(raw: Any, problems: list[str] | None = None) -> tuple[StageSpec, ...]:
    """The job's ``stages``, each config built (``problems``: as :func:`build`).
    A stage may appear once: its name keys its columns' owner, its
    ``__t_<name>`` timing column, its reject reasons (``stage``), its fit's
    folder (``_work/fit/<name>``) and its counts in the manifest, which two
    of one name would mix up."""
    from pairforge.pipeline.registry import STAGES, stage_class

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
    d["stages"] = [{"name": s.name, **dataclasses.asdict(s.config)} for s in job.stages]
    if job.storage == StorageConfig():  # a job without the section is recorded as before it existed
        del d["storage"]
    return d
