"""How long chosen tests take here against a base revision of the same tests,
measured in one run: the figures behind "the suite stays under ~15 minutes".

    python bench/test_times.py --base main -- tests/stages/test_regions.py
    python bench/test_times.py --base main --base-tests "tests/x.py" -- tests/x_a.py tests/x_b.py

Why a script and not ``pytest --durations``: one suite run's durations move
with whatever else the shared machine did meanwhile, and a test's time before
a change and after it are only comparable when measured side by side. So the
base revision's tree is exported (``git archive``, nothing of the repository
changes) to a temporary folder, and each pass runs pytest on the base tree,
then on the working tree (``PYTHONPATH`` set to each, so each imports its own
code), alternating, after an untimed warm-up (``pytest --collect-only`` in
both: the imports and the page cache). A test's time is its setup, call and
teardown as pytest reports them (``--durations=0``); a module's or session's
fixture setup counts on the first test that needs it, as in the suite.

Printed: per test, the median of the passes with the spread (min-max) on each
side and new/base; per side, the pytest wall time and the tests that passed;
the load average before and after each pass. A side with a failing test is
reported as such, and its figures are not trusted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors)\b")


def export(rev: str, into: Path) -> Path:
    """The tree of ``rev`` in ``into`` (symlinks kept: ``pairforge/`` is made of them)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def pytest(tree: Path, tests: list[str], extra: list[str]) -> tuple[float, dict[str, float], dict[str, int], str]:
    """One pytest run in ``tree``: wall seconds, seconds per test, outcome counts, output tail."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "--durations-min=0"]
    start = time.perf_counter()
    r = subprocess.run([*cmd, *extra, *tests], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    per: dict[str, float] = defaultdict(float)
    for line in r.stdout.splitlines():
        m = DURATION.match(line)
        if m:
            per[m.group(3)] += float(m.group(1))
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    counts = {kind.rstrip("s"): int(n) for n, kind in SUMMARY.findall(last)}
    return wall, dict(per), counts, (r.stdout + r.stderr)[-3000:]


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main", help="the revision to compare with (default: main)")
    ap.add_argument("--base-tests", default=None, help="the base tree's test paths, if not the same (space-separated)")
    ap.add_argument("--passes", type=int, default=3, help="timed passes of each side (default: 3)")
    ap.add_argument("--pytest-args", default="", help="more pytest arguments for both sides, e.g. '-k regions'")
    ap.add_argument("tests", nargs="+", help="test paths or node ids, relative to the tree root")
    a = ap.parse_args(argv)
    extra = shlex.split(a.pytest_args)
    base_tests = a.base_tests.split() if a.base_tests else a.tests
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    base_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout
    print(f"base {a.base} ({base_rev.stdout.strip()}): {' '.join(base_tests)}")
    print(
        f"new  working tree at {head.stdout.strip()}{' (uncommitted changes)' if dirty.strip() else ''}: {' '.join(a.tests)}"
    )
    print(f"{a.passes} timed passes after an untimed warm-up (pytest --collect-only); cpus {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="pf-base-") as tmp:
        sides = {"base": (export(a.base, Path(tmp)), base_tests), "new": (ROOT, a.tests)}
        for tree, tests in sides.values():
            subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *tests],
                           cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True)  # fmt: skip
        walls: dict[str, list[float]] = defaultdict(list)
        times: dict[str, dict[str, list[float]]] = {"base": defaultdict(list), "new": defaultdict(list)}
        failed: dict[str, int] = defaultdict(int)
        counts: dict[str, dict] = {}
        for p in range(a.passes):
            for side, (tree, tests) in sides.items():
                load = os.getloadavg()
                wall, per, c, tail = pytest(tree, tests, extra)
                walls[side].append(wall)
                for nodeid, s in per.items():
                    times[side][nodeid].append(s)
                counts[side] = c
                bad = c.get("failed", 0) + c.get("error", 0) + (not c.get("passed"))  # nothing ran: not a figure
                failed[side] += bad
                after = os.getloadavg()
                print(
                    f"pass {p + 1} {side:4}: {wall:7.2f} s wall, {c}; load {load[0]:.2f} -> {after[0]:.2f}", flush=True
                )
                if bad or not c:
                    print(tail)
    print(f"\n{'test (setup + call + teardown, s)':<100} {'median [min-max]':>22}")
    for side in ("base", "new"):
        print(f"-- {side}")
        for nodeid, xs in sorted(times[side].items(), key=lambda kv: -statistics.median(kv[1])):
            other = times["new" if side == "base" else "base"].get(nodeid)
            ratio = ""
            if side == "new" and other and statistics.median(other) > 0:
                ratio = f"  new/base {statistics.median(xs) / statistics.median(other):.2f}"
            print(f"{nodeid[-100:]:<100} {spread(xs):>22}{ratio}")
    print()
    for side in ("base", "new"):
        note = f"  {failed[side]} FAILED over the passes: not trusted" if failed[side] else ""
        print(f"{side:4} pytest wall {spread(walls[side])} s, {counts[side]}{note}")
    ratio = statistics.median(walls["new"]) / statistics.median(walls["base"])
    print(f"new/base wall (medians): {ratio:.2f}; load average now {os.getloadavg()}")
    return 1 if failed["new"] or failed["base"] else 0


if __name__ == "__main__":
    sys.exit(main())
