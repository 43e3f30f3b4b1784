"""Keeps Ray's dashboard head process on loopback.

Python imports a ``sitecustomize`` module at start-up from ``sys.path``;
:func:`pipeline.raystart.loopback_env` puts this folder first on
``PYTHONPATH`` for the Ray processes pairforge starts (``ray.init`` and
``ray start``), so every one of them imports this file.

It acts in one process only, Ray's dashboard head
(``ray/dashboard/dashboard.py``, started on the head node even with
``include_dashboard=False``, to run ``UsageStatsHead``). There it replaces the
two functions of ``ray._common.usage.usage_lib`` that reach the network:

* ``get_cloud_from_metadata_requests``: HTTP GETs to 169.254.169.254 and
  metadata.google.internal, made by ``get_cluster_config_to_report`` when
  ``~/ray_bootstrap_config.yaml`` is absent, before Ray looks at
  ``RAY_USAGE_STATS_ENABLED``;
* ``UsageReportClient.report_usage_data``: the POST to usage-stats.ray.io,
  which a ``ray start`` cluster sends even with usage stats disabled (to say
  that they are).

If Ray no longer has them, the dashboard exits here rather than run unpatched.
In every other process this file only runs the ``sitecustomize`` it shadows,
if there is one.
"""

import os
import sys

_DASHBOARD = os.sep + os.path.join("ray", "dashboard", "dashboard.py")


def _patch_ray_usage() -> None:
    import logging

    from ray._common.usage import usage_lib

    # both must exist, or Ray changed and this patch no longer covers it
    usage_lib.get_cloud_from_metadata_requests  # noqa: B018
    usage_lib.UsageReportClient.report_usage_data  # noqa: B018
    log = logging.getLogger("pairforge.loopback")

    def get_cloud_from_metadata_requests() -> str:
        log.info("pairforge: skipped Ray's cloud metadata probe (169.254.169.254, metadata.google.internal)")
        return "unknown"

    def report_usage_data(self, url, data):
        log.info("pairforge: did not send the usage report to %s", url)

    usage_lib.get_cloud_from_metadata_requests = get_cloud_from_metadata_requests
    usage_lib.UsageReportClient.report_usage_data = report_usage_data


def _refuse(msg: str) -> None:
    """Exit the dashboard; Ray prints its ``dashboard.err`` when it fails to start
    (here stderr is /dev/null)."""
    sys.stderr.write(msg)
    for arg in sys.argv:
        if arg.startswith("--log-dir="):
            try:
                with open(os.path.join(arg.split("=", 1)[1], "dashboard.err"), "a") as f:
                    f.write(msg)
            except OSError:
                pass
    os._exit(1)


def _run_shadowed() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as e:  # what site.py does for a failing sitecustomize
        sys.stderr.write(f"Error in sitecustomize ({spec.origin}): {e!r}\n")


if sys.argv and os.path.normpath(sys.argv[0]).endswith(_DASHBOARD):
    try:
        _patch_ray_usage()
    except BaseException as e:  # site.py would print this and carry on unpatched
        _refuse(f"pairforge: cannot keep Ray's dashboard on loopback ({e!r}); not starting it\n")
_run_shadowed()
