"""The stage and job option reference, made from the configs themselves.

Why generated: an option's doc is written once, as the ``#:`` comment above
its field (``stages.options_doc``); ``pairforge stages [NAME]`` prints it and the
docs site's reference page (``docs/hooks.py``) renders it, so neither can fall
behind the code. Nothing here imports a stage's heavy dependencies beyond
what importing its module does (the model stages import torch).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import sys
import textwrap
import typing

from pairforge.manifests.storage import StorageConfig
from pairforge.pipeline.config import InputConfig, OutputConfig, RayConfig
from pairforge.stages import STAGES, class_name, stage_class
from pairforge.stages.options_doc import Option, describe

#: the job file's sections other than ``stages``, in the order a job file writes them
JOB_SECTIONS = (("input", InputConfig), ("output", OutputConfig), ("ray", RayConfig), ("storage", StorageConfig))


def summary(name: str) -> str:
    """The first sentence of stage ``name``'s module docstring, read from its
    source without importing it (``pairforge stages`` stays fast)."""
    module = STAGES[name].split(":", 1)[0]
    spec = importlib.util.find_spec(module)
    source = open(spec.origin, encoding="utf-8").read() if spec and spec.origin else ""
    doc = ast.get_docstring(ast.parse(source)) or ""
    para = " ".join(doc.split("\n\n", 1)[0].split())
    first = re.split(r"(?<!\bal)\.\s+(?=[A-Z])", para, maxsplit=1)[0]
    return first.rstrip(":.") + "."


def nested(cls) -> list[tuple[str, type]]:
    """Configs used as the option types of ``cls`` (``regions``' detectors), by option."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        for arg in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(arg):
                out.append((f.name, arg))
    return out


# ------------------------------------------------------------------ text (the CLI)


def stages_text() -> str:
    lines = ["Stages (a job file's name, the Python class in pairforge.stages, what it does):", ""]
    width = max(len(n) for n in STAGES)
    for name in STAGES:
        text = _plain(summary(name))
        text = text if len(text) <= 96 else text[:95].rsplit(" ", 1)[0] + " ..."
        lines.append(f"  {name:<{width}}  {class_name(name):<14}  {text}")
    lines += ["", "pairforge stages NAME: every option of a stage, with its type, default and doc."]
    return "\n".join(lines)


def stage_text(name: str) -> str:
    cls = stage_class(name)
    lines = [f"{name} (pairforge.stages.{class_name(name)})", *textwrap.wrap(_plain(summary(name)), 96), ""]
    lines += _options_text(describe(cls.Config))
    for option, inner in nested(cls.Config):
        lines += ["", f"{option}: each item takes", *_options_text(describe(inner))]
    return "\n".join(lines)


def _options_text(opts: list[Option]) -> list[str]:
    lines = []
    for o in opts:
        default = "required" if o.required else f"default {o.default}"
        lines.append(f"  {o.name}: {o.type}, {default}")
        lines += textwrap.wrap(_plain(o.doc) or "-", 92, initial_indent="      ", subsequent_indent="      ")
    return lines


def _plain(text: str) -> str:
    """RST's double backticks as a terminal shows code: `x`."""
    return text.replace("``", "`")


# ------------------------------------------------------------------ markdown (the docs)


def markdown() -> str:
    """The reference page's body: the job's sections, then every stage's options."""
    out = ["## Job sections", ""]
    for section, cls in JOB_SECTIONS:
        out += [f"### `{section}`", "", *_table(describe(cls)), ""]
    out += [
        "### `runner`",
        "",
        "`ray` (default) or `local` (in process, the same bytes; for tests and debugging).",
        "",
        "## Stages",
        "",
        "| stage | Python | what it does |",
        "| --- | --- | --- |",
    ]
    out += [f"| [`{n}`](#{n}) | `pairforge.stages.{class_name(n)}` | {_cell(summary(n))} |" for n in STAGES]
    out.append("")
    for name in STAGES:
        cls = stage_class(name)
        out += [f"### `{name}` {{#{name}}}", "", _cell(summary(name)), ""]
        out += [f"Python: `pairforge.stages.{class_name(name)}(...)`; module `{cls.__module__}`.", ""]
        out += [*_table(describe(cls.Config)), ""]
        for option, inner in nested(cls.Config):
            out += [f"Each item of `{option}` (`{inner.__name__}`):", "", *_table(describe(inner)), ""]
    return "\n".join(out)


def _table(opts: list[Option]) -> list[str]:
    rows = ["| option | type | default | description |", "| --- | --- | --- | --- |"]
    for o in opts:
        default = "*required*" if o.required else f"`{o.default}`"
        rows.append(f"| `{o.name}` | `{o.type}` | {_cell(default)} | {_cell(o.doc)} |")
    return rows


def _cell(text: str) -> str:
    """Markdown for a table cell: RST's roles and double backticks become code, pipes are escaped."""
    return re.sub(r":\w+:`([^`]*)`", r"`\1`", text).replace("``", "`").replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    """``python -m pairforge.pipeline.reference``: the markdown, to stdout."""
    sys.stdout.write(markdown() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
