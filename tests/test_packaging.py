"""What installs: one import name, ``pairforge``, with the folders at the
repository's root (``pipeline/``, ``stages/``, ``manifests/``, ``trainer/``)
as its subpackages, and nothing else in site-packages (issue 27, item 1).

A wheel is what ``pip install .`` unpacks into site-packages, so the test
builds one (offline: ``--no-build-isolation`` uses this environment's
setuptools) from a copy of the project's files and reads its top-level
names; then imports it from a folder holding a ``pipeline/`` package of its
own, which must not shadow pairforge's."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ("pyproject.toml", "README.md", "pairforge", "pipeline", "stages", "manifests", "trainer")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGED:  # a copy: the build writes build/ and *.egg-info beside the sources
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (found,) = tmp.glob("pairforge-*.whl")
    return found


def test_the_wheel_installs_only_pairforge(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert top == {"pairforge", *dist_info} and len(dist_info) == 1, sorted(top)
    for sub in ("pipeline", "stages", "manifests", "trainer"):
        assert f"pairforge/{sub}/__init__.py" in names
    assert "pairforge/pipeline/assets/pf-tiny-scorer.pt" in names and "pairforge/__main__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/entry_points.txt").decode()
    assert "pairforge = pairforge" in entry_points  # the console script, into bin/


def test_a_users_own_pipeline_package_does_not_shadow_pairforge(wheel, tmp_path):
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    user = tmp_path / "project"
    (user / "pipeline").mkdir(parents=True)
    (user / "pipeline" / "__init__.py").write_text("MINE = True\n")
    code = (
        "import pipeline, pairforge, pairforge.pipeline.config as config\n"
        "from pairforge.stages import Download\n"
        "assert pipeline.MINE\n"
        "print(pairforge.__file__); print(config.__file__); print(type(Download()).__module__)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "NO_ALBUMENTATIONS_UPDATE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=user, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pkg, config, module = out.stdout.split()
    assert Path(pkg).is_relative_to(site) and Path(config).is_relative_to(site), out.stdout
    assert module == "pairforge.stages.download"
