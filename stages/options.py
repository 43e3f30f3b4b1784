"""Options: the frozen dataclass configs of stages and jobs, built and checked
the same way from YAML and from Python.

Why here, beside the stage contract: a config is made two ways, from a job
file's mapping (the job loader, ``pipeline.config``) and in Python
(``download.Config(...)``, ``pairforge.stages.Download(...)``). Both must
accept the same values, turn them into the same typed fields (a YAML or a
Python list becomes the tuple a frozen config needs to stay hashable) and
refuse the same ones in the same words; stages never import ``pipeline/``,
so the one builder lives here and the job loader imports it.

The rules of a good error live here once: the key's path in one style
(``input.paths``, ``stages[1](clip_score).threshold``), what was expected
and the value given, the closest known key for an unknown one (``difflib``),
and every problem of a mapping rather than the first (a config's own
``__post_init__`` checks are tried key by key, so three bad values are three
lines). A dataclass may name a ``SHORTHAND`` field (a ``ClassVar``): a plain
string given for it means that field (``detectors: [mtcnn]`` for
``detectors: [{model: mtcnn}]``).

:func:`options` (``@options`` instead of ``@dataclass(frozen=True)``) runs
the coercion in every config's ``__post_init__`` before the config's own
checks, and keeps each field's ``#:`` comment as its documentation
(``stages.options_doc``).
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from pairforge.stages.options_doc import attach_docs


class ConfigError(ValueError):
    """A job or stage option that cannot be used; the message names the key
    path and the value (``stages[0](download).retries: expected >= 0, got -3``)."""


def options(cls=None, /):
    """``@dataclass(frozen=True)`` for configs, plus: values coerced to the
    field types on construction (lists to tuples, ints to floats, mappings to
    nested configs) with :func:`coerce`'s messages, and the ``#:`` comments
    kept as the fields' docs and the class docstring."""

    def wrap(c):
        own_post_init = getattr(c, "__post_init__", None)  # the class's own checks, or its base's

        def __post_init__(self):
            hints = _hints(type(self))
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                fixed = coerce(hints.get(f.name, Any), value, f.name)
                if fixed is not value:
                    object.__setattr__(self, f.name, fixed)
            if own_post_init is not None:
                own_post_init(self)

        c.__post_init__ = __post_init__
        c = dataclass(frozen=True)(c)
        attach_docs(c)
        return c

    return wrap if cls is None else wrap(cls)


def _hints(cls) -> dict[str, Any]:
    """The field types of ``cls``, resolved once; none (no coercion) where an
    annotation names something its module does not have (a class made in a
    function, annotated with a local name)."""
    cached = cls.__dict__.get("_options_hints")
    if cached is None:
        try:
            cached = typing.get_type_hints(cls)
        except NameError:
            cached = {}
        type.__setattr__(cls, "_options_hints", cached)
    return cached


# ------------------------------------------------------------------ building from a mapping


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
            value = coerce(hints[name], data[name], key_path(where, name), problems)
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
    """Every key a config's own checks refuse, not only the first. A key
    is suspect when it fails tried alone (with the required keys); it is
    reported when it still fails beside every key that is not suspect (so
    a check that needs a companion key the job did give, ``features: [clip]``
    with its ``clip_pretrained``, does not blame it). A check of several keys
    together shows as the error of the whole."""
    required = {
        n: kwargs[n]
        for n, f in fields.items()
        if n in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    suspects = [n for n in kwargs if _refusal(cls, {**required, n: kwargs[n]}) is not None]
    lines: list[str] = []
    for name in suspects:
        e = _refusal(cls, {k: v for k, v in kwargs.items() if k == name or k not in suspects})
        line = str(field_error(where, e, fields)) if e is not None else None
        if line is not None and line not in lines:
            lines.append(line)
    whole = str(field_error(where, error, fields))
    return lines if whole in lines else [*lines, whole]


def _refusal(cls, kwargs: dict) -> Exception | None:
    try:
        cls(**kwargs)
    except (ValueError, TypeError) as e:
        return e
    return None


def field_error(where: str, error: Exception, fields) -> ConfigError:
    """A config's own check as a :class:`ConfigError` naming the key path:
    ``retries: expected >= 0, got -3`` (or ``download.retries: ...``) raised
    by ``stages[0](download)`` becomes ``stages[0](download).retries: ...``."""
    msg = str(error)
    head, sep, rest = msg.partition(":")
    field = head.strip().rsplit(".", 1)[-1]
    if sep and field.split("[", 1)[0] in fields:
        return ConfigError(f"{key_path(where, field)}:{rest}")
    return ConfigError(f"{where or 'job'}: {msg}")


# ------------------------------------------------------------------ one value


def coerce(tp, value, where: str, problems: list[str] | None = None):
    """``value`` as type ``tp`` (a field's annotation), or a :class:`ConfigError`
    naming ``where`` (a key path, or a bare field name that the job loader
    prefixes with its path) and the value. YAML's values and Python's alike:
    a list or one value for a tuple, an int (or numpy's) for a float, a
    ``pathlib.Path`` for a string, a config or its mapping for a config."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, where, problems)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, where, problems)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short(value)} ({_kind(value)})")
        if len(args) == 2 and args[1] is Ellipsis:
            out = tuple(coerce(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value))
        elif len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {list(value)!r}")
        else:
            out = tuple(coerce(a, v, f"{where}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value)))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(out, value)) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short(value)} ({_kind(value)})")
        return value
    if tp is float:  # an int is a float; a quoted number ("0.3") is a string, not a float
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value if type(value) is float else float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r} ({_kind(value)})")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value if type(value) is int else int(value)
        raise ConfigError(f"{where}: expected int, got {value!r} ({_kind(value)})")
    if tp is str and isinstance(value, os.PathLike):  # a pathlib.Path in Python
        return os.fspath(value)
    if tp in (str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({_kind(value)})")
    return value


def _kind(value) -> str:
    """What YAML made of a value, in words a job author knows."""
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
