"""The import contract: the layout shows the flow only while the imports do.

Read from the source with ``ast`` (no import is executed; imports inside
functions count, they are dependencies too), over every module of the
package: the folders ``stages/``, ``manifests/``, ``pipeline/``, ``trainer/``
and the files of ``pairforge/`` itself (the API, the command line, the demo:
the layer above the folders). It fails on

* an import cycle between files,
* an import cycle between folders (today's order: stages <- manifests <-
  pipeline <- trainer <- pairforge's own files),
* ``stages/`` importing ``pipeline/`` or ``ray`` (a stage is plain code over
  batches; how it runs is the runner's business).

Each failure names the import lines (file:line) that make it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("stages", "manifests", "pipeline", "trainer")
TOP = "pairforge"
#: what a stage module must not import: the runners, and the engine they run on
STAGES_MUST_NOT_IMPORT = ("pairforge.pipeline", "ray")


def package_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for the folders and ``pairforge/``'s own files."""
    mods: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([TOP, *parts])] = path
    for path in sorted((root / TOP).glob("*.py")):  # not the links: they are the folders above
        mods[TOP if path.stem == "__init__" else f"{TOP}.{path.stem}"] = path
    return mods


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with the line."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]], dict[str, list[tuple[str, int]]]]:
    """The package's modules, the edges between them (importer -> imported ->
    line) and every import of each module (for the rules on outside packages)."""
    mods = package_modules(root)
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    raw: dict[str, list[tuple[str, int]]] = {}
    for name, path in mods.items():
        raw[name] = imports_of(name, path)
        for target, line in raw[name]:
            while target and target not in mods:  # ``from a.b import C``: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name and target not in edges[name]:
                edges[name][target] = line
    return mods, edges, raw


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else TOP


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_problems(root: Path) -> list[str]:
    """Every break of the contract, one line each (with the import lines behind it)."""
    mods, edges, raw = import_graph(root)

    def where(a: str, b: str) -> str:
        return f"{mods[a].relative_to(root)}:{edges[a][b]} imports {b}"

    problems = []
    for comp in cycles({m: set(t) for m, t in edges.items()}):
        inside = [where(a, b) for a in comp for b in edges[a] if b in comp]
        problems.append(f"import cycle between files {', '.join(comp)}: " + "; ".join(inside))
    folders: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            if folder_of(a) != folder_of(b):
                folders.setdefault(folder_of(a), set()).add(folder_of(b))
    for comp in cycles(folders):
        inside = [where(a, b) for a in edges for b in edges[a] if {folder_of(a), folder_of(b)} <= set(comp)
                  and folder_of(a) != folder_of(b)]  # fmt: skip
        problems.append(f"import cycle between folders {', '.join(comp)}: " + "; ".join(sorted(inside)))
    for name, found in raw.items():
        if folder_of(name) != "stages":
            continue
        seen = set()
        for target, line in found:  # ``from a import b`` is a and a.b on one line: one problem
            bad = [p for p in STAGES_MUST_NOT_IMPORT if target == p or target.startswith(p + ".")]
            if bad and line not in seen:
                seen.add(line)
                problems.append(f"{mods[name].relative_to(root)}:{line} imports {target}: stages never import {bad[0]}")
    return problems


def test_the_package_keeps_its_import_contract():
    problems = import_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_the_contract_is_read_from_every_module():
    mods, edges, _ = import_graph(ROOT)
    assert {"pairforge.cli", "pairforge.demo", "pairforge.stages.base", "pairforge.pipeline.engine"} <= set(mods)
    assert "pairforge.stages.base" in edges["pairforge.pipeline.engine"]
    assert "pairforge.trainer.cli" in edges["pairforge.cli"]  # an import inside a function counts


def test_the_contract_fails_on_cycles_and_on_a_stage_importing_the_runner(tmp_path):
    for folder in (*FOLDERS, TOP):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "stages" / "good.py").write_text("from pairforge.stages import other\n")
    (tmp_path / "stages" / "other.py").write_text("def f():\n    from . import good\n")  # a file cycle
    (tmp_path / "stages" / "remote.py").write_text("import numpy\nimport ray.data\n")
    (tmp_path / "stages" / "planned.py").write_text("from pairforge.pipeline.plan import ready\n")
    (tmp_path / "pipeline" / "plan.py").write_text("from pairforge.stages.good import x\n")
    (tmp_path / "manifests" / "shards.py").write_text("from pairforge.stages import good\n")
    (tmp_path / "stages" / "shard.py").write_text("from pairforge.manifests.shards import write\n")  # folders
    problems = import_problems(tmp_path)
    text = "\n".join(problems)
    assert "import cycle between files pairforge.stages.good, pairforge.stages.other" in text, text
    assert "stages/remote.py:2 imports ray.data: stages never import ray" in text
    assert "stages/planned.py:1 imports pairforge.pipeline.plan: stages never import pairforge.pipeline" in text
    assert "import cycle between folders manifests, pipeline, stages" in text
    assert "stages/shard.py:1 imports pairforge.manifests.shards" in text
    assert len(problems) == 4, text
