"""Mappings read from YAML into frozen dataclasses, every problem collected.

Why on its own: the job loader (:mod:`pipeline.config`) and the tests of
each stage's options build typed configs the same way, and the rules of a
good error live here once: the key's path in one style (``input.paths``,
``stages[1](clip_score).threshold``), what was expected and the value given,
the closest known key for an unknown one (``difflib``), and every problem of
a mapping rather than the first (a config's own ``__post_init__`` checks are
tried key by key, so three bad values are three lines).

A dataclass may name a ``SHORTHAND`` field (a ``ClassVar``): a plain string
given for it means that field (``detectors: [mtcnn]`` for
``detectors: [{model: mtcnn}]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any


class ConfigError(ValueError):
    pass


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
