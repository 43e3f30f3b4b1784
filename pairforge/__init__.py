"""pairforge: build web-scale image-text datasets on Ray Data and check them by training.

The one import name of the project. Its subpackages live at the repository's root
(``pipeline/``, ``stages/``, ``manifests/``, ``trainer/``) and are installed under this
package: ``pairforge.pipeline`` runs jobs, ``pairforge.stages`` holds one stage a
module, ``pairforge.manifests`` owns the on-disk contract, ``pairforge.trainer``
trains a small CLIP on a build.

The Python API, which a job file only spells in YAML::

    import pairforge
    from pairforge.stages import ClipScore, DedupExact, Download, Shard

    job = pairforge.Job(
        input="urls.parquet",  # url, caption
        output="out",
        stages=[Download(image_size=256), DedupExact(), ClipScore(model="pf-tiny", pretrained="scorer.pt"), Shard()],
    )
    manifest = pairforge.run(job)  # or pairforge.run("job.yaml")

* ``Job`` (``pipeline.config.JobConfig``), ``Input``, ``Output``: a job from objects;
  ``load_job`` reads one from a YAML file or a dict.
* ``run``: run a job (on Ray, or in process), returning its manifest.
* ``ray_map``: a per-row stage inside your own ``ray.data`` pipeline.

Everything is imported on first use: ``import pairforge`` imports neither torch nor ray.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("pairforge")
except _metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

#: public name -> (module, attribute), imported on first use
_LAZY = {
    "Job": ("pairforge.pipeline.config", "JobConfig"),
    "Input": ("pairforge.pipeline.config", "InputConfig"),
    "Output": ("pairforge.pipeline.config", "OutputConfig"),
    "load_job": ("pairforge.pipeline.config", "load_job"),
    "ConfigError": ("pairforge.stages.options", "ConfigError"),
    "ray_map": ("pairforge.pipeline.raymap", "ray_map"),
}
_SUBPACKAGES = ("stages", "pipeline", "manifests", "trainer")

__all__ = ["__version__", "run", *_LAZY, *_SUBPACKAGES]


def run(
    job: Any,
    *,
    address: str | None = None,
    resume: bool = False,
    runner: str | None = None,
    verbose: bool = False,
    progress_every: float | None = None,
) -> dict:
    """Run a job and return its manifest (also written to ``OUT/manifest.json``).

    Args:
        job: a ``Job``, a path to a job YAML file, or the job as a dict.
        address: a Ray cluster (``auto``, ``host:port``); default the job's
            ``ray.address``, then ``$RAY_ADDRESS``, else a local Ray that nothing
            leaves loopback from.
        resume: finish an interrupted run in the same output folder.
        runner: ``ray`` or ``local`` (in process, same bytes); default the job's.
        verbose: Ray Data's own progress bars and INFO logs too.
        progress_every: seconds between progress lines when stderr is not a terminal.

    Returns:
        The manifest: ``counts`` (rows in, in shards, rejected), ``stages`` (rows
        in and out and drops per reason of each stage), ``shards`` (files and
        checksums), ``schema``, ``fits``, ``timing``; ``manifests/FORMAT.md``.

    Raises:
        ConfigError: the job cannot work (every problem, one a line), before
            Ray starts or anything is written.
    """
    import dataclasses

    from pairforge.pipeline.config import JobConfig, load_job
    from pairforge.pipeline.job import run_job

    if not isinstance(job, JobConfig):
        job = load_job(job)
    if runner is not None and runner != job.runner:
        job = dataclasses.replace(job, runner=runner)
    return run_job(job, address=address, resume=resume, verbose=verbose, progress_every=progress_every)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
