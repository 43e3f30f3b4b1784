"""pairforge: build web-scale image-text datasets on Ray Data and check them by training.

The one import name of the project. Its subpackages live at the repository's root
(``pipeline/``, ``stages/``, ``manifests/``, ``trainer/``) and are installed under this
package: ``pairforge.pipeline`` runs jobs, ``pairforge.stages`` holds one stage a
module, ``pairforge.manifests`` owns the on-disk contract, ``pairforge.trainer``
trains a small CLIP on a build.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("pairforge")
except _metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
