"""Not imported: this folder goes on ``PYTHONPATH`` for the Ray processes
pairforge starts, for its ``sitecustomize.py`` (see :mod:`pipeline.raystart`).
The ``__init__`` only makes setuptools ship the folder with the package."""
