"""The documentation of config options, written once.

Each option is documented by the ``#:`` comment above its field (Sphinx's
attribute doc comments; a trailing ``#: doc`` on the field's line counts
too). :func:`attach_docs`, which ``stages.options.options`` calls when the
class is made, reads those comments from the class's source into the
field's ``metadata["doc"]`` and an ``Attributes:`` section of the class
docstring; so ``help(Config)``, ``pairforge stages NAME`` and the generated
reference pages (:func:`describe`) show the same text, and no second copy
exists to fall behind. Without a source (a class made in a function) the
options are listed without docs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import linecache
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Option:
    """One option of a config, as the docs and ``pairforge stages`` show it."""

    name: str
    #: the type in a job file's words: ``int``, ``list[str]``, ``float | null``
    type: str
    #: the default as YAML would write it (``null``, ``["a", "b"]``); ``""`` when required
    default: str
    doc: str
    required: bool = False


def describe(cls) -> list[Option]:
    """Every option of config ``cls``: name, type, default and doc."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default, required = _yaml(f.default), False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = _yaml(f.default_factory()), False
        else:
            default, required = "", True
        out.append(Option(f.name, type_name(hints.get(f.name, Any)), default, f.metadata.get("doc", ""), required))
    return out


def type_name(tp) -> str:
    """An annotation in a job file's words: ``list[str]``, ``[int, int]``, ``float | null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _yaml(value) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, tuple):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def doc_comments(cls) -> dict[str, str]:
    """Field name -> its ``#:`` comment lines (above the field, or after it
    on its line), read from the class's source; ``{}`` without a source."""
    lines = _class_source(cls)
    docs: dict[str, str] = {}
    pending: list[str] = []
    indent = None
    for line in lines[1:]:
        text = line.strip()
        if not text:
            pending = []
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        m = re.match(r"([A-Za-z_]\w*)\s*:[^#]*?(?:#:\s*(.*))?$", text) if depth == indent else None
        if m:
            doc = " ".join(pending + ([m.group(2).strip()] if m.group(2) else []))
            if doc:
                docs[m.group(1)] = doc
        pending = []
    return docs


def _class_source(cls) -> list[str]:
    """The lines of ``cls``'s definition: found by name in its module's file
    (cheap, at import); ``[]`` where the source is not at hand."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if not path or "<locals>" in cls.__qualname__:
        return []
    lines = linecache.getlines(path)
    starts = [i for i, line in enumerate(lines) if re.match(rf"class {re.escape(cls.__qualname__)}\b", line)]
    if len(starts) != 1:
        return []
    return lines[starts[0] :]


def attach_docs(cls) -> None:
    """Keep the ``#:`` comments of config ``cls`` as its fields' ``metadata["doc"]``
    and its docstring (an ``Attributes:`` section after its own text)."""
    docs = doc_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in docs and "doc" not in f.metadata:
            f.metadata = MappingProxyType({**f.metadata, "doc": docs[f.name]})
    own = cls.__dict__.get("__doc__") or ""
    if own.startswith(cls.__name__ + "("):  # the signature dataclass writes when there is no docstring
        own = ""
    cls.__doc__ = (inspect.cleandoc(own) + "\n\n" if own else "") + options_text(cls, "Attributes:")


def options_text(cls, header: str = "Options:") -> str:
    """A Google-style section listing every option of config ``cls`` with its
    type, default and doc (``help()`` shows it; mkdocstrings renders an
    ``Attributes:`` section as a table)."""
    try:
        opts = describe(cls)
    except (NameError, TypeError):  # annotations not resolvable yet (a config made in a function)
        return ""
    lines = [header]
    for o in opts:
        default = "required" if o.required else f"default ``{o.default}``"
        text = f"{o.name} ({o.type}, {default}): {o.doc or '-'}"
        lines.append(textwrap.fill(text, 96, initial_indent="    ", subsequent_indent="        "))
    return "\n".join(lines)
