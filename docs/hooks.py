"""mkdocs hooks: the option reference is generated from the configs, and the
nav takes in pages it does not list.

* ``reference/stages.md`` holds ``<!-- pairforge:options -->``; this hook puts
  ``pairforge.pipeline.reference.markdown()`` there (every option of every
  stage and job section: type, default and the ``#:`` doc of its field), so the
  page is made from the code at each build and cannot fall behind it.
* A page of ``docs/`` that ``mkdocs.yml``'s nav does not name is added under
  *More* (topics written beside this one appear without an edit here).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- pairforge:options -->"


def _nav_files(nav) -> set[str]:
    found: set[str] = set()
    for item in nav or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            found |= _nav_files(value)
        elif isinstance(value, str):
            found.add(value)
    return found


def on_config(config, **kwargs):
    if str(ROOT) not in sys.path:  # the repository's pairforge/, whatever is installed
        sys.path.insert(0, str(ROOT))
    docs = Path(config["docs_dir"])
    listed = _nav_files(config["nav"])
    extra = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md") if p.relative_to(docs).as_posix() not in listed)
    if extra:
        config["nav"].append({"More": extra})
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    if MARK not in markdown:
        return markdown
    from pairforge.pipeline.reference import markdown as reference

    return markdown.replace(MARK, reference())
