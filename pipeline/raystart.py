"""Start Ray so that nothing it does at start-up leaves loopback.

Why this exists. Ray 2.60 starts a dashboard head process on every head node,
for ``ray.init()`` and ``ray start --head`` alike, and *also* with
``include_dashboard=False``: then it only loads ``UsageStatsHead``
(``ray/_private/services.py`` line 1386, ``--modules-to-load=UsageStatsHead``;
``ray/_private/node.py`` line 1666, ``start_head_processes`` starts it
unconditionally). ``UsageStatsHead.run``
(``ray/dashboard/modules/usage_stats/usage_stats_head.py``, lines 195-201)
first calls ``usage_lib.get_cluster_config_to_report("~/ray_bootstrap_config.yaml")``
and only then looks at whether usage stats are enabled. When that file is
absent (any cluster not made by the cluster launcher), that function
(``ray/_common/usage/usage_lib.py``, lines 818-837) calls
``get_cloud_from_metadata_requests``: HTTP GETs to
``169.254.169.254`` (Azure, then AWS) and ``metadata.google.internal``.
``RAY_USAGE_STATS_ENABLED=0`` (which a local ``ray.init`` even sets itself)
and ``ray start --disable-usage-stats`` do not stop it. A ``ray start``
cluster with usage stats disabled also POSTs a "disabled" report to
``https://usage-stats.ray.io/`` (``_report_disabled_usage_sync``).

Ray has no switch for either: no setting skips the dashboard process or that
module, and the bootstrap-config path is fixed under ``$HOME``. Pointing
``HOME`` at a folder holding a stub ``ray_bootstrap_config.yaml`` would stop
the probe, but every Ray process, workers included, would then get that
``HOME``: Ray's token file (``~/.ray/auth_token``; token auth is on by default
for a local ``ray.init``), the Hugging Face and torch caches open_clip loads
weights from. Proxy variables would redirect every env-trusting HTTP client in
the workers too.

So the processes pairforge starts get this package's ``_raysite`` folder first
on ``PYTHONPATH``. Its ``sitecustomize.py`` acts in the dashboard head only: it
replaces those two network calls of ``usage_lib`` with no-ops that log a line
to ``dashboard.log`` (and makes the dashboard exit if Ray's code changed so
that it can no longer). Being an environment variable, it reaches ``ray start``
subprocesses and everything they start. ``tests/pipeline/test_no_egress.py`` proves it
in a private network namespace.

Only the process that *starts* a Ray node matters; a driver that connects to a
running cluster (``ray.init(address=...)``) starts no dashboard.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the folder whose ``sitecustomize.py`` patches Ray's dashboard head
SITE_DIR = str(Path(__file__).resolve().parent / "_raysite")


def _with_site_dir(pythonpath: str) -> str:
    parts = [p for p in pythonpath.split(os.pathsep) if p and os.path.abspath(p) != SITE_DIR]
    return os.pathsep.join([SITE_DIR, *parts])


def loopback_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables every Ray start (``ray.init`` here, ``ray start`` in a
    subprocess) needs so that nothing leaves loopback; merge them over the
    environment (``{**os.environ, **loopback_env()}``).

    ``PYTHONPATH`` is ``environ``'s (default ``os.environ``) with
    :data:`SITE_DIR` put first. ``RAY_USAGE_STATS_ENABLED=0`` keeps Ray from
    collecting and posting usage stats (the patch would drop the post anyway).
    """
    environ = os.environ if environ is None else environ
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": _with_site_dir(environ.get("PYTHONPATH", "")),
    }


def apply_loopback_env() -> None:
    """Set :func:`loopback_env` in ``os.environ``, for the Ray processes this
    process starts from now on.

    Both are forced, not ``setdefault``: a user's ``RAY_USAGE_STATS_ENABLED=1``
    would turn the reports on, and a user's ``PYTHONPATH`` is common, so
    :data:`SITE_DIR` is put in front of it (once) rather than left out.
    """
    os.environ.update(loopback_env())


def init_local(num_cpus: int | None = None, **kwargs):
    """Start a local Ray instance (``ray.init``) with :func:`apply_loopback_env`
    and without the dashboard; ``kwargs`` go to ``ray.init``. Returns what
    ``ray.init`` returns."""
    import ray

    if kwargs.get("address") not in (None, "local"):
        raise ValueError("init_local starts a local Ray; to join a cluster call ray.init(address=...)")
    if kwargs.pop("include_dashboard", False):
        raise ValueError("init_local starts Ray without the dashboard")
    apply_loopback_env()
    _say_token_auth()
    return ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def shutdown() -> None:
    """Leave Ray if this process is in it (and stop the local Ray it
    started); nothing when Ray was never imported or initialised."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _say_token_auth() -> None:
    """Token auth for the local Ray, said explicitly.

    With ``RAY_AUTH_MODE`` unset, a local ``ray.init`` turns token auth on
    itself (``enable_token_auth_by_default``: the variable set to ``token``
    for this process and the ones it starts, a token made in
    ``~/.ray/auth_token`` if there is none) and warns about it on every start.
    Setting the variable to what Ray would choose keeps the same security
    without the warning; Ray reads an explicit value without comment. A value
    the user set (``disabled``, ``token``) is left as it is. Joining a
    cluster (``ray.init(address=...)``) never comes here: its mode is the
    cluster's. Like Ray's own switch, the setting is re-read by this
    process's Ray config (``Config.initialize``), which ``import ray`` may
    have read before."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")
