"""The docs site builds (``mkdocs build --strict``: no broken link, no
missing page, every mkdocstrings reference resolved), and its generated
reference lists every option of every stage and job section, as the code
declares them today (``docs/hooks.py`` makes it from the configs)."""

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pairforge.pipeline.reference import JOB_SECTIONS
from pairforge.stages import STAGES, stage_class
from pairforge.stages.options_doc import describe

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = [m for m in NEEDED if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


def test_the_docs_build_strict_and_every_page_of_docs_is_in_the_site(site):
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix("") for p in (ROOT / "docs").rglob("*.md"))
    assert len(pages) >= 12
    for page in pages:
        built = site / ("index.html" if page.name == "index" else page / "index.html")
        assert built.is_file(), page
    api = _text(site / "python-api" / "index.html")
    assert "ray_map" in api and "Run a job and return its manifest" in api  # mkdocstrings rendered the docstrings
    assert "--8<--" not in _text(site / "output-format" / "index.html")  # manifests/FORMAT.md was included
    assert "manifest.json" in _text(site / "output-format" / "index.html")


def test_the_reference_lists_every_option_of_every_stage(site):
    page = (site / "reference" / "stages" / "index.html").read_text(encoding="utf-8")
    sections = {}
    for name in STAGES:  # each stage's section: from its heading to the next h3
        start = page.index(f'id="{name}"')
        end = page.find("<h3", start + 1)
        sections[name] = html.unescape(page[start : end if end > 0 else len(page)])
    for name in STAGES:
        cls = stage_class(name).Config
        for opt in describe(cls):
            assert f"<code>{opt.name}</code>" in sections[name], (name, opt.name)
            assert html.unescape(opt.doc.split("``")[0])[:30] in sections[name] or not opt.doc, (name, opt.name)
    for section, cls in JOB_SECTIONS:
        for opt in describe(cls):
            assert f"<code>{opt.name}</code>" in page, (section, opt.name)
